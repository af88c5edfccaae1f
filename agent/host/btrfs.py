"""btrfs, as caches need it: subvolumes, read-only snapshots and qgroup
limits, through btrfs-progs (argument lists only, via agent.host.command).

Usage figures come from the kernel's qgroups (``btrfs qgroup show --raw``),
never from walking the files.  btrfs-progs 6.2 (Debian 12) cannot print
qgroups as JSON, so its table is parsed: the columns are fixed (id,
referenced, exclusive, max referenced, max exclusive, path).  When the
kernel marks the figures inconsistent (after large deletions, or when
quotas were just enabled) the tool says so on stderr; :func:`usage`
reports it so that callers can rescan and say so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import command

BTRFS = "btrfs"
QGROUP_LINE = re.compile(r"(\d+/\d+)\s+(\d+)\s+(\d+)\s+(\d+|none)\s+(\d+|none)\b")
INCONSISTENT = "inconsistent"
NOT_ENABLED = ("quotas not enabled", "not enabled")
SUBVOLUME_INODE = 256  # every subvolume's root directory has this inode number


@dataclass(frozen=True)
class Usage:
    referenced: int  # bytes the subvolume refers to
    exclusive: int  # bytes only it refers to (not shared with snapshots)
    limit: int | None  # max referenced, if limited


@dataclass(frozen=True)
class Usages:
    by_group: dict[str, Usage]  # "0/<subvolume id>", "1/<n>" (a group of subvolumes)
    inconsistent: bool  # the kernel says a rescan is needed


def is_subvolume(path: Path) -> bool:
    """A real directory (not a symlink) that is a subvolume's root."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == SUBVOLUME_INODE and os.path.isdir(path) and not os.path.islink(path)


async def quotas_enabled(root: Path) -> bool:
    result = await command.run([BTRFS, "qgroup", "show", str(root)], check=False)
    if result.returncode == 0:
        return True
    if any(s in result.stderr.decode(errors="replace").lower() for s in NOT_ENABLED):
        return False
    await command.run([BTRFS, "qgroup", "show", str(root)])  # raises, saying why
    return False


async def enable_quotas(root: Path) -> None:
    await command.run([BTRFS, "quota", "enable", str(root)])


async def rescan(root: Path) -> None:
    """Start recomputing every qgroup (returns at once; one already running is fine)."""
    result = await command.run([BTRFS, "quota", "rescan", str(root)], check=False)
    if result.returncode != 0 and b"in progress" not in result.stderr:
        await command.run([BTRFS, "quota", "rescan", str(root)])


async def create_subvolume(path: Path, *, group: str | None = None) -> None:
    """A new subvolume at ``path``, a member of qgroup ``group`` if given."""
    await command.run([BTRFS, "subvolume", "create", *(["-i", group] if group else []),
                       str(path)])


async def snapshot(source: Path, target: Path, *, readonly: bool,
                   group: str | None = None) -> None:
    await command.run([BTRFS, "subvolume", "snapshot", *(["-r"] if readonly else []),
                       *(["-i", group] if group else []), str(source), str(target)])


async def create_group(root: Path, group: str) -> None:
    """A higher-level qgroup (``1/N``); one left by an earlier try is reused."""
    result = await command.run([BTRFS, "qgroup", "create", group, str(root)], check=False)
    if result.returncode != 0 and b"exists" not in result.stderr.lower():
        await command.run([BTRFS, "qgroup", "create", group, str(root)])


async def destroy_group(root: Path, group: str) -> None:
    await command.run([BTRFS, "qgroup", "destroy", group, str(root)], check=False)


async def set_group_limit(root: Path, group: str, limit: int) -> None:
    await command.run([BTRFS, "qgroup", "limit", str(limit), group, str(root)])


async def set_readonly(path: Path) -> None:
    await command.run([BTRFS, "property", "set", "-ts", str(path), "ro", "true"])


async def subvolume_id(path: Path) -> int:
    result = await command.run([BTRFS, "inspect-internal", "rootid", str(path)])
    return int(result.stdout.split()[0])


async def delete_subvolume(path: Path) -> None:
    """Delete it (works over quota too); its qgroup goes stale until the
    cleaner has dropped the data: :func:`clear_stale` later."""
    await command.run([BTRFS, "subvolume", "delete", "--commit-after", str(path)])


async def clear_stale(root: Path) -> None:
    """Wait for deleted subvolumes to be cleaned, then drop their qgroups."""
    await command.run([BTRFS, "subvolume", "sync", str(root)])
    await command.run([BTRFS, "qgroup", "clear-stale", str(root)], check=False)


async def set_limit(path: Path, limit: int) -> None:
    """The subvolume's own qgroup limit on referenced bytes."""
    await command.run([BTRFS, "qgroup", "limit", str(limit), str(path)])


async def usage(root: Path) -> Usages:
    """Every qgroup of the filesystem holding ``root``, as of now (--sync
    commits the transaction first: the kernel accounts at commit)."""
    result = await command.run([BTRFS, "qgroup", "show", "--sync", "--raw", "-re", str(root)])
    return parse_usage(result.stdout.decode(errors="replace"),
                       result.stderr.decode(errors="replace"))


def parse_usage(stdout: str, stderr: str) -> Usages:
    by_group = {}
    for line in stdout.splitlines():
        m = QGROUP_LINE.match(line.strip())
        if m:
            limit = None if m[4] == "none" else int(m[4])
            by_group[m[1]] = Usage(int(m[2]), int(m[3]), limit)
    return Usages(by_group, INCONSISTENT in stderr.lower())
