"""Free space where the agent and dockerd write: the state store, the
logs, Docker's data root (images, containers, volumes: the worktrees and
upper layers) and the caches.  A full one of these is what stops a CI
host, so queued runs wait while any has less than ``runs.min_free``
(psutil's statvfs: no process, no I/O).

And the space a run's writable layers take, which its ``limits.disk``
bounds (:func:`space_taken`)."""

from __future__ import annotations

import inspect
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import trio

from .names import human_size


def usage(places: Mapping[str, Path | None], min_free: int) -> dict[str, dict[str, Any]]:
    """Free and total bytes of each place's filesystem, and its low-water
    mark (places that do not exist, such as caches on a host without them,
    are left out)."""
    found = {}
    for name, path in places.items():
        if path is None:
            continue
        try:
            disk = psutil.disk_usage(str(path))
        except OSError:
            continue
        found[name] = {"path": str(path), "free": disk.free, "total": disk.total,
                       "low_water": low_water(disk.total, min_free)}
    return found


def low_water(total: int, min_free: int) -> int:
    """Free bytes below which a filesystem counts as nearly full:
    ``min_free``, or a tenth of a filesystem too small for it (a dedicated
    cache filesystem of a few hundred MiB, say)."""
    return min(min_free, total // 10)


def shortages(places: Mapping[str, Path | None], min_free: int) -> list[str]:
    """Each place whose filesystem is nearly full, in words."""
    found = []
    for name, disk in usage(places, min_free).items():
        mark = low_water(disk["total"], min_free)
        if disk["free"] < mark:
            found.append(f"{name} ({disk['path']}) has {human_size(disk['free'])} free, less "
                         f"than {human_size(mark)} (runs.min_free"
                         + (")" if mark == min_free else ", or a tenth of its filesystem)"))
    return found


def space_taken(roots: Iterable[Path]) -> int:
    """Bytes the files under ``roots`` take on disk (allocated blocks, as
    du(1) counts them: a hard-linked file once, sparse holes not at all),
    without following symbolic links or crossing into another filesystem.
    For the run's writable layers, which are plain directories that no
    filesystem quota covers; a vanishing entry (the task deletes as it
    goes) is skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        try:
            device = os.lstat(root).st_dev
        except OSError:
            continue
        stack = [str(root)]
        while stack:
            try:
                entries = os.scandir(stack.pop())
            except OSError:
                continue
            with entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                        stack.append(entry.path)
    return total


# Debian 12's trio (0.22) calls it cancellable; newer ones abandon_on_cancel.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in
            inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")


async def space_taken_in_thread(roots: list[Path]) -> int:
    """:func:`space_taken` in a worker thread, left to finish alone if the
    caller is cancelled (counting a huge tree must not hold up a teardown)."""
    abandon: dict[str, Any] = {_ABANDON: True}
    return int(await trio.to_thread.run_sync(space_taken, roots, **abandon))
