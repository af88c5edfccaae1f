"""Integration tests: the real agent process against the real dockerd.

They need root, a dockerd that answers and the base image.  Run by hand
without those they skip, saying why; under CI (CI=true) they fail instead,
because a CI that skips them proves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import Client
from agent.errors import AgentUnreachable
from agent.host import firewall
from agent.host.git import worktree_volume_name
from agent.host.mounts import mounted_under

from .gitserver import GitServer

BASE_IMAGE = "efci/base:bookworm"


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root"
    try:
        subprocess.run(["docker", "version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "dockerd does not answer (scripts/test starts it)"
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                      capture_output=True, check=False).returncode != 0:
        return f"{BASE_IMAGE} is missing (scripts/build-base-image builds it)"
    return None


@pytest.fixture(scope="session", autouse=True)
def prerequisites() -> None:
    problem = _missing_prerequisite()
    if problem:
        if os.environ.get("CI") or os.environ.get("EFCI_REQUIRE_INTEGRATION"):
            pytest.fail(f"CI must run the integration tests, but {problem}")
        pytest.skip(problem)


class AgentProcess:
    """An ``efci agent`` on its own --root, and the efci client beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "etc/conf.d").mkdir(parents=True, exist_ok=True)
        self.log = root / "agent.log"

    @property
    def conf_d(self) -> Path:
        return self.root / "etc/conf.d"

    def declare(self, name: str, text: str) -> None:
        (self.conf_d / name).write_text(text)

    def configure(self, text: str) -> None:
        (self.root / "etc/agent.yml").write_text(text)

    def start(self, *, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--root", str(self.root), "agent"],
                stdout=subprocess.DEVNULL, stderr=log)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n"
                                     + self.log.read_text())
            with contextlib.suppress(AgentUnreachable, FileNotFoundError):
                with self.client() as c:
                    c.call("ping")
                return
            time.sleep(0.1)
        raise AssertionError("agent did not answer in time:\n" + self.log.read_text())

    def client(self) -> Client:
        return Client(self.root / "run/agent.sock", timeout=120)

    def efci(self, *args: str, check: bool = True, timeout: float = 120,
             **kw: object) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([sys.executable, "-m", "agent", "--root", str(self.root), *args],
                                capture_output=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
        if check and result.returncode != 0:
            raise AssertionError(f"efci {' '.join(args)} -> {result.returncode}\n"
                                 f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}")
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90, *,
             drain: bool = False) -> int:
        """Stop the agent with ``sig``; a SIGTERM is sent twice (the second
        cancels running runs at once) unless the test wants the drain."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig == signal.SIGTERM and not drain:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return self.proc.wait(timeout=1)
                self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def instance(self) -> str | None:
        db = self.root / "state/state.db"
        if not db.exists():
            return None
        conn = sqlite3.connect(db)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='instance'").fetchone()
        finally:
            conn.close()
        return str(row[0]) if row else None

    def containers(self, *, running: bool = False) -> list[str]:
        instance = self.instance()
        if instance is None:
            return []
        argv = ["docker", "ps", "--quiet",
                "--filter", f"label=org.efforting-ci.instance={instance}"]
        if not running:
            argv.append("--all")
        out = subprocess.run(argv, capture_output=True, check=True).stdout.decode()
        return out.split()

    def cleanup(self) -> None:
        """Stop the agent (gracefully, so it removes its rules and mounts),
        then remove whatever is left of it, even after a failed test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # again: cancel running runs now, not after runs.drain
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        ids = self.containers()
        if ids:
            subprocess.run(["docker", "rm", "--force", *ids], capture_output=True, check=False)
        instance = self.instance()
        if instance:  # what efci shell left for a restart carries the instance's labels
            images = subprocess.run(["docker", "images", "--quiet", "--filter",
                                     f"label=org.efforting-ci.instance={instance}"],
                                    capture_output=True, text=True, check=False).stdout.split()
            if images:
                subprocess.run(["docker", "rmi", "--force", *set(images)], capture_output=True,
                               check=False)
            volumes = subprocess.run(["docker", "volume", "ls", "--quiet", "--filter",
                                      f"label=org.efforting-ci.instance={instance}"],
                                     capture_output=True, text=True, check=False).stdout.split()
            if volumes:  # the runs' writable layers
                subprocess.run(["docker", "volume", "rm", "--force", *volumes],
                               capture_output=True, check=False)
        firewall.remove(firewall.rule_sets("efci0", ()))  # after a killed agent
        for point in mounted_under(self.root):
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path / "root")
    try:
        yield a
    finally:
        a.cleanup()


OWNER = "alice"


class Setup:
    """An agent and a git server, with helpers to declare and run tasks that
    check out from it."""

    def __init__(self, agent: AgentProcess, server: GitServer) -> None:
        self.agent, self.server = agent, server
        self.volumes: list[str] = []

    def key(self, name: str = "deploy") -> str:
        """Create a deploy key through efci; returns its public half."""
        out = json.loads(self.agent.efci("--json", "key", "create", name, "--owner", OWNER).stdout)
        return str(out["public_key"])

    def trust(self) -> None:
        keys = self.agent.root / "hostkey.pub"
        keys.write_text(self.server.host_key_line)
        self.agent.efci("key", "trust", self.server.address, "--port", str(self.server.port),
                        "--owner", OWNER, "--keys", str(keys))

    def declare(self, tasks: dict[str, dict]) -> None:  # type: ignore[type-arg]
        self.agent.declare("tasks.yml", json.dumps({"owner": OWNER, "tasks": tasks}))
        result = self.agent.efci("reload", check=False)
        assert result.returncode == 0, result.stderr

    def entry(self, repo: str, revision: str, *, mutable: bool, key: str = "deploy",
              **extra: object) -> dict[str, object]:
        entry = {"repo_url": self.server.url(repo), "revision": revision, "mutable": mutable,
                 "key": key, "submodules": False, **extra}
        self.volumes.append(worktree_volume_name(OWNER, entry))
        return entry

    def run(self, task: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        result = self.agent.efci("run", "--follow", task, check=False, timeout=300)
        run_id = json.loads(self.agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
        return result.returncode, json.loads(
            self.agent.efci("--json", "show", str(run_id)).stdout)

    def output(self, run: int, stream: str = "task") -> bytes:
        return self.agent.efci("logs", "--raw", "--stream", stream, str(run)).stdout


@pytest.fixture
def setup(agent: AgentProcess, tmp_path: Path) -> Iterator[Setup]:
    server = GitServer(tmp_path / "git")
    server.start()
    agent.start()
    s = Setup(agent, server)
    try:
        yield s
    finally:
        server.stop()
        agent.cleanup()
        if s.volumes:
            subprocess.run(["docker", "volume", "rm", "--force", *set(s.volumes)],
                           capture_output=True, check=False)


def task(image: str = BASE_IMAGE, **kw: object) -> dict:  # type: ignore[type-arg]
    return {"image": image, "command": ["true"], **kw}
