"""Whole run lifecycles on the fake engine and fake mounts, with the real
state store, log store, key store and progress channels, under trio's
MockClock: time limits, cancels, teardowns past their deadline, restarts,
a shell's cleanup, and recovery after a crash, in milliseconds."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent import config, protocol
from agent.caches import Caches
from agent.checkout import Checkouts
from agent.errors import CommandFailed
from agent.host.engine import ContainerSpec
from agent.host.git import worktree_volume_name
from agent.keys import KeyStore
from agent.logformat import Kind
from agent.logstore import LogStore
from agent.model import Network, Repository, Requester, RunStatus, Task
from agent.mutations import Mutations
from agent.runs import Runs, task_container_name, task_to_wire
from agent.shell import serve_shell
from agent.state import StateStore

from ..fake_engine import (
    FakeContainer,
    FakeEngine,
    FakeMounts,
    FakeNetwork,
    checks_out,
    prints,
    sleeps,
)

ME = Requester(uid=1000, gid=1000, pid=1)
OWNER = "alice"
REPO = Repository(repo_url="git@git.example.org:alice/lib.git", revision="main", mutable=True,
                  key="deploy", submodules=False, mount_name="lib",
                  entry={"repo_url": "git@git.example.org:alice/lib.git", "revision": "main",
                         "mutable": True, "key": "deploy"})
VOLUME = worktree_volume_name(OWNER, REPO.entry)
CHECKOUT = ("--url", REPO.repo_url, "--revision", "main")


def task(command: tuple[str, ...], **kw: Any) -> Task:
    return Task(**{"name": "t", "owner": OWNER, "source": "t.yml:1", "image": "efci/base:bookworm",
                   "command": command, "network": Network.NONE, "repositories": (REPO,),
                   **kw})


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="efci-", dir="/tmp"))  # short: unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path)


class World:
    """An agent's run machinery over the fake engine."""

    def __init__(self, root: Path) -> None:
        self.cfg = dataclasses.replace(config.defaults(config.Layout.under(root)),
                                       stop_grace=10, time_limit=3600)
        self.engine = FakeEngine(root / "volumes", programs={CHECKOUT: checks_out()})
        self.mounts = FakeMounts()
        self.state = StateStore(self.cfg.state_dir / "state.db")
        self.logs = LogStore(self.cfg.log_dir, limit=1 << 30)
        keys = KeyStore(self.cfg.secrets_base)
        keys._dirs(OWNER)
        private = keys.private_path(OWNER, "deploy")
        private.write_text("KEY\n")
        private.chmod(0o600)
        keys.known_hosts(OWNER).write_text("git.example.org ssh-ed25519 AAAA\n")
        instance = self.state.instance()
        self.checkouts = Checkouts(self.cfg, self.engine, self.state, keys, instance)
        self.runs = Runs(self.cfg, self.engine, self.state, self.logs, self.checkouts,
                         Mutations(self.cfg, self.engine, instance, self.mounts),
                         FakeNetwork(), Caches(self.cfg, self.state),  # type: ignore[arg-type]
                         instance)
        self.instance = instance

    def program(self, command: tuple[str, ...], program: Callable[..., Awaitable[int]]) -> None:
        self.engine.programs[command] = program

    async def record(self, run_id: int) -> Any:
        return await self.runs.record(run_id)

    def output(self, run_id: int) -> bytes:
        with self.logs.reader(run_id) as reader:
            return b"".join(r.payload for r in reader.records_from(0)
                            if r.kind is Kind.OUTPUT and r.stream == 1)

    def messages(self, run_id: int) -> str:
        with self.logs.reader(run_id) as reader:
            return "\n".join(r.payload.decode() for r in reader.records_from(0)
                             if r.kind is Kind.AGENT)

    async def until_done(self, run_id: int) -> None:
        while run_id in self.runs.active:
            await self.runs.active[run_id].done.wait()

    async def volume_is_free(self) -> bool:
        """Can a checkout of the worktree volume take it now (no use held)?"""
        with trio.move_on_after(1):
            await self.checkouts._locks[VOLUME].acquire_write()
            self.checkouts._locks[VOLUME].release_write()
            return True
        return False


@asynccontextmanager
async def world(root: Path) -> AsyncIterator[World]:
    w = World(root)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(w.runs.serve)
            yield w
            await w.runs.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        w.state.close()


