"""The run lifecycle: queued -> running -> a result.

A run is recorded (queued) before anything happens and waits for a free
slot (``runs.max_parallel``).  Then, as in the seed's two-step sequence:
its repositories are checked out into their base worktree volumes by the
checkout container (or reused), and its task container is created, recorded
and run attached, with every byte of output going to its log.  Its end is
one of:

* succeeded / failed: the task exited 0 / non-zero, or its checkout failed
  (a result, not a fault);
* timed_out: its time limit passed; the container was stopped;
* cancelled: ``efci cancel`` or the agent stopping; the container was stopped;
* error: the agent could not run it (docker refused, image missing...).

Whatever happens, the status and the log are kept; teardown (stopping the
container) runs shielded with a deadline, so cancellation cannot skip it.
The finished container is kept, stopped, as the seed's lifecycle wants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import trio

from . import diskspace, timings
from .access import deploy_targets, host_mounts, sweep_target
from .caches import Caches
from .checkout import Checkouts, Worktree
from .config import AgentConfig
from .environment import Environment, Environments, Take, shielded
from .errors import (
    CommandFailed,
    Conflict,
    EfciError,
    NotFound,
    RequestError,
    RunFailed,
    internal_error,
)
from .host import cgroups, docker, mounts
from .host.engine import ContainerSpec, ContainerState, Engine, Mount, Started, Terminal
from .images import Images
from .logformat import TASK_STREAM, Kind
from .logstore import LogStore, LogWriter
from .model import (
    CacheUse,
    Image,
    Limits,
    Network,
    PushTrigger,
    Repository,
    Requester,
    RunStatus,
    Stage,
    Task,
)
from .mutations import Mutations
from .names import format_size, human_size
from .network import TaskNetwork
from .progress import MOUNT_POINT, ProgressChannels, Update
from .runqueue import RunQueue
from .state import RunRecord, StateStore
from .timings import Timings

log = logging.getLogger(__name__)

# Longest stopping a container may take beyond its grace period.
TEARDOWN_SLACK = 30
PIDS_POLL_INTERVAL = 0.5
DISK_POLL_INTERVAL = 1.0  # at least this long between counts of a run's writable layers
SAVE_RETRY_INTERVAL = 2.0
SPACE_POLL_INTERVAL = 5.0
FINAL_STATUSES = {s.value for s in RunStatus if s.finished}
RESUMED_POLL_INTERVAL = 1.0  # a re-attached run's container, until it ends
KEPT_OUTPUT_DEADLINE = 600  # reading docker's copy of a re-attached run's output


def task_to_wire(task: Task) -> dict[str, Any]:
    """A task as plain JSON data (for the CLI and the run's snapshot)."""
    data = dataclasses.asdict(task)
    data["network"] = task.network.value
    return data


def task_from_wire(data: dict[str, Any]) -> Task:
    """The run's snapshot of its task, back: a restart runs what ran, even if
    the declaration changed since."""

    def tuple_or_none(value: Any) -> tuple[str, ...] | None:
        return None if value is None else tuple(value)

    return Task(**{
        **data,
        "command": tuple_or_none(data["command"]),
        "repositories": tuple(Repository(**r) for r in data["repositories"]),
        "secrets": tuple(data["secrets"]),
        "caches": tuple(CacheUse(**c) for c in data["caches"]),
        "deploy_targets": tuple(data["deploy_targets"]),
        "network": Network(data["network"]),
        "stages": tuple(Stage(**{
            **s, "command": tuple_or_none(s["command"]),
            "secrets": tuple_or_none(s.get("secrets")),
            "caches": None if s.get("caches") is None else tuple(
                CacheUse(**c) for c in s["caches"]),
            "deploy_targets": tuple_or_none(s.get("deploy_targets"))}) for s in data["stages"]),
        "on_push": None if data.get("on_push") is None else PushTrigger(
            branches=tuple(data["on_push"]["branches"]), tags=tuple(data["on_push"]["tags"])),
        "limits": Limits(**data.get("limits", {})),  # none in snapshots before limits
    })


def with_log_loss(fields: dict[str, Any], writer: LogWriter) -> dict[str, Any]:
    """A run's end fields, saying that its log lost bytes and why."""
    error = f"{writer.lost_bytes} bytes of its log could not be written ({writer.lost_reason})"
    if fields.get("error"):
        error += f"; {fields['error']}"
    elif fields.get("exit_code") is not None:
        error += f"; the task exited with status {fields['exit_code']}"
    return {**fields, "error": error}


def ended(state: ContainerState) -> tuple[RunStatus, dict[str, Any]]:
    """How a run ended, by its container's exit status: the one mapping."""
    status = RunStatus.SUCCEEDED if state.exit_code == 0 else RunStatus.FAILED
    return status, {"exit_code": state.exit_code, "image_id": state.image_id}


def _recovery_note(run_id: int, line: str) -> None:
    log.warning("run %d: %s", run_id, line)


def task_container_name(instance: str, run_id: int) -> str:
    return f"efci-{instance}-{run_id}"


def stage_container_name(instance: str, run_id: int, stage: str) -> str:
    return f"{task_container_name(instance, run_id)}-{stage}"


def patched_image(instance: str, run_id: int, stage: str | None = None) -> str:
    """What efci shell leaves of a run's (or a stage's) container for its
    next attempt."""
    return f"efci-patched/{instance}:{run_id}" + (f"-{stage}" if stage else "")


def container_spec(cfg: AgentConfig, instance: str, run_id: int, task: Task,
                   views: Sequence[tuple[Path, str]] = (),
                   host_mounts: Sequence[Mount] = ()) -> ContainerSpec:
    """The task container for a run: pure, so unit tests can check it.

    ``views`` are the run's overlay views of its worktrees (host path, mount
    name); each appears writable at /src/<name>."""
    cols, rows = cfg.terminal_size
    limits, _ = limits_of(cfg, task)
    return ContainerSpec(
        name=task_container_name(instance, run_id),
        image=task.image,
        command=task.command,
        network="none" if task.network is Network.NONE else cfg.network_name,
        # The docker client sizes the container's TTY only just after it
        # starts; COLUMNS and LINES tell the size to programs that look first.
        env={"COLUMNS": str(cols), "LINES": str(rows), **task.env},
        labels={"instance": instance, "run": str(run_id), "task": task.qualified_name},
        mounts=(*(Mount("bind", str(path), f"/src/{name}", readonly=False)
                  for path, name in views), *host_mounts),
        tty=True,
        log_keep=cfg.log_limit,
        memory=limits.memory,
        swap=limits.swap,
        pids=limits.pids,
        cpus=limits.cpus,
    )


def limits_of(cfg: AgentConfig, task: Task) -> tuple[Limits, dict[str, str]]:
    """The task container's resources: its declaration's, else agent.yml's
    defaults; and where each came from, for messages."""
    default = cfg.default_limits
    found, source = {}, {}
    for key in ("cpus", "memory", "swap", "pids", "disk"):
        declared = getattr(task.limits, key)
        found[key] = getattr(default, key) if declared is None else declared
        source[key] = (f"limits.{key} in agent.yml" if declared is None
                       else f"limits.{key} in {task.source}")
    return Limits(**found), source


@dataclass
class Attached:
    """How a container's attach ended."""

    status: int = -1  # the attached client's exit status (docker run's or start's)
    exited: float = 0.0  # when (monotonic)
    tail: bytes = b""  # the end of its output: docker's own words if it never started
    first_state: ContainerState | None = None  # as docker had it just after its start


@dataclass
class ActiveRun:
    id: int
    task: Task
    image: Image | None  # the declaration, when the task names a declared image
    build_only: bool  # efci image build: the build is the whole run
    attempt: int = 1  # efci restart starts the same container again as attempt 2, 3, ...
    container_id: str = ""  # once created (or, for a restart, the run's)
    image_id: str = ""  # the image its new container was asked to run, by id, if known before
    container_name: str = ""  # the container now running (a pipeline's stage's)
    stage_images: dict[str, Image] = field(default_factory=dict)  # declared, by stages
    from_stage: int = 0  # a retry of a pipeline: the first stage to run again
    restart_stage: int | None = None  # efci restart --stage: that stage's container again
    pids_limit_reached: int = 0  # forks that failed at limits.pids
    disk_taken: int = 0  # what its writable layers took when limits.disk stopped it
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancel_reason: str = ""
    timings: Timings = field(default_factory=Timings)  # from its queueing on
    done: trio.Event = field(default_factory=trio.Event)
    waiting: bool = True  # queued for a slot (max_parallel), nothing of it started yet
    keep_queued: bool = False  # the agent stops while it waits: it stays queued in the store
    resumed: RunRecord | None = None  # its container outlived the last agent: re-attached
    pushed_ref: str = ""  # the ref whose push started it, if one did

    def launch_state(self) -> str:
        """What the run needs to start after an agent restart, kept in the
        state store while it is queued (its task is the run's snapshot)."""
        return json.dumps({
            "image": _image_to_wire(self.image), "build_only": self.build_only,
            "attempt": self.attempt, "container_id": self.container_id,
            "stage_images": {k: _image_to_wire(v) for k, v in self.stage_images.items()},
            "from_stage": self.from_stage, "restart_stage": self.restart_stage,
            "pushed_ref": self.pushed_ref})

    @classmethod
    def relaunched(cls, run_id: int, task: Task, state: str) -> ActiveRun:
        data = json.loads(state)
        return cls(run_id, task, _image_from_wire(data["image"]), data["build_only"],
                   data["attempt"], container_id=data["container_id"],
                   stage_images={k: img for k, v in data["stage_images"].items()
                                 if (img := _image_from_wire(v)) is not None},
                   from_stage=data["from_stage"], restart_stage=data["restart_stage"],
                   pushed_ref=data["pushed_ref"])


def _image_to_wire(image: Image | None) -> dict[str, Any] | None:
    return None if image is None else {
        "name": image.name, "source": image.source, "context": str(image.context),
        "dockerfile": None if image.dockerfile is None else str(image.dockerfile),
        "inline": image.inline}


def _image_from_wire(data: dict[str, Any] | None) -> Image | None:
    return None if data is None else Image(
        data["name"], data["source"], Path(data["context"]),
        None if data["dockerfile"] is None else Path(data["dockerfile"]), data["inline"])


class Runs:
    """Starts runs in its own nursery, tracks them, stops them, and settles
    what a previous agent left unfinished.

    Call :meth:`recover` once before serving, then :meth:`serve` (via
    ``nursery.start``) before :meth:`start`; :meth:`shutdown` cancels every
    active run and waits until each has recorded its end.
    """

    def __init__(self, cfg: AgentConfig, engine: Engine, state: StateStore, logs: LogStore,
                 checkouts: Checkouts, mutations: Mutations, network: TaskNetwork,
                 caches: Caches, instance: str) -> None:
        self.cfg = cfg
        self.engine = engine
        self.state = state
        self.logs = logs
        self.checkouts = checkouts
        self.mutations = mutations
        self.network = network
        self.images = Images(engine, instance)
        self.caches = caches
        self.environments = Environments(checkouts, mutations, ProgressChannels(cfg.state_dir),
                                         caches)
        self.guards = mounts.Guards()
        self.instance = instance
        self.active: dict[int, ActiveRun] = {}
        self.queue: RunQueue[ActiveRun] = RunQueue(cfg.max_parallel)
        self.docker_root: Path | None = None  # told by the daemon, once dockerd answers
        self.short_of_space: list[str] = []  # why queued runs wait, if they do
        self._requeued: list[RunRecord] = []  # queued when the last agent stopped
        self._resumed: list[RunRecord] = []  # running when it stopped, and still running
        # Told of each run's end once it is recorded (the Gitea commit status).
        self.on_end: Callable[[int, Task, RunStatus], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._drain = trio.CancelScope()  # the graceful stop's wait for running runs
        self._hurried = False
        self._claimed: set[int] = set()  # finished runs with an efci shell open
        # Ends of runs the state store could not take (a full disk): kept,
        # shown, and saved as soon as it can take them again.
        self.unsaved_ends: dict[int, dict[str, Any]] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.logs.sync_forever)
            for record in self._resumed:  # they hold slots: first
                await self._relaunch(record, resumed=True)
            for record in self._requeued:  # ahead of every new run, in their order
                await self._relaunch(record)
            self._resumed, self._requeued = [], []
            task_status.started()
            while True:
                await trio.sleep(SAVE_RETRY_INTERVAL)
                await self.save_ends()

    # -- records ----------------------------------------------------------------

    async def save_ends(self) -> None:
        """Record the ends the state store could not take before."""
        for run_id, end in list(self.unsaved_ends.items()):
            try:
                await self.state.call(self.state.update_run, run_id, **end)
            except EfciError:
                return  # still unwritable; the next round tries again
            del self.unsaved_ends[run_id]
            log.info("run %d: its end (%s) is now saved", run_id, end["status"].value)

    async def record(self, run_id: int) -> RunRecord | None:
        """A run's record, with its end if that is not saved yet."""
        record = await self.state.call(self.state.get_run, run_id)
        return self._with_unsaved_end(record) if record else None

    def _with_unsaved_end(self, record: RunRecord) -> RunRecord:
        end = self.unsaved_ends.get(record.id)
        if end is None:
            return record
        note = "not saved yet: the state store cannot be written"
        return dataclasses.replace(record, **{
            **end, "error": f"{end['error']} ({note})" if end.get("error") else note})

    async def records(self, *, limit: int, **filters: str | None) -> list[RunRecord]:
        found = await self.state.call(self.state.list_runs, limit=limit, **filters)
        return [self._with_unsaved_end(r) for r in found]

    async def _finished_record(self, run_id: int) -> RunRecord:
        record = await self.record(run_id)
        if record is None:
            raise NotFound(f"no run {run_id}; see efci runs")
        if run_id in self.active:
            raise Conflict(f"run {run_id} is {record.status.value}; wait for it or cancel it")
        if run_id in self._claimed:
            raise Conflict(f"run {run_id} has a shell open (efci shell); close it first")
        return record

    # -- starting and stopping runs ---------------------------------------------------

    async def start(self, task: Task, requester: Requester, *, image: Image | None = None,
                    build_only: bool = False, trigger: dict[str, Any] | None = None,
                    stage_images: dict[str, Image] | None = None) -> int:
        assert self._nursery is not None, "Runs.serve must be running"
        self._admit()
        run = ActiveRun(0, task, image, build_only,
                        pushed_ref=str(trigger.get("ref", "")) if trigger else "",
                        stage_images=stage_images or {})
        run.id = run_id = await self.state.call(self.state.create_run, task, requester,
                                                task_to_wire(task), trigger,
                                                queued=run.launch_state())
        await self._launch(run, requester)
        log.info("run %d of %s queued (uid %d)", run_id, task.qualified_name, requester.uid)
        return run_id

    async def restart(self, run_id: int, requester: Requester, stage: str | None = None) -> None:
        """Start a finished run's container again: same upper layers, same
        container state; its output is appended to the run's log.  In a
        pipeline, the container of ``stage`` (only that stage runs)."""
        self._admit()
        record = await self._finished_record(run_id)
        if record.container_id is None or record.removed_at is not None:
            raise Conflict(f"run {run_id} has no container to restart"
                           + (" (efci rm removed it)" if record.removed_at else ""))
        task = task_from_wire(await self.state.call(self.state.run_declaration, run_id))
        index = await self.stage_with_container(run_id, task, stage, "to start again")
        attempt = record.attempts + 1
        run = ActiveRun(run_id, task, None, False, attempt, container_id=record.container_id,
                        restart_stage=index)
        await self.state.call(self.state.update_run, run_id, status=RunStatus.QUEUED,
                              attempts=attempt, finished_at=None, exit_code=None, error=None,
                              queued=run.launch_state())
        await self._launch(run, requester)
        log.info("run %d restarted as attempt %d%s (uid %d)", run_id, attempt,
                 f", stage {stage}" if stage else "", requester.uid)

    async def stage_with_container(self, run_id: int, task: Task, stage: str | None,
                                   what: str) -> int | None:
        """The index of the stage of a finished run whose container efci
        restart or efci shell uses (None for a run that is no pipeline)."""
        if not task.stages and stage is None:
            return None
        names = [s.name for s in task.stages]
        if stage is None:
            raise RequestError(f"run {run_id} is a pipeline: say which stage's container "
                               f"{what} with --stage ({', '.join(names)})")
        if stage not in names:
            raise NotFound(f"run {run_id} has no stage {stage!r}; its stages: "
                           + (", ".join(names) or "none (it is not a pipeline)"))
        index = names.index(stage)
        if not (await self.state.call(self.state.run_stages, run_id))[index]["container"]:
            raise Conflict(f"stage {stage} of run {run_id} never ran: it has no container; "
                           f"efci retry {run_id} --from {stage} runs it")
        return index

    async def retry(self, run_id: int, stage: str, requester: Requester) -> None:
        """A new attempt of a finished pipeline run from ``stage`` on: the
        stages before it are not run again, their layers are what it starts
        from; the old containers and layers of ``stage`` and the ones after
        it are removed first."""
        self._admit()
        record = await self._finished_record(run_id)
        task = task_from_wire(await self.state.call(self.state.run_declaration, run_id))
        names = [s.name for s in task.stages]
        if stage not in names:
            raise NotFound(f"run {run_id} has no stage {stage!r}; its stages: "
                           + (", ".join(names) or "none (it is not a pipeline)"))
        index = names.index(stage)
        if record.removed_at is not None:
            raise Conflict(f"run {run_id}'s layers were removed (efci rm, or eviction) "
                           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(record.removed_at))}"
                           "; start a new run")
        done = await self.state.call(self.state.run_stages, run_id)
        worktrees = len(await self.state.call(self.state.run_worktrees, run_id))
        for earlier in done[:index]:
            allowed = task.stages[earlier["idx"]].allow_failure
            if earlier["status"] != "succeeded" and not (allowed and
                                                       earlier["status"] == "failed"):
                raise Conflict(f"stage {earlier['name']} of run {run_id} did not succeed "
                               f"({earlier['status']}); retry from it, not from {stage}")
            if not await self.mutations.layers_exist(run_id, worktrees, earlier["idx"]):
                raise Conflict(f"the layers stage {earlier['name']} of run {run_id} left are "
                               "gone; retry from an earlier stage, or start a new run")
        for later in range(index, len(names)):
            await self._remove_containers(run_id, names[later])
            await self.mutations.remove_stage(run_id, later)
            await self.state.call(self.state.update_stage, run_id, later, status="pending",
                                  started_at=None, finished_at=None, exit_code=None,
                                  container=None, error=None, patched_attempt=None)
        attempt = record.attempts + 1
        run = ActiveRun(run_id, task, None, False, attempt, from_stage=index)
        await self.state.call(self.state.update_run, run_id, status=RunStatus.QUEUED,
                              attempts=attempt, finished_at=None, exit_code=None, error=None,
                              queued=run.launch_state())
        await self._launch(run, requester)
        log.info("run %d retried from stage %s as attempt %d (uid %d)", run_id, stage, attempt,
                 requester.uid)

    def _admit(self) -> None:
        """Refuse a new run (or attempt) while stopping, or past runs.max_queued."""
        if self._stopping:
            raise Conflict("the agent is stopping; no new runs are started")
        if len(self.queue.waiting) >= self.cfg.max_queued:
            raise Conflict(f"the queue is full: {len(self.queue.waiting)} runs wait for one of "
                           f"{self.cfg.max_parallel} slots (runs.max_queued and "
                           "runs.max_parallel in agent.yml); try again once some have started")

    def queue_positions(self) -> dict[int, int]:
        """Each queued run's place: 1 starts next."""
        return {run.id: i + 1 for i, run in enumerate(self.queue.waiting)}

    async def _relaunch(self, record: RunRecord, *, resumed: bool = False) -> None:
        """A run the last agent left queued (queued again, with what it was
        started with), or running in a container that still runs (resumed:
        re-attached to it)."""
        task = task_from_wire(await self.state.call(self.state.run_declaration, record.id))
        cut = self.logs.recover(record.id)
        if cut:
            log.warning("run %d: %d bytes of a torn last record cut off", record.id, cut)
        if resumed:
            run = ActiveRun(record.id, task, None, False, record.attempts,
                            container_id=record.container_id or "",
                            container_name=record.container_name or "", resumed=record)
            again = "still running: the agent restarted and re-attaches to it"
        else:
            assert record.queued is not None
            run = ActiveRun.relaunched(record.id, task, record.queued)
            again = "still queued: the agent restarted"
        await self._launch(run, Requester(record.requested_uid, record.requested_gid,
                                          record.requested_pid), again=again)

    async def _launch(self, run: ActiveRun, requester: Requester, again: str = "") -> None:
        # Opened here, not in the run's task, so a follower that asks right
        # after start() already sees a live log.
        try:
            writer = self.logs.open_writer(run.id)
        except OSError as e:
            error = (f"its log could not be opened in {self.cfg.log_dir} ({e.strerror}); "
                     "free space there, then try again")
            await self.state.call(self.state.update_run, run.id, status=RunStatus.ERROR,
                                  finished_at=time.time(), error=error)
            raise EfciError(f"run {run.id} not started: {error}") from e
        self.active[run.id] = run
        self.queue.enqueue(run)
        what = "queued" if run.attempt == 1 else f"attempt {run.attempt} queued"
        writer.message(f"run {run.id} of {run.task.qualified_name} " + (
            f"{again}" + ("" if run.resumed else f" (position {self.queue.position(run)})")
            if again else f"{what} by uid {requester.uid}"))
        assert self._nursery is not None
        self._nursery.start_soon(self._execute, run, writer, name=f"run {run.id}")

    async def remove(self, run_id: int) -> None:
        """Remove a finished run's container, mutations and layers of layered
        caches; its record and log stay.  Idempotent."""
        record = await self._finished_record(run_id)
        await self._remove_containers(run_id)
        for stage in await self.state.call(self.state.run_stages, run_id):
            await self._remove_containers(run_id, stage["name"])
        await self.mutations.remove(run_id)
        await self.caches.remove_run(run_id)
        if record.removed_at is None:
            await self.state.call(self.state.update_run, run_id, removed_at=time.time())

    async def _remove_containers(self, run_id: int, stage: str | None = None) -> None:
        """The run's (or its stage's) container, and what efci shell left of it."""
        await self.engine.remove(stage_container_name(self.instance, run_id, stage) if stage
                                 else task_container_name(self.instance, run_id))
        await self.engine.remove_image(patched_image(self.instance, run_id, stage))

    async def cancel(self, run_id: int, reason: str) -> None:
        run = self.active.get(run_id)
        if run is None:
            record = await self.record(run_id)
            if record is None:
                raise NotFound(f"no run {run_id}")
            raise Conflict(f"run {run_id} is not active (it is {record.status.value})")
        run.cancel_reason = reason
        run.scope.cancel()
        await run.done.wait()

    async def replace_queued(self, task: Task, ref: str, by: int) -> list[int]:
        """Cancel the runs of ``task`` that a push of ``ref`` started and that
        still wait for a slot: run ``by``, of a newer push, replaces them.
        One that already runs is left to finish."""
        replaced = [r for r in self.active.values()
                    if r.id != by and r.waiting and r.pushed_ref == ref
                    and r.task.qualified_name == task.qualified_name]
        for run in replaced:
            await self.cancel(run.id, f"replaced by run {by}, of a newer push of {ref}")
        return [r.id for r in replaced]

    def hurry(self) -> None:
        """Cut a graceful stop's drain short (a second SIGTERM)."""
        self._hurried = True
        self._drain.cancel()

    async def shutdown(self) -> None:
        """Drain: start nothing more (queued runs stay queued, in the state
        store, for the next agent), let running runs go on for up to
        runs.drain, then cancel them and wait for each to record its end."""
        self._stopping = True
        for run in list(self.active.values()):
            if run.waiting:
                run.keep_queued = True
                run.cancel_reason = "the agent is stopping"
                run.scope.cancel()
        running = list(self.active.values())
        if running and self.cfg.drain:
            log.info("waiting up to %ds (runs.drain) for %d running runs to finish; "
                     "signal again to cancel them now", self.cfg.drain, len(running))
            with trio.move_on_after(self.cfg.drain) as self._drain:
                for run in running:
                    await run.done.wait()
        runs = list(self.active.values())
        for run in runs:
            run.cancel_reason = "the agent is stopping" + (
                f" (runs.drain of {self.cfg.drain}s ran out)"
                if self.cfg.drain and not self._hurried else "")
            run.scope.cancel()
        for run in runs:
            await run.done.wait()
        with trio.CancelScope(shield=True):
            await self.save_ends()  # a last try; else recovery settles them
            await self.mutations.unmount_all()  # each run did; this makes sure
            await self.guards.remove_all()

    # -- recovery ---------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish the records of runs a previous agent left unfinished (and
        tell ``on_end``), sweep their deploy targets, and unmount what it
        left mounted."""
        for record in await self.state.call(self.state.unfinished_runs):
            if record.status is RunStatus.QUEUED and record.queued is not None:
                self._requeued.append(record)  # it keeps its place: see serve
                log.info("run %d is still queued; it starts when its turn comes", record.id)
                continue
            logged = self.logs.last_status(record.id)
            if logged is not None and logged.get("status") in FINAL_STATUSES:
                # The end reached the log, not the store: the log's is the one.
                status = RunStatus(logged["status"])
                fields: dict[str, Any] = {k: logged[k] for k in ("exit_code", "error")
                                          if k in logged}
            elif await self._resumable(record):
                self._resumed.append(record)
                log.info("run %d: its container outlived the last agent; the agent "
                         "re-attaches to it", record.id)
                continue
            else:
                status, fields = await self._settle(record)
                self._close_log_of_recovered(record.id, status, fields)
            fields["finished_at"] = time.time()
            await self.state.call(self.state.settle_stages, record.id)
            await self.state.call(self.state.update_run, record.id, status=status, **fields)
            log.warning("recovered run %d: %s (%s)", record.id, status.value,
                        fields.get("error"))
            task = task_from_wire(await self.state.call(self.state.run_declaration, record.id))
            if self.on_end is not None:  # a pushed run's commit status, say
                await self.on_end(record.id, task, status)
            try:
                targets = deploy_targets(self.cfg, task)
            except EfciError:
                targets = []  # no longer allowed or there: nothing of it is mounted now
            for target in targets:
                await sweep_target(target.path, functools.partial(_recovery_note, record.id))
        await self.mutations.unmount_all()

    async def _resumable(self, record: RunRecord) -> bool:
        """Whether a run's container started (it may have ended since) and
        can be re-attached to: one container (not a pipeline's stage), whose
        output docker keeps, so its log can be made whole."""
        if record.status is not RunStatus.RUNNING or not record.container_name:
            return False
        if task_from_wire(await self.state.call(self.state.run_declaration, record.id)).stages:
            return False
        found = await self.engine.inspect(record.container_name)
        return found is not None and found.status != "created" and found.keeps_output

    async def _resume(self, run: ActiveRun, record: RunRecord,
                      writer: LogWriter) -> tuple[RunStatus, dict[str, Any]]:
        """A run whose container started under an agent that is gone: wait
        for it to end (within what is left of its time limit), then add what
        it printed that the log lacks, from docker's copy, and record its end."""
        container = run.container_name
        state = await self.engine.inspect(container)
        if state is None:
            return RunStatus.ERROR, {"error": f"container {container} disappeared while the "
                                              "agent was not running"}
        # The attempt's start as the agent recorded it: before its container
        # was made, so before its task-start marker and any of its output.
        started_ns = int((record.started_at or 0) * 1e9)
        held = await trio.to_thread.run_sync(self.logs.output_since_start, run.id, started_ns)
        where = (f"from byte {held[0]} on" if held is not None else
                 "all of it since it started, as the log has a gap (some may be above)")
        writer.message(f"re-attached to container {container}, which ran on while the agent "
                       f"did not; its output ({where}) is added from docker's copy when it ends")
        limit = run.task.time_limit or self.cfg.time_limit
        left = limit - (time.time() - (record.started_at or time.time()))
        # Docker stamps an entry when it reads it, and a task's first output
        # can be read before docker records the start (State.StartedAt):
        # its copy is taken from the task-start marker, written just before
        # the start and after the previous start's last output.
        since_ns = held[2] if held else started_ns
        since = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        with trio.move_on_after(max(left, 0) if state.status == "running" else math.inf) as timer:
            try:
                while state is not None and state.status in ("running", "paused", "restarting"):
                    await trio.sleep(RESUMED_POLL_INTERVAL)
                    state = await self.engine.inspect(container)
            finally:
                await self._stop_if_cut(run, timer)
        # Its output, however the wait ended (a cancel too), within a bound.
        with trio.move_on_after(KEPT_OUTPUT_DEADLINE) as reading:
            reading.shield = True
            async with self.engine.kept_output(container, since) as output:
                await self._copy_kept(output, held, writer)
        if reading.cancelled_caught:
            writer.message(f"reading docker's copy of the output took more than "
                           f"{KEPT_OUTPUT_DEADLINE}s; the rest of it is not in the log")
        writer.event(Kind.MARKER, {"step": "task", "event": "end"})
        state = await self.engine.inspect(container)
        if state is None:
            return RunStatus.ERROR, {"error": f"container {container} disappeared"}
        status, fields = ended(state)
        errors = [f"time limit of {limit}s reached"] if timer.cancelled_caught else []
        errors += self._limits_reached(run, run.task, state)
        # The promotion on success is decided where the caches were mounted:
        # by the agent that is gone.  Said, so the administrator can do it.
        for use in run.task.caches:
            if use.promote_on_success and status is RunStatus.SUCCEEDED and not errors:
                writer.message(f"cache {use.name}: not promoted, as the run was re-attached "
                               f"to; efci cache promote {run.id} {use.name} does it")
        for target in deploy_targets(self.cfg, run.task):
            await sweep_target(target.path, writer.message)
        if errors:
            fields["error"] = "; ".join(errors)
        return RunStatus.TIMED_OUT if timer.cancelled_caught else status, fields

    @staticmethod
    async def _copy_kept(output: trio.abc.ReceiveStream, held: tuple[int, bytes, int] | None,
                         writer: LogWriter) -> None:
        """Docker's copy of the output into the log, past the bytes the log
        already holds; the last of those are compared with docker's, and a
        difference is said, not hidden."""
        skip, tail = held[:2] if held is not None else (0, b"")
        before = bytearray()  # docker's bytes up to where the log stops, their last few
        while data := await output.receive_some(1 << 16):
            if skip:
                taken = min(skip, len(data))
                before += data[:taken]
                del before[:max(len(before) - len(tail), 0)]
                skip -= taken
                data = data[taken:]
                if not skip and before != tail:
                    writer.message("docker's copy of the output differs from the log just "
                                   "before this point: bytes may be missing or repeated here")
            if data:
                writer.output(data)
        if skip:
            writer.message(f"docker kept {skip} bytes less of the output than the log holds "
                           "(its copy rotated): what it printed while no agent ran is missing")

    async def _settle(self, record: RunRecord) -> tuple[RunStatus, dict[str, Any]]:
        """How an unfinished run ended, from what its container says now."""
        container = record.container_id or record.container_name or ""
        found = await self.engine.inspect(container) if container else None
        if found is None:
            return RunStatus.CANCELLED, {"error": "the agent stopped before the run's "
                                                  "container ran"}
        if found.status in ("running", "paused", "restarting"):
            await self.engine.stop(container, grace=self.cfg.stop_grace)
            return RunStatus.CANCELLED, {"error": "the agent stopped while it ran; its "
                                                  "container was stopped"}
        if found.status == "created":
            return RunStatus.CANCELLED, {"error": "the agent stopped before the run's "
                                                  "container started"}
        # Never "succeeded": what it printed after the agent stopped is not
        # in its log, so the record cannot vouch for the run.
        _, fields = ended(found)
        return RunStatus.ERROR, {**fields, "error": (
            f"finished while the agent was not running (exit status {found.exit_code}); "
            "output after the agent stopped is not in the log")}

    def _close_log_of_recovered(self, run_id: int, status: RunStatus,
                                fields: dict[str, Any]) -> None:
        cut = self.logs.recover(run_id)
        writer = self.logs.open_writer(run_id)
        try:
            if cut:
                writer.message(f"{cut} bytes of a torn last record were cut off at recovery")
            writer.message(f"run {run_id} {status.value}: {fields['error']}")
            writer.event(Kind.STATUS, {"status": status.value, **fields})
        finally:
            writer.close()

    # -- one run ----------------------------------------------------------------------

    async def _execute(self, run: ActiveRun, writer: LogWriter) -> None:
        try:
            status, fields = RunStatus.ERROR, dict[str, Any]()
            timings.current.set(run.timings)
            with run.scope:
                with timings.phase("queued"):
                    await self.queue.take(run)
                run.waiting = False
                if run.resumed:
                    status, fields = await self._resume(run, run.resumed, writer)
                else:
                    await self._wait_for_space(writer)
                    status, fields = await self._run(run, writer)
            if run.scope.cancelled_caught:
                status, fields = RunStatus.CANCELLED, {"error": run.cancel_reason}
        except RunFailed as e:
            status, fields = RunStatus.FAILED, {"error": e.message}
        except CommandFailed as e:  # the whole of it in the log, in words in the record
            writer.message(e.message)
            status, fields = RunStatus.ERROR, {"error": docker.explain(e)}
        except EfciError as e:
            status, fields = RunStatus.ERROR, {"error": e.message}
        except Exception as e:  # the agent broke: keep the run's record honest anyway
            log.exception("run %d: unexpected error", run.id)
            status, fields = RunStatus.ERROR, {"error": internal_error(e).message}
        finally:
            if run.keep_queued and run.waiting:
                writer.message("the agent is stopping; the run stays queued and starts when "
                               "the agent is back")
                self._leave(run, writer)
            else:
                # The slot is given back once the end is recorded, so no more
                # than max_parallel runs are ever between start and end.
                with trio.CancelScope(shield=True):
                    await self._finish(run, writer, status, fields)
                if not run.waiting:
                    self.queue.release()

    def disk_places(self) -> dict[str, Path | None]:
        return {"state": self.cfg.state_dir, "logs": self.cfg.log_dir,
                "docker": self.docker_root, "caches": self.cfg.caches_root}

    async def _wait_for_space(self, writer: LogWriter) -> None:
        """Start nothing while a disk it writes to is nearly full: the run
        stays queued (and says why) until runs.min_free is free again."""
        said, began = False, time.monotonic()
        while self.cfg.min_free and (short := diskspace.shortages(self.disk_places(),
                                                                  self.cfg.min_free)):
            if not said:
                writer.message("waiting for free space: " + "; ".join(short))
                if short != self.short_of_space:
                    log.warning("runs wait for free space: %s", "; ".join(short))
                said = True
            self.short_of_space = short
            await trio.sleep(SPACE_POLL_INTERVAL)
        if said:
            timings.since("waiting for free space", began)
            writer.message("there is free space again; starting")
        self.short_of_space = []

    async def _finish(self, run: ActiveRun, writer: LogWriter, status: RunStatus,
                      fields: dict[str, Any]) -> None:
        """Record the run's end in its log and the state store, then close
        the log (followers read the record once the log ends).  Neither a
        full disk nor anything else keeps the run from ending here."""
        if writer.lost_bytes:  # the log is not whole: never a success
            status, fields = RunStatus.ERROR, with_log_loss(fields, writer)
        try:
            exit_part = f", exit status {fields['exit_code']}" if "exit_code" in fields else ""
            took = f" after {time.monotonic() - run.timings.origin:.1f}s"
            writer.message(f"run {run.id} {status.value}{exit_part}{took}"
                           + (f": {fields['error']}" if fields.get("error") else ""))
            writer.event(Kind.STATUS, {"status": status.value, **fields})
            timings.since("recording the end", run.timings.last_end())
            end = {"status": status, "finished_at": time.time(), "timings": run.timings.to_json(),
                   **fields}
            try:
                if run.task.stages:
                    await self.state.call(self.state.settle_stages, run.id)
                await self.state.call(self.state.update_run, run.id, **end)
            except EfciError as e:
                self.unsaved_ends[run.id] = end
                log.error("run %d: its end (%s) is kept until it can be saved: %s", run.id,
                          status.value, e.message)
            else:
                log.info("run %d of %s: %s%s", run.id, run.task.qualified_name, status.value,
                         f" ({fields['error']})" if fields.get("error") else "")
                if self.on_end is not None:
                    await self.on_end(run.id, run.task, status)
        except Exception:
            log.exception("run %d: could not record its end (%s)", run.id, status.value)
        finally:
            self._leave(run, writer)

    def _leave(self, run: ActiveRun, writer: LogWriter) -> None:
        writer.close()
        self.caches.forget(run.id)
        del self.active[run.id]
        run.done.set()

    async def _run(self, run: ActiveRun, writer: LogWriter) -> tuple[RunStatus, dict[str, Any]]:
        """Refusals and the image, then the task's container (created, or
        the run's own again for a restart), or each stage of its pipeline."""
        binds, targets = await self._prepare(run, writer)
        if run.build_only:
            return RunStatus.SUCCEEDED, {}
        if run.restart_stage is not None:
            return await self._stage(run, run.restart_stage,
                                     run.task.stages[run.restart_stage], writer)
        if run.task.stages:
            return await self._pipeline(run, writer)
        take = self._check_out(run, writer) if run.attempt == 1 else self._worktrees_of(run.id)
        return await self._step(run, run.task, binds, targets, take, writer,
                                again=run.attempt > 1)

    async def _step(self, run: ActiveRun, task: Task, binds: list[Mount], targets: list[Path],
                    take: Take, writer: LogWriter, *, again: bool = False, stage: int = 0,
                    name: str = "") -> tuple[RunStatus, dict[str, Any]]:
        """One container of the run, within its time limit: the environment
        (checkout or the worktrees it has, views, caches, progress), the
        container, attached; how it ended."""
        limit = task.time_limit or self.cfg.time_limit
        run.container_name = name or task_container_name(self.instance, run.id)
        container, exited, attached = "", time.monotonic(), Attached()
        with trio.move_on_after(limit) as timer:
            async with self.environments.open(run.id, take, targets=targets, task=task,
                                              stage=stage,
                                              report=self._progress_reporter(run, writer),
                                              say=writer.message) as env:
                try:
                    if again:
                        with timings.phase("container create"):
                            container = await self._again(run, task, env, writer)
                        cols, rows = self.cfg.terminal_size
                        attached = await self._attach(run, task, stage, writer, self.engine.attach(
                            container, cols=cols, rows=rows), new=False)
                    else:
                        attached = await self._attach(run, task, stage, writer,
                                                      await self._run_container(
                                                          run, task, env, binds, writer),
                                                      new=True)
                        container = run.container_id
                    exited = attached.exited
                finally:
                    exited = time.monotonic() if timer.cancel_called else exited
                    await self._stop_if_cut(run, timer)
                    if not container and not run.container_id:  # cut before docker said
                        await shielded(f"finding run {run.id}'s container", self._learn_id,
                                       run)()
        timings.since("teardown", exited)
        timed_out = {"error": f"time limit of {limit}s reached"} if timer.cancelled_caught else {}
        container = container or run.container_id  # docker run's, if its time ran out
        if not container:
            if not timed_out:  # docker ended without creating it: its output says why
                raise CommandFailed(["docker", "run"], attached.status, b"", attached.tail)
            return RunStatus.TIMED_OUT, timed_out  # during the checkout, or docker's create
        # docker's state says how it ended, unless the exit status says all:
        # a success, on the image it was asked to run by id, or that docker
        # named when it started.
        if attached.status == 0 and run.image_id and not attached.first_state:
            state: ContainerState | None = ContainerState("exited", 0, run.image_id, False,
                                                          id=container)
        elif attached.status == 0 and attached.first_state:
            state = dataclasses.replace(attached.first_state, status="exited", exit_code=0)
        else:
            state = await self.engine.inspect(container)
        if state is None:
            return RunStatus.ERROR, {"error": f"container {container[:12]} disappeared"}
        status, fields = ended(state)
        limits = self._limits_reached(run, task, state)
        status = RunStatus.TIMED_OUT if timed_out else status
        full = await self.caches.after_run(run.id, succeeded=status is RunStatus.SUCCEEDED,
                                           say=writer.message)
        if timed_out or limits or full:
            fields["error"] = "; ".join([*timed_out.values(), *limits, *full])
        return status, fields

    async def _pipeline(self, run: ActiveRun,
                        writer: LogWriter) -> tuple[RunStatus, dict[str, Any]]:
        """The stages in order, each in a container of its own over views
        that stack the layers the stages before it left; the checkout once,
        before the first.  A stage that fails stops the pipeline (unless it
        allows failure): the ones after it are skipped."""
        stages = run.task.stages
        if run.attempt == 1:
            await self.state.call(self.state.set_stages, run.id, [s.name for s in stages])
        else:
            writer.message(f"attempt {run.attempt}: from stage {stages[run.from_stage].name}, "
                           "over the layers the stages before it left")
        status, fields, stopped_by = RunStatus.SUCCEEDED, dict[str, Any](), ""
        for index, stage in enumerate(stages):
            if index < run.from_stage:
                continue
            if stopped_by:
                await self.state.call(self.state.update_stage, run.id, index, status="skipped",
                                      error=f"stage {stopped_by} failed")
                writer.message(f"stage {stage.name}: skipped (stage {stopped_by} failed)")
                continue
            result, details = await self._stage(run, index, stage, writer)
            if result is RunStatus.SUCCEEDED:
                continue
            if stage.allow_failure and result is RunStatus.FAILED:
                writer.message(f"stage {stage.name}: failed, which it may (allow_failure); "
                               "the pipeline goes on")
                continue
            stopped_by = stage.name
            status = result
            fields = {**{k: v for k, v in details.items() if k == "exit_code"},
                      "error": f"stage {stage.name} {result.value.replace('_', ' ')}"
                               + (f": {details['error']}" if details.get("error") else
                                  f" (exit status {details.get('exit_code')})")}
        return status, fields

    async def _stage(self, run: ActiveRun, index: int, stage: Stage,
                     writer: LogWriter) -> tuple[RunStatus, dict[str, Any]]:
        task = run.task.stage_task(stage)
        name = stage_container_name(self.instance, run.id, stage.name)
        await self.state.call(self.state.update_stage, run.id, index, status="running",
                              started_at=time.time(), container=name)
        writer.event(Kind.MARKER, {"step": "stage", "name": stage.name, "event": "start"})
        writer.message(f"stage {stage.name} ({index + 1} of {len(run.task.stages)}): "
                       f"{task.image}")
        try:
            declared = run.stage_images.get(task.image)
            if declared is not None:
                task = dataclasses.replace(task, image=await self.images.ensure(declared, writer))
            binds = host_mounts(self.cfg, task)
            targets = [t.path for t in deploy_targets(self.cfg, task)]
            for path in targets:
                await self.guards.ensure(path)
            take = (self._check_out(run, writer) if index == 0 and run.attempt == 1
                    else self._worktrees_of(run.id))
            with timings.phase(f"stage {stage.name}"):
                result, details = await self._step(run, task, binds, targets, take, writer,
                                                   again=run.restart_stage == index,
                                                   stage=index, name=name)
        except EfciError as e:  # refused (a deploy target, an image): this stage's error
            result, details = RunStatus.ERROR, {"error": e.message}
        await self.state.call(self.state.update_stage, run.id, index, status=result.value,
                              finished_at=time.time(), exit_code=details.get("exit_code"),
                              error=details.get("error"))
        writer.event(Kind.MARKER, {"step": "stage", "name": stage.name, "event": "end",
                                   "status": result.value})
        writer.message(f"stage {stage.name}: {result.value.replace('_', ' ')}"
                       + (f", exit status {details['exit_code']}"
                          if details.get("exit_code") is not None else "")
                       + (f": {details['error']}" if details.get("error") else ""))
        return result, details

    async def _prepare(self, run: ActiveRun,
                       writer: LogWriter) -> tuple[list[Mount], list[Path]]:
        """What comes before the time limit starts: refuse what cannot run
        (keys, hosts, secrets, deploy targets; on the first attempt), guard
        the deploy targets, check the network rules, record the run as
        running, build its image.  Returns the first attempt's host mounts
        and the deploy targets' paths."""
        binds = []
        with timings.phase("checks"):
            if run.attempt == 1:
                self.checkouts.check(run.task)
                await self.checkouts.verify_commits(run.task, writer)
                binds = host_mounts(self.cfg, run.task)
            targets = [t.path for t in deploy_targets(self.cfg, run.task)]
            for path in targets:
                await self.guards.ensure(path)  # nosuid,nodev while a task can write it
            if run.task.network is Network.DEFAULT or (
                    run.task.repositories and self.cfg.network_checkout == "bridge"):
                restored = await self.network.check()  # fail closed
                if restored:
                    writer.message("the network rules were not in place (" + "; ".join(restored)
                                   + "); they were restored before this run")
            await self.state.call(self.state.update_run, run.id, status=RunStatus.RUNNING,
                                  started_at=time.time(), queued=None)
        writer.event(Kind.STATUS, {"status": RunStatus.RUNNING.value, "attempt": run.attempt})
        if run.image is not None:
            with timings.phase("image"):
                tag = await self.images.ensure(run.image, writer, force=run.build_only)
            run.task = dataclasses.replace(run.task, image=tag)
        return binds, targets

    def _check_out(self, run: ActiveRun, writer: LogWriter
                   ) -> Callable[[list[Worktree]], Awaitable[None]]:
        """The first attempt's worktrees: each entry checked out or reused,
        and recorded with the run."""
        async def take(into: list[Worktree]) -> None:
            for index, repo in enumerate(run.task.repositories):
                with timings.phase(f"checkout {repo.mount_name}"):
                    worktree = await self.checkouts.prepare(run.id, run.task, index, repo,
                                                            writer)
                    into.append(worktree)
                    await self.state.call(self.state.add_run_worktree, run.id, worktree.volume,
                                          worktree.mount_name, worktree.commit, worktree.reused)
        return take

    def _worktrees_of(self, run_id: int) -> Callable[[list[Worktree]], Awaitable[None]]:
        """Uses of the worktrees a finished run checked out (a restart's, a
        shell's)."""
        async def take(into: list[Worktree]) -> None:
            for row in await self.state.call(self.state.run_worktrees, run_id):
                into.append(await self.checkouts.use(
                    Worktree(row["volume"], row["mount_name"], row["commit_sha"], True)))
        return take

    async def _create(self, run: ActiveRun, task: Task, env: Environment, binds: list[Mount],
                      writer: LogWriter, entrypoint: str | None = None) -> str:
        spec = self._spec(run, task, env, binds, entrypoint)
        await self.state.call(self.state.update_run, run.id, container_name=spec.name)
        run.container_id = await self.engine.create(spec)
        await self.state.call(self.state.update_run, run.id, container_id=run.container_id)
        writer.message(f"container {spec.name} ({run.container_id[:12]}) from {spec.image}")
        return run.container_id

    async def _run_container(self, run: ActiveRun, task: Task, env: Environment,
                             binds: list[Mount], writer: LogWriter
                             ) -> AbstractAsyncContextManager[Started]:
        """The task's container, created and started by one docker command
        (its name recorded first: an agent that dies before it learns the
        id finds the container by name)."""
        spec = self._spec(run, task, env, binds)
        run.container_id = ""  # not an earlier stage's
        # By id, where docker's own record of its tags says it without a
        # process: the run then knows what it ran without asking docker.
        image = spec.image
        run.image_id = await self.engine.image_id(image) or ""
        if run.image_id:
            spec = dataclasses.replace(spec, image=run.image_id)
            image += f" ({run.image_id.removeprefix('sha256:')[:12]})"
        await self.state.call(self.state.update_run, run.id, container_name=spec.name)
        writer.message(f"container {spec.name} from {image}")
        cols, rows = self.cfg.terminal_size
        return self.engine.run_container(spec, cols=cols, rows=rows)

    def _spec(self, run: ActiveRun, task: Task, env: Environment, binds: list[Mount],
              entrypoint: str | None = None) -> ContainerSpec:
        assert env.progress_dir is not None
        return dataclasses.replace(
            container_spec(self.cfg, self.instance, run.id, task, env.views,
                           [*binds, *env.caches, Mount("bind", str(env.progress_dir),
                                                       MOUNT_POINT, readonly=True)]),
            name=run.container_name, entrypoint=entrypoint)

    async def _stop_if_cut(self, run: ActiveRun, timer: trio.CancelScope) -> None:
        """Its container stopped, shielded, if its time ran out or it was cancelled."""
        if timer.cancel_called or run.scope.cancel_called:
            await shielded(f"stopping run {run.id}'s container", self._stop, run,
                           deadline=self.cfg.stop_grace + TEARDOWN_SLACK)()

    async def _learn_id(self, run: ActiveRun) -> None:
        """The id of a container docker run made (by its name), for the
        record: efci restart and rm work with it."""
        state = await self.engine.inspect(run.container_name)
        if state is not None and state.id:
            run.container_id = state.id
            await self.state.call(self.state.update_run, run.id, container_id=state.id)

    async def _stop(self, run: ActiveRun) -> None:
        """By name: it may have been created without us learning its id."""
        await self.engine.stop(run.container_name, grace=self.cfg.stop_grace)

    async def _again(self, run: ActiveRun, task: Task, env: Environment,
                     writer: LogWriter) -> str:
        """The run's container for a restart: the same one, or, if efci shell
        left changes for this attempt, one made again from what the shell
        left, with the task's own command, environment and mounts."""
        container = run.container_name
        stage = run.restart_stage
        if stage is None:
            record = await self.record(run.id)
            patched = record.patched_attempt if record else None
        else:
            patched = (await self.state.call(self.state.run_stages, run.id))[stage][
                "patched_attempt"]
        if patched != run.attempt:
            writer.message(f"attempt {run.attempt}: starting container {container} again, "
                           "with its state and upper layers")
            return container
        writer.message(f"attempt {run.attempt}: on the container as efci shell left it (its "
                       "changes kept), with the task's own command, environment and mounts")
        # The shell's image carries the shell's entrypoint: give the task's
        # image's own back (docker takes one word; the rest go before the command).
        entrypoint, cmd = await self.engine.image_config(task.image)
        command = task.command if task.command is not None else tuple(cmd)
        await self.engine.remove(container)
        return await self._create(run, dataclasses.replace(
            task, image=patched_image(self.instance, run.id,
                                      None if stage is None else run.task.stages[stage].name),
            command=(*entrypoint[1:], *command)), env, host_mounts(self.cfg, task), writer,
            entrypoint=entrypoint[0] if entrypoint else "")

    def _limits_reached(self, run: ActiveRun, task: Task,
                        state: ContainerState) -> list[str]:
        """Which of its limits the task ran into, in words: docker's record
        of the kernel's OOM kill, the pids cgroup's count of failed forks."""
        limits, source = limits_of(self.cfg, task)
        found = []
        if state.oom_killed:
            assert limits.memory is not None
            swap = f" and {format_size(limits.swap)} of swap" if limits.swap else ""
            found.append(f"the kernel's OOM killer stopped a process of it: it reached its "
                         f"memory limit of {format_size(limits.memory)}{swap} "
                         f"({source['memory']})")
        if run.pids_limit_reached:
            found.append(f"it reached its limit of {limits.pids} processes "
                         f"({source['pids']}): {run.pids_limit_reached} forks failed")
        if run.disk_taken:
            assert limits.disk is not None
            found.append(f"it was stopped when its writable layers (its changes under /src and "
                         f"to its container) took {human_size(run.disk_taken)}, past its "
                         f"limit of {format_size(limits.disk)} ({source['disk']})")
        return found

    def _progress_reporter(self, run: ActiveRun, writer: LogWriter) -> Update:
        async def report(progress: float | None, message: str | None) -> None:
            fields: dict[str, Any] = {}
            if progress is not None:
                fields["progress"] = progress
            if message is not None:
                fields["progress_message"] = message
            await self.state.call(self.state.update_run, run.id, **fields)
            writer.event(Kind.STATUS, {"progress": progress, "message": message})
        return report

    async def _attach(self, run: ActiveRun, task: Task, stage: int, writer: LogWriter,
                      opened: AbstractAsyncContextManager[Terminal] |
                      AbstractAsyncContextManager[Started], *, new: bool) -> Attached:
        """Start the container attached to a terminal (``opened``: docker run
        of a new one, or docker start of the run's own) and copy every byte
        of its output into the log (``new``: docker creates it, and tells
        its id, meanwhile); once it exists, read its state and
        watch its pids cgroup and the space its writable layers take.
        Leaving detaches; the container itself goes on until stopped."""
        cols, rows = self.cfg.terminal_size
        run.pids_limit_reached = run.disk_taken = 0  # this container's, not an earlier stage's
        writer.event(Kind.RESIZE, {"cols": cols, "rows": rows}, stream=TASK_STREAM)
        writer.event(Kind.MARKER, {"step": "task", "event": "start"})
        attached = Attached()
        inspected = trio.Event()
        async with trio.open_nursery() as nursery:
            began = time.monotonic()
            async with opened as terminal:
                nursery.start_soon(self._watch, run, task, stage,
                                   cast(Started, terminal) if new else None, attached, inspected)
                first = None
                while data := await terminal.receive_some(1 << 16):
                    first = first or time.monotonic()
                    writer.output(data)
                    # (not a copy of every chunk: only docker's last words matter)
                    attached.tail = (attached.tail + data[-4096:])[-4096:]
                attached.status = await terminal.wait()
                attached.exited = time.monotonic()
            created = cast(Started, terminal).created_at if new else None
            if created is not None and began <= created <= (first or attached.exited):
                timings.add("container create", began, created)
                began = created
            if first is not None:
                timings.add("start to first byte", began, first)
                began = first
            timings.add("run", began, attached.exited)
            # Its id recorded, and its state as it started: a success needs
            # no other (another reading costs a docker process).
            await inspected.wait()
            nursery.cancel_scope.cancel()
        writer.event(Kind.MARKER, {"step": "task", "event": "end"})
        return attached

    async def _watch(self, run: ActiveRun, task: Task, stage: int,
                     started: Started | None, attached: Attached,
                     inspected: trio.Event) -> None:
        """Once docker has created the container: its pids watched from then
        on (a fork bomb can make a docker command slow), its id recorded, its
        state read (the image it runs, its writable layer), then its disk
        watched, until the run's attach ends."""
        async with trio.open_nursery() as nursery:
            try:
                if started is not None:
                    created = await started.created()
                    if created is None:
                        return  # docker ended without creating it
                    run.container_id = created
                nursery.start_soon(self._watch_pids, run)
                if started is not None:
                    await self.state.call(self.state.update_run, run.id,
                                          container_id=run.container_id)
                if started is None or not run.image_id:  # else read only if the disk watch needs it
                    attached.first_state = await self.engine.inspect(run.container_id)
            finally:
                inspected.set()
            nursery.start_soon(self._watch_disk, run, task, stage, attached.first_state)

    async def _watch_pids(self, run: ActiveRun) -> None:
        """Keep the count of forks that failed at the pids limit (the kernel
        keeps it in the container's cgroup, which goes with the container)."""
        events = None
        while True:
            await trio.sleep(PIDS_POLL_INTERVAL)
            events = events or cgroups.pids_events(run.container_id)
            if events is not None:
                run.pids_limit_reached = max(run.pids_limit_reached,
                                             cgroups.limit_reached(events))

    async def _watch_disk(self, run: ActiveRun, task: Task, stage: int,
                          state: ContainerState | None) -> None:
        """Stop the container once its writable layers (the upper layers
        over its worktrees, its own layer) take more than its limits.disk.
        No filesystem quota covers them (they are plain directories where
        docker keeps volumes and containers), so they are measured: often
        enough that a task overshoots by at most what it writes in
        DISK_POLL_INTERVAL, and seldom enough (twenty times what the last
        count took) that counting a large tree costs under 5% of a core."""
        limit = limits_of(self.cfg, task)[0].disk
        assert limit is not None
        await trio.sleep(DISK_POLL_INTERVAL)
        state = state or await self.engine.inspect(run.container_id)
        layers = await self.mutations.layer_dirs(run.id, len(task.repositories), stage)
        if state is not None and state.writable_dir:
            layers.append(Path(state.writable_dir))
        elif run.container_id:
            log.warning("run %d: docker names no writable layer of its container (a storage "
                        "driver other than overlay2?); limits.disk counts /src only", run.id)
        while True:
            began = time.monotonic()
            taken = await diskspace.space_taken_in_thread(layers)
            if taken > limit:
                run.disk_taken = taken
                await self._stop(run)
                return
            await trio.sleep(max(DISK_POLL_INTERVAL, 20 * (time.monotonic() - began)))

    # -- for efci shell ------------------------------------------------------------------

    @asynccontextmanager
    async def claimed(self, run_id: int) -> AsyncIterator[RunRecord]:
        """A finished run, kept from restart and rm while the block runs."""
        record = await self._finished_record(run_id)
        self._claimed.add(run_id)
        try:
            yield record
        finally:
            self._claimed.discard(run_id)

    def is_claimed(self, run_id: int) -> bool:
        """Whether a shell is open in the finished run."""
        return run_id in self._claimed

    def environment_of(self, run_id: int,
                       stage: int = 0) -> AbstractAsyncContextManager[Environment]:
        """A finished run's environment again (its worktrees and views, a
        stage's over the layers the stages before it left), for a shell."""
        return self.environments.open(run_id, self._worktrees_of(run_id), stage=stage)
