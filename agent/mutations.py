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

from .config import AgentConfig
from .host import docker, mounts


class Mutations:
    def __init__(self, cfg: AgentConfig, instance: str) -> None:
        self.cfg = cfg
        self.instance = instance
        self.root = cfg.state_dir / "mounts"

    def volume_name(self, run_id: int, index: int) -> str:
        return f"efci-{self.instance}-{run_id}-mut-{index}"

    def merged_path(self, run_id: int, mount_name: str) -> Path:
        return self.root / str(run_id) / mount_name

    async def mount(self, run_id: int, index: int, base_volume: str, mount_name: str) -> Path:
        """Mount the run's view of one worktree (creating its mutations volume
        the first time; a restart mounts the same one again)."""
        volume = self.volume_name(run_id, index)
        if not await docker.volume_exists(self.cfg.docker, volume):
            await docker.create_volume(self.cfg.docker, volume, {
                docker.LABEL_PREFIX + "instance": self.instance,
                docker.LABEL_PREFIX + "run": str(run_id),
                docker.LABEL_PREFIX + "base": base_volume})
        lower = await docker.volume_path(self.cfg.docker, base_volume)
        layers = await docker.volume_path(self.cfg.docker, volume)
        merged = self.merged_path(run_id, mount_name)
        await mounts.mount_overlay(lower, layers / "upper", layers / "work", merged)
        return merged

    async def unmount(self, run_id: int) -> None:
        """Unmount every view of the run; idempotent."""
        await self._unmount_below(self.root / str(run_id))

    async def unmount_all(self) -> None:
        """What a stopped or crashed agent left mounted."""
        await self._unmount_below(self.root)

    async def _unmount_below(self, root: Path) -> None:
        for point in mounts.mounted_under(root):
            await mounts.unmount(point)
        if root.is_dir():
            for directory in sorted(root.glob("**/"), key=lambda p: len(p.parts),
                                    reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    async def remove(self, run_id: int) -> None:
        """Unmount and delete the run's mutations volumes."""
        await self.unmount(run_id)
        await docker.remove_volumes(self.cfg.docker,
                                    {"instance": self.instance, "run": str(run_id)})