def mock_clock() -> trio.testing.MockClock:
    # Jumps only once every task has waited a little in real time: SQLite
    # calls run in a worker thread, and must not be mistaken for idleness.
    return trio.testing.MockClock(autojump_threshold=0.05)


def test_a_run_checks_out_runs_and_leaves_nothing_mounted_or_held(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            w.program(("make",), prints(b"built\r\n"))
            run = await w.runs.start(task(("make",)), ME)
            await w.until_done(run)
            record = await w.record(run)
            assert (record.status, record.exit_code) == (RunStatus.SUCCEEDED, 0)
            assert w.output(run) == b"built\r\n"
            assert w.engine.volumes[VOLUME]["ci.owner"] == OWNER
            assert f"efci-{w.instance}-{run}-checkout-0" in w.engine.removed
            container = w.engine.containers[record.container_id]
            assert container.status == "exited"  # kept, stopped
            # run by the id its tag named, which the record has without asking docker
            image_id = await w.engine.image_id("efci/base:bookworm")
            assert record.image_id == container.image == image_id
            assert w.mounts.points == set() and w.mounts.mounted_ever == 1
            assert await w.volume_is_free()

    trio.run(main, clock=mock_clock())


def test_a_run_records_where_its_time_went(root: Path) -> None:
    """Every phase of the run path, in order, the checkout's steps (the
    checkout container's own clock readings) as its parts; the phases
    one after another, none overlapping, within the run's whole time."""
    async def main() -> None:
        async with world(root) as w:
            w.program(("make",), prints(b"built\r\n"))
            run = await w.runs.start(task(("make",)), ME)
            await w.until_done(run)
            record = (await w.record(run)).to_wire()
            phases = record["timings"]
            assert [(p["phase"], p["within"]) for p in phases] == [
                ("queued", None), ("checks", None), ("checkout lib", None),
                ("container start", "checkout lib"), ("fetch", "checkout lib"),
                ("checkout", "checkout lib"), ("mtimes", "checkout lib"),
                ("container exit", "checkout lib"), ("overlay mounts", None),
                ("container create", None), ("start to first byte", None), ("run", None),
                ("teardown", None), ("recording the end", None)]
            top = [p for p in phases if p["within"] is None]
            for before, after in itertools.pairwise(top):
                assert before["start"] + before["seconds"] <= after["start"] + 2e-6  # rounding
            assert all(p["seconds"] >= 0 for p in phases)
            parts = [p for p in phases if p["within"] == "checkout lib"]
            assert [round(p["seconds"], 5) for p in parts[1:4]] == [1e-5] * 3

    trio.run(main, clock=mock_clock())


def test_the_time_limit_during_the_checkout_leaves_nothing(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            w.program(CHECKOUT, sleeps())  # a git server that never answers
            run = await w.runs.start(task(("make",), time_limit=30), ME)
            await w.until_done(run)
            record = await w.record(run)
            assert record.status is RunStatus.TIMED_OUT and "time limit of 30s" in record.error
            assert record.container_id is None  # the task container never existed
            assert f"efci-{w.instance}-{run}-checkout-0" in w.engine.removed
            assert w.engine.containers == {} and w.mounts.points == set()
            assert await w.volume_is_free()

    trio.run(main, clock=mock_clock())


def test_a_cancel_during_the_attach_stops_the_container(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            w.program(("serve",), sleeps())
            run = await w.runs.start(task(("serve",)), ME)
            await trio.sleep(5)
            assert (await w.record(run)).status is RunStatus.RUNNING
            await w.runs.cancel(run, "cancelled by uid 1000")
            record = await w.record(run)
            assert record.status is RunStatus.CANCELLED
            assert record.error == "cancelled by uid 1000"
            container = w.engine.containers[record.container_id]
            assert (container.status, container.stops) == ("exited", 1)
            assert w.mounts.points == set() and await w.volume_is_free()

    trio.run(main, clock=mock_clock())


def test_the_time_limit_during_the_run_stops_it_and_keeps_its_container(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            w.program(("serve",), sleeps())
            run = await w.runs.start(task(("serve",), time_limit=3), ME)
            await w.until_done(run)
            record = await w.record(run)
            assert (record.status, record.error) == (RunStatus.TIMED_OUT,
                                                     "time limit of 3s reached")
            container = w.engine.containers[record.container_id]
            assert (container.status, container.stops) == ("exited", 1)
            assert w.mounts.points == set() and await w.volume_is_free()

    trio.run(main, clock=mock_clock())


def test_a_teardown_past_its_deadline_still_unmounts_and_releases(root: Path) -> None:
    """docker stop hangs past the stop grace and the teardown's slack: the
    run still ends, its views are unmounted and its worktree use is given
    back (it used to stay held, and every later checkout waited)."""

    async def main() -> None:
        async with world(root) as w:
            w.engine.stop_takes = 10_000
            w.program(("serve",), sleeps())
            run = await w.runs.start(task(("serve",), time_limit=5), ME)
            await w.until_done(run)
            record = await w.record(run)
            assert record.status is RunStatus.TIMED_OUT
            assert w.mounts.points == set() and await w.volume_is_free()
            second = await w.runs.start(task(("true",)), ME)  # checks the volume out again
            w.engine.stop_takes = 0
            await w.until_done(second)
            assert (await w.record(second)).status is RunStatus.SUCCEEDED

    trio.run(main, clock=mock_clock())


def test_a_restart_runs_the_same_container_again_as_a_new_attempt(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            attempts = []

            async def flaky(terminal: Any) -> int:
                attempts.append(1)
                await terminal.write(f"attempt {len(attempts)}\r\n".encode())
                return 0 if len(attempts) == 2 else 1

            w.program(("flaky",), flaky)
            run = await w.runs.start(task(("flaky",)), ME)
            await w.until_done(run)
            first = await w.record(run)
            assert (first.status, first.exit_code) == (RunStatus.FAILED, 1)
            await w.runs.restart(run, ME)
            await w.until_done(run)
            second = await w.record(run)
            assert (second.status, second.exit_code, second.attempts) == (
                RunStatus.SUCCEEDED, 0, 2)
            assert second.container_id == first.container_id
            assert w.engine.containers[first.container_id].starts == 2
            assert w.output(run) == b"attempt 1\r\nattempt 2\r\n"
            assert "attempt 2: starting container" in w.messages(run)
            assert w.mounts.points == set() and w.mounts.mounted_ever == 2
            assert await w.volume_is_free()

    trio.run(main, clock=mock_clock())


def test_a_shell_that_fails_midway_cleans_up_every_step(root: Path) -> None:
    async def main() -> None:
        async with world(root) as w:
            run = await w.runs.start(task(("true",)), ME)
            await w.until_done(run)
            real_create = w.engine.create

            async def refusing(spec: ContainerSpec) -> str:
                if spec.name.endswith("-shell"):
                    raise CommandFailed(["docker", "create"], 125, b"", b"no room")
                return await real_create(spec)

            w.engine.create = refusing  # type: ignore[method-assign]

            async def nothing() -> bytes | None:
                return None

            async def send(data: bytes) -> None:
                pass

            call = protocol.Call(1, ME, send, nothing)
            with pytest.raises(CommandFailed):
                await serve_shell(w.runs, call, run, 80, 24)
            assert not any(i.startswith("efci-shell/") for i in w.engine.images)
            assert not any(c.name.endswith("-shell") for c in w.engine.containers.values())
            assert w.mounts.points == set() and await w.volume_is_free()
            assert run not in w.runs._claimed

    trio.run(main, clock=mock_clock())


def test_recovery_settles_what_a_killed_agent_left(root: Path) -> None:
    async def main() -> None:
        w = World(root)
        try:
            records = {}
            for name, status in (("gone", None), ("running", "running"),
                                 ("exited", "exited"), ("created", "created")):
                declared = task(("x",), name=name)
                run = w.state.create_run(declared, ME, task_to_wire(declared))
                if status is not None:
                    container = FakeContainer(f"id-{name}", task_container_name(w.instance, run),
                                              (), status=status, exit_code=4)
                    w.engine.containers[container.id] = container
                    w.state.update_run(run, status=RunStatus.RUNNING, container_id=container.id)
                records[name] = run
            await w.mounts.mount_overlay([root], root, root, w.cfg.state_dir / "mounts/1/lib")
            await w.runs.recover()
            settled = {name: await w.record(run) for name, run in records.items()}
            assert settled["gone"].status is RunStatus.CANCELLED
            assert settled["running"].status is RunStatus.CANCELLED
            assert w.engine.containers["id-running"].status == "exited"  # stopped
            assert settled["created"].status is RunStatus.CANCELLED
            exited = settled["exited"]
            assert (exited.status, exited.exit_code) == (RunStatus.ERROR, 4)  # never success
            assert "finished while the agent was not running" in exited.error
            assert w.mounts.points == set()
        finally:
            w.state.close()

    trio.run(main, clock=mock_clock())
