"""overlayfs: a run's writable view of a read-only base worktree.

The base worktree volume's directory is the lower layer, never written; the
run's mutations volume holds the upper and work directories; the merged view
is mounted under the agent's state directory and bind-mounted into the task
container.  Unmounting is idempotent, and :func:`mounted_under` finds what a
crashed agent left mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import trio

# mount(2) and umount2(2) directly: util-linux mount refuses callers that are
# not root, and the service runs as its own user with CAP_SYS_ADMIN.
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MNT_DETACH = 2


def overlay_options(lower: Path, upper: Path, work: Path) -> str:
    for path in (lower, upper, work):
        if any(c in str(path) for c in ",:\\"):
            raise ValueError(f"{path} cannot be an overlay layer (',', ':' or '\\\\' in it)")
    return f"lowerdir={lower},upperdir={upper},workdir={work}"


def _mount(options: str, target: Path) -> None:
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount overlay on {target} ({options}): {os.strerror(err)}")


def _umount(target: Path, flags: int) -> int:
    return 0 if _libc.umount2(os.fsencode(target), flags) == 0 else ctypes.get_errno()


async def mount(lower: Path, upper: Path, work: Path, target: Path) -> None:
    options = overlay_options(lower, upper, work)
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(_mount, options, target)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounted_under(root: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    points = []
    for line in mountinfo.splitlines():
        point = Path(_unescape(line.split(" ")[4]))
        if point == root or root in point.parents:
            points.append(point)
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def is_mounted(target: Path) -> bool:
    return target in mounted_under(target)


async def unmount(target: Path) -> None:
    """Unmount if mounted; a busy mount is detached lazily (it goes away when
    its last user does) rather than left behind."""
    if not is_mounted(target):
        return
    if await trio.to_thread.run_sync(_umount, target, 0) and is_mounted(target):
        err = await trio.to_thread.run_sync(_umount, target, MNT_DETACH)
        if err:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
