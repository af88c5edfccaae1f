"""Kernel mounts: overlayfs views, nosuid guards, and the mount table.

* An overlay is a run's writable view of a read-only base worktree: the
  base worktree volume's directory is the lower layer, never written; the
  run's mutations volume holds the upper and work directories; the merged
  view is mounted under the agent's state directory and bind-mounted into
  the task container.
* A guard is a host directory a task may write (a deploy target) bound
  over itself with ``nosuid,nodev``: while it is in place, nothing a task
  plants there runs setuid or opens a device, through the host's own path
  as much as inside containers (a bind mount of it inherits the flags).

Every mount made here is ``nosuid,nodev``.  Unmounting is idempotent, and
:func:`mounted_under` finds what a crashed agent left mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

# mount(2) and umount2(2) directly: util-linux mount refuses callers that are
# not root, and the service runs as its own user with CAP_SYS_ADMIN.
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND = 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
# Per-mount flags as /proc/self/mountinfo names them; a bind remount sets
# all of them at once, so the ones in force are carried over.
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
          "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(source.encode(), os.fsencode(target),
                   fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({data or fstype or 'bind'}): "
                           f"{os.strerror(err)}")


def _umount(target: Path, flags: int) -> int:
    return 0 if _libc.umount2(os.fsencode(target), flags) == 0 else ctypes.get_errno()


# -- the mount table -----------------------------------------------------------------

@dataclass(frozen=True)
class MountEntry:
    point: Path
    options: frozenset[str]  # the per-mount options (rw, nosuid, ...)
    fstype: str = ""
    source: str = ""  # the device (or what stands for it): one per filesystem


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


def mount_table(mountinfo: str | None = None) -> list[MountEntry]:
    """Every mount, in the kernel's order (a later one at a point is on top)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    entries = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        # Optional fields end with "-"; the filesystem type and source follow.
        rest = fields[fields.index("-", 6) + 1:]
        entries.append(MountEntry(Path(_unescape(fields[4])), frozenset(fields[5].split(",")),
                                  rest[0], _unescape(rest[1])))
    return entries


def mounted_under(root: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount)."""
    points = dict.fromkeys(e.point for e in mount_table(mountinfo)
                           if e.point == root or root in e.point.parents)
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def top_mount(target: Path, mountinfo: str | None = None) -> MountEntry | None:
    """The mount on top at exactly ``target``, if it is a mount point."""
    found = [e for e in mount_table(mountinfo) if e.point == target]
    return found[-1] if found else None


def mount_of(path: Path, mountinfo: str | None = None) -> MountEntry | None:
    """The mount that ``path`` (absolute, resolved) is on: the deepest mount
    point at or above it, the top one there."""
    best = None
    for entry in mount_table(mountinfo):  # a later mount at a point is on top
        if (entry.point == path or entry.point in path.parents) and (
                best is None or len(entry.point.parts) >= len(best.point.parts)):
            best = entry
    return best


def is_mounted(target: Path) -> bool:
    return top_mount(target) is not None


async def unmount(target: Path) -> None:
    """Unmount what is on top at ``target``, if anything; a busy mount is
    detached lazily (it goes away when its last user does) rather than
    left behind."""
    if not is_mounted(target):
        return
    err = await trio.to_thread.run_sync(_umount, target, 0)
    if err == errno.EBUSY:
        err = await trio.to_thread.run_sync(_umount, target, MNT_DETACH)
    if err and err != errno.EINVAL:  # EINVAL: no longer a mount point
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


# -- overlays --------------------------------------------------------------------------

# One page of mount options at most, and the kernel's limit of lower layers
# (OVL_MAX_STACK); past either, mount(2) fails with a bare EINVAL.
OPTIONS_MAX = 4095
LOWERS_MAX = 500


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """Mount options of an overlay; ``lowers`` top first."""
    for path in (*lowers, upper, work):
        if any(c in str(path) for c in ",:\\"):
            raise ValueError(f"{path} cannot be an overlay layer (',', ':' or '\\\\' in it)")
    options = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    if len(lowers) > LOWERS_MAX or len(options) > OPTIONS_MAX:
        raise ValueError(f"an overlay of {len(lowers)} lower layers needs {len(options)} "
                         f"bytes of mount options; the kernel takes at most {LOWERS_MAX} layers "
                         f"and {OPTIONS_MAX} bytes")
    return options


async def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    options = overlay_options(lowers, upper, work)
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    await trio.to_thread.run_sync(_mount, "overlay", target, "overlay",
                                  MS_NOSUID | MS_NODEV, options)


# -- nosuid guards -----------------------------------------------------------------------

def guard(path: Path) -> bool:
    """Make ``path`` nosuid,nodev where it is (a bind of it over itself,
    keeping its other flags), unless the mount on top there already is.
    Returns whether a bind was made."""
    top = top_mount(path)
    if top is not None and {"nosuid", "nodev"} <= top.options:
        return False
    _mount(str(path), path, None, MS_BIND, None)
    kept = _flags_of(top_mount(path))
    try:
        _mount(str(path), path, None, MS_BIND | MS_REMOUNT | kept | MS_NOSUID | MS_NODEV, None)
    except OSError:
        _umount(path, MNT_DETACH)
        raise
    return True


def _flags_of(entry: MountEntry | None) -> int:
    flags = 0
    for option in entry.options if entry else ():
        flags |= _FLAGS.get(option, 0)
    return flags


class Guards:
    """The guards this agent made, to take away when it stops.  One found
    in place (made by an agent that was killed) is left alone: it only
    protects."""

    def __init__(self) -> None:
        self._made: set[Path] = set()
        self._lock = trio.Lock()

    async def ensure(self, path: Path) -> None:
        async with self._lock:
            if await trio.to_thread.run_sync(guard, path):
                self._made.add(path)

    async def remove_all(self) -> None:
        async with self._lock:
            for path in sorted(self._made):
                await unmount(path)
            self._made.clear()
