"""Free space where the agent and dockerd write: the state store, the
logs, Docker's data root (images, containers, volumes: the worktrees and
upper layers) and the caches.  A full one of these is what stops a CI
host, so queued runs wait while any has less than ``runs.min_free``
(psutil's statvfs: no process, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

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
