"""Plain data: what declarations say and what a run is. No I/O here."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Repository:
    """One entry of a task's ``checkout.repositories``.

    ``entry`` is the entry exactly as declared (keys and typed values); the
    base worktree volume's name is a hash of it, so it must not be normalised.
    """

    repo_url: str
    revision: str
    mutable: bool
    key: str
    submodules: bool
    mount_name: str
    entry: dict[str, object]


@dataclass(frozen=True)
class CacheUse:
    """One entry of a task's ``caches``: the owner's cache NAME at PATH."""

    name: str
    path: str  # inside the container
    quota: int | None  # bytes; None: agent.yml's caches.default_quota
    shared: bool  # several tasks of the owner may declare it
    layered: bool = False  # a read-only snapshot under a per-run upper layer
    promote_on_success: bool = False  # layered: a succeeded run's view becomes the next snapshot
    source: str = ""  # file:line of the entry, for messages


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline; what it leaves None (or unset) it inherits
    from its task (:meth:`Task.stage_task`)."""

    name: str
    image: str | None
    command: tuple[str, ...] | None
    env: dict[str, str]  # added to the task's
    time_limit: int | None
    secrets: tuple[str, ...] | None = None
    caches: tuple[CacheUse, ...] | None = None
    deploy_targets: tuple[str, ...] | None = None
    allow_failure: bool = False  # a failure is recorded, and the pipeline goes on


@dataclass(frozen=True)
class Image:
    """An image declaration: built from a Dockerfile and a context."""

    name: str
    source: str  # file:line of the declaration
    context: Path
    dockerfile: Path | None
    inline: str | None


@dataclass(frozen=True)
class Limits:
    """A task container's resources, as its declaration sets them (None:
    agent.yml's default; a declaration cannot go past agent.yml's maxima)."""

    cpus: float | None = None
    memory: int | None = None  # bytes of memory, swap not included
    swap: int | None = None  # bytes of swap beyond memory
    pids: int | None = None  # processes and threads at once
    disk: int | None = None  # bytes in its writable layers: /src's upper layers, its own layer


@dataclass(frozen=True)
class PushTrigger:
    """``on: {push: {branches: [...], tags: [...]}}``: glob patterns (``*``
    within a path component, ``**`` across them) of the refs that start it."""

    branches: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


class Network(enum.Enum):
    DEFAULT = "default"
    NONE = "none"


@dataclass(frozen=True)
class Task:
    name: str
    owner: str
    source: str  # file:line of the declaration, for messages
    image: str
    command: tuple[str, ...] | None  # None: the image's own CMD
    env: dict[str, str] = field(default_factory=dict)
    repositories: tuple[Repository, ...] = ()
    secrets: tuple[str, ...] = ()
    caches: tuple[CacheUse, ...] = ()
    deploy_targets: tuple[str, ...] = ()  # names from agent.yml, or absolute paths
    network: Network = Network.DEFAULT
    time_limit: int | None = None  # seconds; None: agent.yml's default
    stages: tuple[Stage, ...] = ()
    # Only when the declaration asks: clone from hosts whose key is not pinned.
    unchecked_host_keys: bool = False
    on_push: PushTrigger | None = None  # None: started by hand only
    limits: Limits = field(default_factory=lambda: Limits())

    @property
    def qualified_name(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def all_caches(self) -> tuple[CacheUse, ...]:
        """The caches it or any of its stages use, each once."""
        found = {c.name: c for c in self.caches}
        for stage in self.stages:
            for c in stage.caches or ():
                found.setdefault(c.name, c)
        return tuple(found.values())

    def stage_task(self, stage: Stage) -> Task:
        """The task as one of its stages runs it: the stage's own image,
        command, time limit, secrets, caches and deploy targets where it sets
        them, the task's where not; the environment is the task's with the
        stage's added.  Checkout, network and owner are the task's."""
        return dataclasses.replace(
            self, image=stage.image or self.image,
            command=stage.command if stage.command is not None else self.command,
            env={**self.env, **stage.env}, time_limit=stage.time_limit or self.time_limit,
            secrets=self.secrets if stage.secrets is None else stage.secrets,
            caches=self.caches if stage.caches is None else stage.caches,
            deploy_targets=(self.deploy_targets if stage.deploy_targets is None
                            else stage.deploy_targets),
            stages=())


class RunStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the task exited non-zero: a result, not an agent fault
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    ERROR = "error"  # the agent could not run it (docker failed, image missing, ...)

    @property
    def finished(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


@dataclass(frozen=True)
class Requester:
    """Who asked, from SO_PEERCRED on the control socket."""

    uid: int
    gid: int
    pid: int
