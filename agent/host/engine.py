"""The container engine as the rest of the agent sees it: one small
interface (Woodpecker's pipeline backend is the model), what goes in and out
of it as plain data, and nothing of how.  :class:`agent.host.docker.DockerCLI`
is the implementation (the only code that builds a docker command line);
the unit tests have a fake one, and one contract suite runs against both.

Call order for a task container: :meth:`Engine.create`, then
:meth:`Engine.attach` (once, or again for a restart), :meth:`Engine.inspect`
for how it ended, :meth:`Engine.stop` to cut it short, :meth:`Engine.remove`
at the end.  Every destroy (stop, remove, remove_image, remove_volumes) is
idempotent: what is already gone is not an error.  Calls may be made
concurrently from several tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

LABEL_PREFIX = "org.efforting-ci."


@dataclass(frozen=True)
class Mount:
    kind: str  # "volume" or "bind"
    source: str  # a volume name or a host path
    target: str
    readonly: bool


@dataclass(frozen=True)
class ContainerSpec:
    """A task (or shell) container; never host networking, privileges,
    devices or the docker socket (the implementation refuses them)."""

    name: str
    image: str
    command: tuple[str, ...] | None
    network: str  # "none" or a network name; never "host"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # without LABEL_PREFIX
    mounts: tuple[Mount, ...] = ()
    tty: bool = False
    interactive: bool = False  # keep stdin open (efci shell)
    entrypoint: str | None = None
    # docker keeps this much of its output itself (a TTY container's), so
    # that what it prints while no agent reads can be read later; None: none
    log_keep: int | None = None
    memory: int | None = None  # bytes of memory
    swap: int | None = None  # bytes of swap beyond memory (with memory only)
    pids: int | None = None  # processes and threads at once
    cpus: float | None = None  # CPU time, in CPUs


@dataclass(frozen=True)
class OneShot:
    """A container that runs once and is removed when it ends: the checkout
    container, the network probe.  Capabilities are dropped (``cap_drop``)
    and only ``cap_add`` given back."""

    name: str
    image: str
    args: tuple[str, ...]  # after the image: its command or its entrypoint's arguments
    network: str  # may be "host" (the checkout container runs only git)
    mounts: tuple[Mount, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # without LABEL_PREFIX
    cap_drop: tuple[str, ...] = ("ALL",)
    cap_add: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerState:
    status: str  # created, running, exited, ...
    exit_code: int
    image_id: str
    oom_killed: bool  # the kernel's OOM killer stopped a process in it
    started_at: str = ""  # when it last started (RFC 3339, as docker gives it)
    keeps_output: bool = False  # docker keeps its output (log_keep): kept_output works
    writable_dir: str = ""  # the host directory of its own writable layer, if docker says
    id: str = ""


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    bridge: str  # the interface
    subnet: str
    gateway: str
    icc: bool = False  # may containers on it reach each other?
    labels: dict[str, str] = field(default_factory=dict)  # without LABEL_PREFIX


class Terminal(Protocol):
    """A process attached to a terminal (a container's TTY through ours)."""

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Output as it comes; ``b""`` once the process and the terminal are gone."""

    async def send_all(self, data: bytes) -> None:
        """Type into it (an interactive attach)."""

    def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self) -> int:
        """The attached client's exit status (for a task: see inspect)."""


class Started(Terminal, Protocol):
    """A container that one docker command creates and starts, attached."""

    async def created(self) -> str | None:
        """Its id, once docker has created it; None if docker ended without
        creating one (its output says why)."""

    @property
    def created_at(self) -> float | None:
        """When (monotonic) docker had created it, once :meth:`created` knows."""


Output = Callable[[bytes], object]


class Engine(Protocol):
    async def version(self) -> str:
        """The engine's version; raises CommandFailed when it does not answer."""

    async def root_dir(self) -> Path: ...

    # -- images --
    async def present_images(self, refs: set[str]) -> set[str]:
        """Which of ``refs`` exist locally."""

    async def image_exists(self, ref: str) -> bool: ...

    async def image_id(self, ref: str) -> str | None:
        """The id of the image ``ref`` names now, found without a process
        (None if there is none, or the engine cannot tell that way): a run
        then runs that very image, and knows which without asking docker."""

    async def build(self, tag: str, context: Path, *, output: Output,
                    dockerfile: Path | None = None, inline: str | None = None,
                    build_args: dict[str, str] | None = None,
                    labels: dict[str, str] | None = None) -> int:
        """Build ``tag``, its output (stdout and stderr) handed to ``output``
        as it comes; returns the build's exit status."""

    async def remove_image(self, ref: str) -> None: ...

    async def labelled_images(self, labels: dict[str, str]) -> list[str]:
        """``repository:tag`` of every image carrying all ``labels`` (without
        LABEL_PREFIX; a value of "" matches any value)."""

    async def container_sizes(self, names: list[str]) -> dict[str, int]:
        """Bytes each container's writable layer holds (of those that exist)."""

    async def image_config(self, ref: str) -> tuple[list[str], list[str]]:
        """The image's own entrypoint and command (each possibly empty)."""

    async def commit(self, container: str, image: str) -> None:
        """An image of the container's filesystem as it is now."""

    # -- containers --
    async def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; returns its id."""

    def attach(self, container: str, *, cols: int, rows: int,
               interactive: bool = False) -> AbstractAsyncContextManager[Terminal]:
        """Start the container attached to a terminal of this size.  Leaving
        the block detaches (the container itself goes on until stopped)."""

    def run_container(self, spec: ContainerSpec, *, cols: int,
                      rows: int) -> AbstractAsyncContextManager[Started]:
        """Create and start a container attached to a terminal of this size,
        in one step (one docker process where create and attach take two).
        Leaving the block detaches; the container goes on until stopped,
        and stays after it ends."""

    def run_attached(self, spec: OneShot, *, cols: int,
                     rows: int) -> AbstractAsyncContextManager[Terminal]:
        """Run a one-shot container attached to a terminal; on leaving the
        block, also when cancelled, it is gone."""

    async def run(self, spec: OneShot) -> tuple[int, bytes]:
        """Run a one-shot container to its end: (exit status, its output)."""

    async def inspect(self, container: str) -> ContainerState | None:
        """Its state, or None if there is no such container."""

    def kept_output(self, container: str,
                    since: str) -> AbstractAsyncContextManager[trio.abc.ReceiveStream]:
        """What a TTY container printed since ``since`` (RFC 3339 or Unix
        seconds.nanoseconds, as docker logs --since takes them) as docker
        kept it (``log_keep``), byte for byte, up to now."""

    async def stop(self, container: str, *, grace: int) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""

    async def remove(self, container: str) -> None: ...

    # -- volumes --
    async def volume_exists(self, name: str) -> bool: ...

    async def create_volume(self, name: str, labels: dict[str, str]) -> None:
        """Labels are given whole (the experiment's ``ci.*`` ones have no
        prefix).  Creating one that exists keeps it as it is, labels too."""

    async def volume_path(self, name: str) -> Path:
        """The host directory holding the volume's data."""

    async def remove_volumes(self, names: list[str]) -> None: ...

    async def labelled(self, kind: str, labels: dict[str, str], key: str) -> dict[str, str]:
        """Containers (``kind`` "container") or volumes ("volume") carrying all
        ``labels`` (without LABEL_PREFIX): each one's name, and the value of
        its label ``key`` ("" if it has none)."""

    # -- networks --
    async def network(self, name: str) -> NetworkSpec | None:
        """The network as it is, or None if there is none of that name."""

    async def create_network(self, spec: NetworkSpec) -> None: ...
