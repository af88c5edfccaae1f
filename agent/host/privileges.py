"""What a task must not leave in a host directory it could write: files
that run with privileges (setuid or setgid bits) and device nodes.

While a run goes on, its deploy targets are nosuid,nodev guards (see
:mod:`agent.host.mounts`) and task containers cannot make device nodes
(CAP_MKNOD is dropped) or file capabilities (CAP_SETFCAP is dropped).  But
a setuid bit a task sets lands on disk, and a host user would run the file
through the host's own path once the guard is gone (the agent stopped, the
host rebooted).  So after every run the agent clears such bits and removes
device nodes below each deploy target: :func:`clear_privileges`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID


def clear_privileges(root: Path) -> list[str]:
    """Clear setuid/setgid bits of regular files and remove character and
    block devices below ``root``; returns what was done, one line each.

    Walks by directory descriptors and opens with O_NOFOLLOW, so a symlink
    planted in the tree never leads the agent outside it."""
    done = []
    for _, _, files, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in files:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dirfd)
                done.append(f"removed the device node {_relative(root, dirfd, name)}")
            elif stat.S_ISREG(st.st_mode) and st.st_mode & PRIVILEGE_BITS \
                    and _clear_bits(name, dirfd, st):
                done.append(f"cleared the setuid/setgid bits of {_relative(root, dirfd, name)}")
    return done


def _clear_bits(name: str, dirfd: int, seen: os.stat_result) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or not stat.S_ISREG(st.st_mode):
            return False  # replaced meanwhile; the next sweep looks again
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~PRIVILEGE_BITS)
        return True
    finally:
        os.close(fd)


def _relative(root: Path, dirfd: int, name: str) -> str:
    here = Path(os.readlink(f"/proc/self/fd/{dirfd}"))
    with contextlib.suppress(ValueError):
        return str((here / name).relative_to(root))
    return name
