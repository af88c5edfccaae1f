"""Base worktrees: one Docker volume per repository entry, brought to its
revision by the one-shot checkout container (the seed's two-step sequence,
step 1).

An immutable entry (a full sha) is checked out once and reused as is; a
mutable one (a ref name) is brought up to date on every run.  A worktree is
recorded "not ready" before its checkout container runs and "ready" with its
commit after, so one interrupted by a crash is checked out again, never
reused half-made.  Checkouts of one volume never overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import trio

from . import timings
from .config import AgentConfig
from .errors import EfciError, RunFailed
from .gitea import GiteaAPI, repository_on
from .host.engine import Engine
from .host.git import (
    HEAD_LINE,
    checkout_container,
    checkout_steps,
    ssh_host,
    volume_labels,
    worktree_volume_name,
)
from .keys import KeyStore
from .logformat import Kind
from .logstore import LogWriter
from .model import Repository, Task
from .state import StateStore

log = logging.getLogger(__name__)


class ReadWriteLock:
    """Many runs may use a base worktree at once (as an overlay's lower
    layer); a checkout needs it alone, since changing a lower layer under a
    mounted overlay is undefined.  A checkout that ends becomes a use.

    Releasing is synchronous, as trio.Lock.release is: it runs in
    ``finally`` blocks under a teardown deadline, where an await could be
    cancelled and leave the lock held for ever."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def acquire_read(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._writer:
            await self._waiting.park()
        self._readers += 1

    async def acquire_write(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._writer or self._readers:
            await self._waiting.park()
        self._writer = True

    def release_read(self) -> None:
        assert self._readers > 0, "release_read without a reader"
        self._readers -= 1
        self._waiting.unpark_all()

    def release_write(self) -> None:
        assert self._writer, "release_write without the writer"
        self._writer = False
        self._waiting.unpark_all()

    def downgrade(self) -> None:
        """The writer becomes a reader, letting other readers in."""
        self.release_write()
        self._readers += 1

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        await self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()


class CheckoutFailed(RunFailed):
    """The repository could not be checked out: a result of the run (failed)."""

    code = "checkout_failed"


@dataclass(frozen=True)
class Worktree:
    volume: str
    mount_name: str
    commit: str
    reused: bool


def _image_context() -> Path:
    return Path(str(resources.files("agent") / "checkout_image"))


def checkout_image_tag(base_image: str) -> str:
    """Tagged by a hash of its files and base, so a change rebuilds it."""
    digest = hashlib.sha256(base_image.encode())
    for path in sorted(_image_context().iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"efci/checkout:{digest.hexdigest()[:16]}"


class Checkouts:
    def __init__(self, cfg: AgentConfig, engine: Engine, state: StateStore, keys: KeyStore,
                 instance: str, gitea: GiteaAPI | None = None) -> None:
        self.cfg = cfg
        self.gitea = gitea
        self.engine = engine
        self.state = state
        self.keys = keys
        self.instance = instance
        self._image_lock = trio.Lock()
        # Its files ship with the agent and do not change while it runs.
        self._image_tag = checkout_image_tag(cfg.base_image)
        self._locks: defaultdict[str, ReadWriteLock] = defaultdict(ReadWriteLock)

    async def ensure_image(self) -> str:
        """The checkout image's tag, building it first if it is missing."""
        tag = self._image_tag
        async with self._image_lock:
            if not await self.engine.image_exists(tag):
                log.info("building the checkout image %s", tag)
                output = bytearray()
                status = await self.engine.build(
                    tag, _image_context(), dockerfile=_image_context() / "Dockerfile",
                    build_args={"BASE": self.cfg.base_image}, output=output.extend)
                if status != 0:
                    raise CheckoutFailed(f"the checkout image {tag} failed to build (exit "
                                         f"status {status}): "
                                         + output.decode("utf-8", "replace")[-2000:])
        return tag

    def check(self, task: Task) -> None:
        """Refuse before anything runs: missing keys, unpinned hosts."""
        for repo in task.repositories:
            private = self.keys.private_path(task.owner, repo.key)
            if not private.exists() and not private.is_symlink():
                raise CheckoutFailed(
                    f"deploy key {repo.key!r} of owner {task.owner!r} does not exist; "
                    f"create it with: efci key create {repo.key} --owner {task.owner}")
            self.keys.checked(private, private=True)
            self.keys.checked(self.keys.known_hosts(task.owner), private=False)
            host = ssh_host(repo.repo_url)
            if host is None:
                raise CheckoutFailed(f"{repo.repo_url!r} is not an ssh URL")
            if not task.unchecked_host_keys and not self.keys.is_trusted(task.owner, *host):
                raise CheckoutFailed(
                    f"the ssh host key of {host[0]} (port {host[1]}) is not pinned for owner "
                    f"{task.owner!r}; pin it with: efci key trust {host[0]} --port {host[1]} "
                    f"--owner {task.owner} (or set checkout.unchecked_host_keys: true)")

    async def verify_commits(self, task: Task, writer: LogWriter) -> None:
        """Before the first checkout of a literal sha on the agent's Gitea, ask
        Gitea whether the commit exists, so that a mistyped or unpushed sha
        fails the run before any container starts.  A Gitea that does not
        answer only delays the verdict to the checkout itself."""
        if self.gitea is None:
            return
        for repo in task.repositories:
            on = repository_on(repo.repo_url, self.cfg.gitea_hosts)
            if repo.mutable or on is None:
                continue
            volume = worktree_volume_name(task.owner, repo.entry)
            if await self.state.call(self.state.worktree_commit, volume) is not None:
                continue  # checked out before: reused as is
            try:
                found = await self.gitea.has_commit(on, repo.revision)
            except EfciError as e:
                writer.message(f"{repo.mount_name}: Gitea could not say whether {on} has "
                               f"commit {repo.revision[:12]} ({e.message}); checking out")
                continue
            if not found:
                raise CheckoutFailed(
                    f"{repo.mount_name}: Gitea has no commit {repo.revision} in {on} (or "
                    f"the token may not read it); correct the revision declared at "
                    f"{task.source}, or push the commit")
            writer.message(f"{repo.mount_name}: Gitea has commit {repo.revision[:12]} in {on}")

    async def prepare(self, run_id: int, task: Task, index: int, repo: Repository,
                      writer: LogWriter) -> Worktree:
        """Bring this entry's base worktree to its revision, or reuse it.

        On return the caller holds a use of the worktree and must give it
        back with :meth:`release`, after its overlay is unmounted."""
        volume = worktree_volume_name(task.owner, repo.entry)
        lock = self._locks[volume]
        if not repo.mutable:  # most runs of a pinned revision only read it
            await lock.acquire_read()
            try:
                commit = await self.state.call(self.state.worktree_commit, volume)
                if commit and await self.engine.volume_exists(volume):
                    writer.message(f"{repo.mount_name}: reusing worktree {volume} at "
                                   f"{commit[:12]} (immutable revision)")
                    return Worktree(volume, repo.mount_name, commit, reused=True)
            except BaseException:
                lock.release_read()
                raise
            lock.release_read()
        await lock.acquire_write()
        try:
            commit = None if repo.mutable else await self.state.call(
                self.state.worktree_commit, volume)  # another run may have just made it
            if commit is None:
                commit = await self._check_out(run_id, task, index, repo, volume, writer)
        except BaseException:
            lock.release_write()
            raise
        lock.downgrade()  # the checkout becomes this run's use
        return Worktree(volume, repo.mount_name, commit, reused=False)

    async def use(self, worktree: Worktree) -> Worktree:
        """Take a use of a worktree already checked out (a restart's)."""
        await self._locks[worktree.volume].acquire_read()
        return worktree

    def release(self, worktree: Worktree) -> None:
        self._locks[worktree.volume].release_read()

    async def _check_out(self, run_id: int, task: Task, index: int, repo: Repository,
                         volume: str, writer: LogWriter) -> str:
        await self.engine.create_volume(volume, volume_labels(task.owner, repo))  # or keep it
        await self.state.call(self.state.worktree_checking_out, volume, task.owner, repo.entry)
        commit = await self._run_checkout(run_id, task, index, repo, volume, writer)
        if not repo.mutable and commit != repo.revision:
            raise CheckoutFailed(f"{repo.mount_name}: checked out {commit}, not {repo.revision}")
        await self.state.call(self.state.worktree_ready, volume, commit)
        return commit

    async def _run_checkout(self, run_id: int, task: Task, index: int, repo: Repository,
                            volume: str, writer: LogWriter) -> str:
        image = await self.ensure_image()
        stream = writer.stream(f"checkout:{repo.mount_name}")
        container = checkout_container(
            name=f"efci-{self.instance}-{run_id}-checkout-{index}",
            image=image, volume=volume, repo=repo,
            key=self.keys.checked(self.keys.private_path(task.owner, repo.key), private=True),
            known_hosts=self.keys.checked(self.keys.known_hosts(task.owner), private=False),
            network="host" if self.cfg.network_checkout == "host" else self.cfg.network_name,
            unchecked_host_keys=task.unchecked_host_keys,
            labels={"instance": self.instance, "run": str(run_id)})
        if task.unchecked_host_keys:
            writer.message(f"{repo.mount_name}: WARNING: host keys are not checked for this "
                           "checkout (checkout.unchecked_host_keys); a machine in the middle "
                           "could serve another repository")
        writer.message(f"{repo.mount_name}: checking out {repo.revision} of {repo.repo_url} "
                       f"into {volume}")
        writer.event(Kind.MARKER, {"step": "checkout", "name": repo.mount_name,
                                   "event": "start"})
        tail = b""
        cols, rows = self.cfg.terminal_size
        began = time.monotonic()
        async with self.engine.run_attached(container, cols=cols, rows=rows) as terminal:
            while data := await terminal.receive_some():
                writer.output(data, stream)
                tail = (tail + data)[-4096:]
            status = await terminal.wait()
        _time_steps(began, checkout_steps(tail))
        writer.event(Kind.MARKER, {"step": "checkout", "name": repo.mount_name, "event": "end"})
        heads = HEAD_LINE.findall(tail)
        if status != 0 or not heads:
            raise CheckoutFailed(
                f"checkout of {repo.repo_url} at {repo.revision!r} failed (exit status "
                f"{status}); its output is in the log, stream checkout:{repo.mount_name}")
        return str(heads[-1].decode())


def _time_steps(began: float, steps: list[tuple[str, float]]) -> None:
    """The checkout container's phases: its start (docker's part, until the
    program's first clock reading), each step the program timed, its exit
    (until docker told us)."""
    if not steps or not began <= steps[0][1] <= steps[-1][1] <= time.monotonic():
        return  # no readings, or not on this clock: only the whole is known
    timings.add("container start", began, steps[0][1])
    for (_, start), (name, end) in itertools.pairwise(steps):
        timings.add(name, start, end)
    timings.since("container exit", steps[-1][1])
