"""Eviction (``efci gc``, and the agent every ``gc.interval``): what a
policy in agent.yml says may go, each removal with its reason and the bytes
it frees.

- A finished run's container and layers (its upper layers over its worktrees,
  the layers of layered caches it holds) go unless it is among the newest
  ``gc.keep_runs`` of its task or younger than ``gc.keep_for``; its record
  stays, marked as evicted, and its log stays.
- Past ``gc.layers_budget`` (the bytes of finished runs' layers and
  stopped containers' writable layers), the oldest finished runs go too,
  except the newest run of each task, until the rest fits.
- A finished run's log goes once the run ended longer than ``gc.logs_keep``
  ago; the record stays and says so.
- A base worktree that no declared task checks out, that no kept run's
  layers lie over, and that no run used for ``gc.worktrees_unused`` goes
  (``--owner`` limits this to one owner's).
- A built image of a declaration that no declared task runs in any more,
  and that no run used for ``gc.images_unused``, goes.
- Orphans: containers and volumes carrying this agent instance's labels whose
  run the state store does not know, or whose run was removed, go, and so
  do such runs' directories in the layers volume.  Nothing without those
  labels is ever looked at.

Never touched: what a queued or running run uses, a run with a shell open,
a base worktree a declared task references, the layers of a kept run (a
retry may need them).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import diskspace
from .errors import EfciError
from .host.git import worktree_volume_name
from .images import image_tag

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    kind: str  # run, log, worktree, container, volume, layers
    name: str
    why: str
    bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "why": self.why, "bytes": self.bytes}


def tree_size(path: Path) -> int:
    """Bytes the files under ``path`` take (what removing it frees, roughly:
    extents shared with a lower layer are counted as if they were not)."""
    return diskspace.space_taken([path])


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds:.0f}s"


class Collector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = trio.Lock()  # one collection at a time
        self._evicted: set[int] = set()  # runs this collection removed (or, dry, would)

    async def collect(self, *, dry_run: bool = False, owner: str | None = None,
                      now: float | None = None) -> list[Removal]:
        async with self._lock:
            now = time.time() if now is None else now
            done: list[Removal] = []
            self._evicted = set()
            for step in (self._runs, self._budget, self._logs, self._worktrees, self._images,
                         self._orphans):
                try:
                    await step(now, owner, dry_run, done.append)
                except EfciError as e:
                    log.error("gc: %s failed: %s", step.__name__.strip("_"), e.message)
            for removal in done:
                log.info("gc: %s %s %s (%s; %d bytes)",
                         "would remove" if dry_run else "removed", removal.kind, removal.name,
                         removal.why, removal.bytes)
            return done

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        interval = self.agent.cfg.gc_interval
        while interval:
            await trio.sleep(interval)
            await self.collect()

    # -- the policy, one kind of thing at a time --------------------------------------

    def _busy(self, run_id: int) -> bool:
        runs = self.agent.runs
        return run_id in runs.active or runs.is_claimed(run_id)

    async def _runs(self, now: float, owner: str | None, dry_run: bool,
                    add: Callable[[Removal], None]) -> None:
        cfg, state = self.agent.cfg, self.agent.state
        records = await state.call(state.evictable_runs)
        newest: dict[tuple[str, str], list[int]] = {}
        for row in await state.call(state.all_runs_newest_first):
            newest.setdefault((row["owner"], row["task"]), []).append(row["id"])
        for record in records:
            if record.removed_at is not None or self._busy(record.id):
                continue
            kept = newest.get((record.owner, record.task), [])[:cfg.gc_keep_runs]
            age = now - (record.finished_at or record.created_at)
            if record.id in kept or age < cfg.gc_keep_for:
                continue
            why = (f"not among the newest {cfg.gc_keep_runs} runs of {record.owner}/"
                   f"{record.task}, and ended {_days(age)} ago (gc.keep_runs, gc.keep_for)")
            await self._evict(record.id, why, await self._run_bytes(
                record.id, record.container_name), dry_run, add)

    async def _evict(self, run_id: int, why: str, size: int, dry_run: bool,
                     add: Callable[[Removal], None]) -> bool:
        """Remove a run's container and layers as efci rm does, and mark its
        record; False if it became busy since the look."""
        if not dry_run:
            try:
                await self.agent.runs.remove(run_id)
            except EfciError as e:  # restarted, or a shell opened, since the look
                log.info("gc: run %d stays: %s", run_id, e.message)
                return False
            await self.agent.state.call(self.agent.state.update_run, run_id,
                                        removed_why=f"evicted: {why}")
        self._evicted.add(run_id)
        add(Removal("run", str(run_id), why, size))
        return True

    async def _run_bytes(self, run_id: int, container: str | None) -> int:
        """What a finished run holds on disk: its layers over its worktrees
        and its container's writable layer."""
        engine = self.agent.engine
        size = await trio.to_thread.run_sync(
            tree_size, await self.agent.mutations.run_layers(run_id))
        if container:
            size += (await engine.container_sizes([container])).get(container, 0)
        return size

    async def _budget(self, now: float, owner: str | None, dry_run: bool,
                      add: Callable[[Removal], None]) -> None:
        """Past gc.layers_budget, the oldest finished runs go (never the
        newest run of a task) until what is left fits."""
        cfg, state = self.agent.cfg, self.agent.state
        newest: dict[tuple[str, str], int] = {}
        for row in await state.call(state.all_runs_newest_first):
            newest.setdefault((row["owner"], row["task"]), row["id"])
        held = []
        for record in await state.call(state.evictable_runs):
            if record.removed_at is None and not self._busy(record.id) and \
                    record.id not in self._evicted:  # a dry run's earlier step, too
                held.append((record, await self._run_bytes(record.id, record.container_name)))
        total = sum(size for _, size in held)
        for record, size in held:  # oldest first
            if total <= cfg.gc_layers_budget:
                break
            if newest.get((record.owner, record.task)) == record.id:
                continue
            why = (f"finished runs' layers and containers take {total} bytes, more than "
                   f"gc.layers_budget ({cfg.gc_layers_budget}); it is the oldest")
            if await self._evict(record.id, why, size, dry_run, add):
                total -= size

    async def _logs(self, now: float, owner: str | None, dry_run: bool,
                    add: Callable[[Removal], None]) -> None:
        cfg, state, logs = self.agent.cfg, self.agent.state, self.agent.logs
        for record in await state.call(state.evictable_runs):
            if record.log_removed_at is not None or self._busy(record.id):
                continue
            age = now - (record.finished_at or record.created_at)
            if age < cfg.gc_logs_keep:
                continue
            where = logs.run_dir(record.id)
            size = await trio.to_thread.run_sync(tree_size, where)
            add(Removal("log", f"run {record.id}", f"ended {_days(age)} ago (gc.logs_keep)",
                        size))
            if not dry_run:
                await trio.to_thread.run_sync(shutil.rmtree, where, True)
                await state.call(state.update_run, record.id, log_removed_at=now)

    async def _worktrees(self, now: float, owner: str | None, dry_run: bool,
                         add: Callable[[Removal], None]) -> None:
        agent = self.agent
        declared = {worktree_volume_name(t.owner, r.entry) for t in agent.decls.tasks.values()
                    for r in t.repositories}
        in_use = {worktree_volume_name(run.task.owner, r.entry)
                  for run in agent.runs.active.values() for r in run.task.repositories}
        for row in await agent.state.call(agent.state.worktree_uses):
            if owner is not None and row["owner"] != owner:
                continue
            age = now - row["last_used"]
            if row["volume"] in declared or row["volume"] in in_use or row["kept_runs"] or \
                    age < agent.cfg.gc_worktrees_unused:
                continue
            size = 0
            if await agent.engine.volume_exists(row["volume"]):
                size = await trio.to_thread.run_sync(
                    tree_size, await agent.engine.volume_path(row["volume"]))
            add(Removal("worktree", row["volume"], f"no declared task checks it out and no "
                        f"run used it for {_days(age)} (gc.worktrees_unused)", size))
            if not dry_run:
                await agent.engine.remove_volumes([row["volume"]])
                await agent.state.call(agent.state.forget_worktree, row["volume"])

    async def _images(self, now: float, owner: str | None, dry_run: bool,
                      add: Callable[[Removal], None]) -> None:
        """Images this agent built from declarations (labelled so) whose tag
        no declared task runs in any more, and that no run used for
        gc.images_unused."""
        agent = self.agent
        wanted = {t.image for t in agent.decls.tasks.values()} | {
            s.image for t in agent.decls.tasks.values() for s in t.stages if s.image}
        current = set()
        for name, declared in agent.decls.images.items():
            if name in wanted:
                with contextlib.suppress(EfciError, OSError):  # a context gone: not current
                    current.add(await trio.to_thread.run_sync(image_tag, declared))
        busy = {run.task.image for run in agent.runs.active.values()}
        last_used = await agent.state.call(agent.state.image_last_used)
        for tag in await agent.engine.labelled_images({"instance": agent.instance,
                                                       "image": ""}):
            if tag in current or tag in busy:
                continue
            age = now - last_used.get(tag, 0.0)
            if age < agent.cfg.gc_images_unused:
                continue
            used = (f"no run used it for {_days(age)}" if tag in last_used
                    else "no run ever used it")
            add(Removal("image", tag, f"no declared task runs in it and {used} "
                        "(gc.images_unused)", 0))
            if not dry_run:
                await agent.engine.remove_image(tag)

    async def _orphans(self, now: float, owner: str | None, dry_run: bool,
                       add: Callable[[Removal], None]) -> None:
        agent = self.agent
        ours = {"instance": agent.instance}
        for kind in ("container", "volume"):
            for name, run in (await agent.engine.labelled(kind, ours, "run")).items():
                why = await self._orphaned(int(run)) if run.isdigit() else None
                if why is None:
                    continue
                size = 0
                if kind == "volume":
                    size = await trio.to_thread.run_sync(
                        tree_size, await agent.engine.volume_path(name))
                add(Removal(kind, name, why, size))
                if not dry_run:
                    if kind == "container":
                        await agent.engine.remove(name)
                    else:
                        await agent.engine.remove_volumes([name])
        for run_id in await agent.mutations.runs_with_layers():
            why = await self._orphaned(run_id)
            if why is None:
                continue
            where = await agent.mutations.run_layers(run_id)
            add(Removal("layers", str(where), why,
                        await trio.to_thread.run_sync(tree_size, where)))
            if not dry_run:
                await agent.mutations.remove(run_id)

    async def _orphaned(self, run_id: int) -> str | None:
        """Why what carries run ``run_id``'s mark is an orphan, or None if
        it is not (its run is known and kept, or busy)."""
        if self._busy(run_id):
            return None
        record = await self.agent.state.call(self.agent.state.get_run, run_id)
        if record is not None and record.removed_at is None:
            return None
        return ("left by a crash: its run is unknown" if record is None else
                f"left by a crash: run {run_id} was removed")
