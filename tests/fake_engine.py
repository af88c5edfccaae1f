"""A fake container engine and fake kernel mounts, for unit tests of whole
run lifecycles in milliseconds.  It keeps to the Engine contract: the same
contract tests (tests/engine_contract.py) run against it and against the
docker CLI engine in the integration tests, so it cannot drift.

A container's behaviour is a *program*: an async function given a terminal
to write to, returning the exit status.  Programs are chosen by the
container's command (task and one-shot containers alike); an unknown
command exits 0 at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.errors import CommandFailed
from agent.host.engine import (
    LABEL_PREFIX,
    ContainerSpec,
    ContainerState,
    NetworkSpec,
    OneShot,
    Output,
)

Program = Callable[["FakeTerminal"], Awaitable[int]]


class FakeTerminal:
    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](1000)
        self.typed = bytearray()
        self.exit_status: int | None = None
        self.kept: bytearray | None = None  # the container's kept output (log_keep)
        self.container_id: str | None = None  # run_container's, once created
        self.created_at: float | None = None

    async def created(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return self.container_id

    async def write(self, data: bytes) -> None:
        if not data:
            return  # a terminal never reads as empty but at its end
        if self.kept is not None:
            self.kept += data
        await self._send.send(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return b""

    async def send_all(self, data: bytes) -> None:
        self.typed += data

    def resize(self, cols: int, rows: int) -> None:
        pass

    async def wait(self) -> int:
        return self.exit_status if self.exit_status is not None else 137


def prints(data: bytes, status: int = 0) -> Program:
    async def program(terminal: FakeTerminal) -> int:
        await terminal.write(data)
        return status
    return program


def sleeps(seconds: float = float("inf"), status: int = 0) -> Program:
    async def program(terminal: FakeTerminal) -> int:
        await trio.sleep(seconds)
        return status
    return program


def checks_out(sha: str = "a" * 40) -> Program:
    """What efci-checkout prints when it succeeds: its steps on the real
    monotonic clock (as the container shares the host's), then HEAD."""
    async def program(terminal: FakeTerminal) -> int:
        now = time.monotonic()  # steps 10 µs each, over before the agent reads them
        steps = " ".join(f"{step}={now + i / 1e5:.6f}"
                         for i, step in enumerate(("begin", "fetch", "checkout", "mtimes")))
        await terminal.write(f"cloning...\r\nefci-checkout: steps {steps}\r\n"
                             f"efci-checkout: HEAD {sha}\r\n".encode())
        return 0
    return program


@dataclass
class FakeContainer:
    id: str
    name: str
    command: tuple[str, ...]
    status: str = "created"
    exit_code: int = 0
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    starts: int = 0
    stops: int = 0
    scope: trio.CancelScope | None = None  # its program's, while it runs
    kept: bytearray | None = None  # its output since its last start, if docker keeps it


def _id_of(image: str) -> str:
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass
class FakeEngine:
    """The Engine, in memory.  ``programs`` maps a command to its program;
    ``stop_takes`` is how long a stop of a running container takes."""

    volumes_root: Path
    programs: dict[tuple[str, ...], Program] = field(default_factory=dict)
    images: set[str] = field(default_factory=lambda: {"efci/base:bookworm"})
    stop_takes: float = 0
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    networks: dict[str, NetworkSpec] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # container names, in order

    def _find(self, container: str) -> FakeContainer | None:
        for c in self.containers.values():
            if container in (c.id, c.name):
                return c
        return None

    async def version(self) -> str:
        return "fake"

    async def root_dir(self) -> Path:
        return self.volumes_root

    async def present_images(self, refs: set[str]) -> set[str]:
        return refs & self.images

    async def image_exists(self, ref: str) -> bool:
        return ref in self.images

    async def image_id(self, ref: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return _id_of(ref) if ref in self.images else None

    async def build(self, tag: str, context: Path, *, output: Output,
                    dockerfile: Path | None = None, inline: str | None = None,
                    build_args: dict[str, str] | None = None,
                    labels: dict[str, str] | None = None) -> int:
        output(f"built {tag}\n".encode())
        self.images.add(tag)
        return 0

    async def remove_image(self, ref: str) -> None:
        self.images.discard(ref)

    async def commit(self, container: str, image: str) -> None:
        if self._find(container) is None:
            raise CommandFailed(["docker", "commit"], 1, b"", b"No such container")
        self.images.add(image)

    async def create(self, spec: ContainerSpec) -> str:
        await trio.lowlevel.checkpoint()
        if self._find(spec.name) is not None:
            raise CommandFailed(["docker", "create"], 125, b"",
                                f"Conflict. The container name {spec.name} is in use".encode())
        if spec.image not in self.images | {_id_of(image) for image in self.images}:
            raise CommandFailed(["docker", "create"], 125, b"",
                                f"Unable to find image '{spec.image}' locally".encode())
        c = FakeContainer(secrets.token_hex(32), spec.name, spec.command or (), image=spec.image,
                          labels={LABEL_PREFIX + k: v for k, v in spec.labels.items()},
                          kept=bytearray() if spec.tty and spec.log_keep else None)
        self.containers[c.id] = c
        return c.id

    async def _play(self, c: FakeContainer, terminal: FakeTerminal) -> None:
        """The container's program; the terminal ends when it does."""
        program = self.programs.get(c.command, prints(b""))
        c.status, c.starts = "running", c.starts + 1
        if c.kept is not None:
            c.kept.clear()
            terminal.kept = c.kept
        async with terminal._send:  # closed last: a reader at its end sees the exit
            status = 137
            with trio.CancelScope() as c.scope:
                status = await program(terminal)
            if c.status == "running":  # not stopped meanwhile
                c.status, c.exit_code = "exited", status
            terminal.exit_status = c.exit_code

    @asynccontextmanager
    async def attach(self, container: str, *, cols: int, rows: int,
                     interactive: bool = False) -> AsyncIterator[FakeTerminal]:
        c = self._find(container)
        if c is None:
            raise CommandFailed(["docker", "start"], 1, b"", b"No such container")
        terminal = FakeTerminal()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._play, c, terminal)
            yield terminal
            nursery.cancel_scope.cancel()  # detached: the container goes on "running"

    @asynccontextmanager
    async def run_container(self, spec: ContainerSpec, *, cols: int,
                            rows: int) -> AsyncIterator[FakeTerminal]:
        """Like docker run: a failed create is the client's output and exit
        status 125, with no container."""
        try:
            container = await self.create(spec)
        except CommandFailed as e:
            terminal = FakeTerminal()
            async with terminal._send:
                await terminal.write(e.stderr)
            terminal.exit_status = 125
            yield terminal
            return
        async with self.attach(container, cols=cols, rows=rows) as terminal:
            terminal.container_id, terminal.created_at = container, time.monotonic()
            yield terminal

    @asynccontextmanager
    async def run_attached(self, spec: OneShot, *, cols: int,
                           rows: int) -> AsyncIterator[FakeTerminal]:
        c = FakeContainer(secrets.token_hex(32), spec.name, spec.args, image=spec.image)
        self.containers[c.id] = c
        try:
            async with self.attach(c.id, cols=cols, rows=rows) as terminal:
                yield terminal
        finally:
            await self.remove(spec.name)

    async def run(self, spec: OneShot) -> tuple[int, bytes]:
        output = bytearray()
        async with self.run_attached(spec, cols=80, rows=24) as terminal:
            while data := await terminal.receive_some():
                output += data
            return await terminal.wait(), bytes(output)

    async def inspect(self, container: str) -> ContainerState | None:
        await trio.lowlevel.checkpoint()
        c = self._find(container)
        if c is None:
            return None
        image = c.image if c.image.startswith("sha256:") else _id_of(c.image)
        return ContainerState(c.status, c.exit_code, image, False, "", c.kept is not None,
                              id=c.id)

    @asynccontextmanager
    async def kept_output(self, container: str,
                          since: str) -> AsyncIterator[trio.abc.ReceiveStream]:
        c = self._find(container)
        if c is None or c.kept is None:
            raise CommandFailed(["docker", "logs"], 1, b"", b"no kept output")
        yield _KeptOutput(c)

    async def stop(self, container: str, *, grace: int) -> None:
        c = self._find(container)
        if c is not None and c.status == "running":
            c.stops += 1
            await trio.sleep(self.stop_takes)
            c.status, c.exit_code = "exited", 143
            if c.scope is not None:
                c.scope.cancel()  # the attached client sees the end
        await trio.lowlevel.checkpoint()

    async def remove(self, container: str) -> None:
        c = self._find(container)
        if c is not None:
            del self.containers[c.id]
            self.removed.append(c.name)
        await trio.lowlevel.checkpoint()

    async def volume_exists(self, name: str) -> bool:
        return name in self.volumes

    async def create_volume(self, name: str, labels: dict[str, str]) -> None:
        self.volumes.setdefault(name, dict(labels))

    async def volume_path(self, name: str) -> Path:
        if name not in self.volumes:
            raise CommandFailed(["docker", "volume", "inspect"], 1, b"", b"no such volume")
        path = self.volumes_root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def labelled_images(self, labels: dict[str, str]) -> list[str]:
        return []

    async def container_sizes(self, names: list[str]) -> dict[str, int]:
        return {}

    async def image_config(self, ref: str) -> tuple[list[str], list[str]]:
        return [], []

    async def remove_volumes(self, names: list[str]) -> None:
        for name in names:
            self.volumes.pop(name, None)

    async def labelled(self, kind: str, labels: dict[str, str], key: str) -> dict[str, str]:
        items = ({c.name: c.labels for c in self.containers.values()} if kind == "container"
                 else self.volumes)
        return {name: have.get(LABEL_PREFIX + key, "") for name, have in items.items()
                if all(have.get(LABEL_PREFIX + k) == v for k, v in labels.items())}

    async def network(self, name: str) -> NetworkSpec | None:
        return self.networks.get(name)

    async def create_network(self, spec: NetworkSpec) -> None:
        self.networks[spec.name] = spec


class FakeMounts:
    """The kernel's mounts, as a set of mount points."""

    def __init__(self) -> None:
        self.points: set[Path] = set()
        self.mounted_ever = 0

    async def mount_overlay(self, lowers: Sequence[Path], upper: Path, work: Path,
                            target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        self.points.add(target)
        self.mounted_ever += 1

    async def unmount(self, target: Path) -> None:
        self.points.discard(target)
        await trio.lowlevel.checkpoint()

    def mounted_under(self, root: Path, mountinfo: str | None = None) -> list[Path]:
        return sorted((p for p in self.points if p == root or root in p.parents),
                      key=lambda p: len(p.parts), reverse=True)


class FakeNetwork:
    """The task network, always in place."""

    last_probe = None

    async def check(self) -> list[str]:
        return []

    async def problems(self) -> list[str]:
        return []


class _KeptOutput(trio.abc.ReceiveStream):
    """What the container kept, up to now."""

    def __init__(self, c: FakeContainer) -> None:
        self._c = c
        self._at = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        assert self._c.kept is not None
        await trio.lowlevel.checkpoint()
        data = bytes(self._c.kept[self._at:self._at + (max_bytes or 65536)])
        self._at += len(data)
        return data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
