"""A container's pids cgroup, to tell whether it reached its pids limit.

Docker reports an OOM kill in the container's state, but not a fork that
failed at ``--pids-limit``; the kernel counts those in ``pids.events``
("max N"), in cgroup v1's pids hierarchy and in cgroup v2 alike.  The
cgroup goes away with the container, so the run reads it while it runs.
"""

from __future__ import annotations

from pathlib import Path


def _pids_root(mountinfo: str) -> Path | None:
    """Where the pids controller is mounted: v1's pids hierarchy, else v2's."""
    v2 = None
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fstype, _, options = [*after.split(" "), "", "", ""][:3]
        point = Path(before.split(" ")[4])
        if fstype == "cgroup" and "pids" in options.split(","):
            return point
        if fstype == "cgroup2" and v2 is None:
            v2 = point
    return v2


def pids_events(container_id: str, mountinfo: str | None = None) -> Path | None:
    """The container's ``pids.events``, under either of Docker's cgroup
    drivers (cgroupfs: docker/<id>; systemd: system.slice/docker-<id>.scope),
    or None if it is not there (not running, or another cgroup parent)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    root = _pids_root(mountinfo)
    if root is None or not container_id:
        return None
    for relative in (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"):
        path = root / relative / "pids.events"
        if path.exists():
            return path
    return None


def limit_reached(events: Path) -> int:
    """How often a fork failed at the limit so far (0 if it cannot be read)."""
    try:
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
