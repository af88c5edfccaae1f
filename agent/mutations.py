"""Worktree mutations: each run's writable layer over its base worktrees.

For every repository entry a run gets a mutations volume (unique to the run)
holding overlayfs' upper and work directories; the agent mounts the overlay
with the base worktree volume as the read-only lower layer at
``<state>/mounts/<run>/<name>``, and the task container sees that merged
view at ``/src/<name>``.  The task can write anywhere in it; the base is
never modified.  Mounts exist only while the run's container runs; the
volumes stay (with the stopped container) until ``efci rm``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

from .config import AgentConfig
from .host import mounts
from .host.engine import LABEL_PREFIX, Engine


class Mounter(Protocol):
    """The kernel's mounts as mutations need them (agent.host.mounts)."""

    async def mount_overlay(self, lower: Path, upper: Path, work: Path,
                            target: Path) -> None: ...

    async def unmount(self, target: Path) -> None: ...

    def mounted_under(self, root: Path, mountinfo: str | None = None) -> list[Path]: ...


class Mutations:
    def __init__(self, cfg: AgentConfig, engine: Engine, instance: str,
                 mounter: Mounter = mounts) -> None:
        self.cfg = cfg
        self.engine = engine
        self.instance = instance
        self.mounter = mounter
        self.root = cfg.state_dir / "mounts"

    def volume_name(self, run_id: int, index: int) -> str:
        return f"efci-{self.instance}-{run_id}-mut-{index}"

    def merged_path(self, run_id: int, mount_name: str) -> Path:
        return self.root / str(run_id) / mount_name

    async def mount(self, run_id: int, index: int, base_volume: str, mount_name: str) -> Path:
        """Mount the run's view of one worktree (creating its mutations volume
        the first time; a restart mounts the same one again)."""
        volume = self.volume_name(run_id, index)
        if not await self.engine.volume_exists(volume):
            await self.engine.create_volume(volume, {
                LABEL_PREFIX + "instance": self.instance,
                LABEL_PREFIX + "run": str(run_id),
                LABEL_PREFIX + "base": base_volume})
        lower = await self.engine.volume_path(base_volume)
        layers = await self.engine.volume_path(volume)
        merged = self.merged_path(run_id, mount_name)
        await self.mounter.mount_overlay(lower, layers / "upper", layers / "work", merged)
        return merged

    async def unmount(self, run_id: int) -> None:
        """Unmount every view of the run; idempotent."""
        await self._unmount_below(self.root / str(run_id))

    async def unmount_all(self) -> None:
        """What a stopped or crashed agent left mounted."""
        await self._unmount_below(self.root)

    async def _unmount_below(self, root: Path) -> None:
        for point in self.mounter.mounted_under(root):
            await self.mounter.unmount(point)
        if root.is_dir():
            for directory in sorted(root.glob("**/"), key=lambda p: len(p.parts),
                                    reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    async def remove(self, run_id: int) -> None:
        """Unmount and delete the run's mutations volumes."""
        await self.unmount(run_id)
        await self.engine.remove_volumes({"instance": self.instance, "run": str(run_id)})
