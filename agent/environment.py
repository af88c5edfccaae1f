"""A run's environment on the host: the worktrees it uses, its overlay
views of them, its caches, its progress channel, and what it may leave in
its deploy targets.  Opened by one async context manager, for a run's container and
for ``efci shell`` alike, and torn down step by step in reverse, each step
shielded from cancellation with a deadline of its own: one step that fails
or runs late never skips the next (an AsyncExitStack runs them all).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import timings
from .access import sweep_target
from .caches import Caches
from .checkout import Checkouts, Worktree
from .host.engine import Mount
from .model import Task
from .mutations import Mutations
from .progress import ProgressChannels, Update

log = logging.getLogger(__name__)

# Longest one teardown step may take once the run is cut short.
STEP_DEADLINE = 30

# Takes the run's worktrees (checks them out, or takes uses of the ones it
# has), appending each to the list as soon as it holds it.
Take = Callable[[list[Worktree]], Awaitable[None]]


@dataclass(frozen=True)
class Environment:
    views: list[tuple[Path, str]]  # (host path of the overlay view, its name under /src)
    progress_dir: Path | None  # to mount at /run/efci, if a progress channel was asked for
    caches: list[Mount]  # the task's caches, bound at their paths


def shielded(what: str, step: Callable[..., Awaitable[Any]], *args: Any,
             deadline: float = STEP_DEADLINE) -> Callable[[], Awaitable[None]]:
    """A teardown step that cancellation cannot skip and that cannot hold the
    rest up for longer than ``deadline``."""

    async def run_step() -> None:
        with trio.move_on_after(deadline) as scope:
            scope.shield = True
            await step(*args)
        if scope.cancelled_caught:
            log.error("%s did not finish within %ss; going on without it", what, deadline)

    return run_step


class Environments:
    def __init__(self, checkouts: Checkouts, mutations: Mutations,
                 progress: ProgressChannels, caches: Caches) -> None:
        self.checkouts = checkouts
        self.mutations = mutations
        self.progress = progress
        self.caches = caches

    @asynccontextmanager
    async def open(self, run_id: int, take: Take, *, targets: Sequence[Path] = (),
                   report: Update | None = None, task: Task | None = None, stage: int = 0,
                   say: Callable[[str], object] = log.info) -> AsyncIterator[Environment]:
        """Worktrees, views, (with ``task``) its caches and (with ``report``)
        the progress channel, for the block; in a pipeline, the views of
        stage ``stage``.  Afterwards, in this order: the
        channel is closed, the caches given back, the views unmounted, the
        worktrees given back, and the deploy ``targets`` swept of setuid
        bits and devices (``say`` tells what)."""
        async with AsyncExitStack() as stack:
            for path in targets:  # last: after the container can no longer write
                stack.push_async_callback(shielded(f"the sweep of {path}", sweep_target,
                                                   path, say))
            worktrees: list[Worktree] = []
            stack.callback(self._release, worktrees)
            await take(worktrees)
            stack.push_async_callback(shielded(f"unmounting run {run_id}'s views",
                                               self.mutations.unmount, run_id))
            with timings.phase("overlay mounts"):
                views = [(await self.mutations.mount(run_id, i, w.volume, w.mount_name, stage),
                          w.mount_name) for i, w in enumerate(worktrees)]
            caches: list[Mount] = []
            if task is not None and task.caches:
                stack.push_async_callback(shielded(f"giving back run {run_id}'s caches",
                                                   self.caches.unmount, run_id))
                with timings.phase("cache mounts"):
                    caches = await self.caches.mount(run_id, task, say)
            progress_dir = None
            if report is not None:
                progress_dir = await stack.enter_async_context(self.progress.open(run_id, report))
            yield Environment(views, progress_dir, caches)

    def _release(self, worktrees: list[Worktree]) -> None:
        for worktree in worktrees:
            self.checkouts.release(worktree)
