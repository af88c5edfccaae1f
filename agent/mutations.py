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
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .config import AgentConfig
from .errors import RunFailed
from .host import mounts
from .host.engine import LABEL_PREFIX, Engine


class Mounter(Protocol):
    """The kernel's mounts as mutations need them (agent.host.mounts)."""

    async def mount_overlay(self, lowers: Sequence[Path], upper: Path, work: Path,
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

    def volume_name(self, run_id: int, index: int, stage: int = 0) -> str:
        return f"efci-{self.instance}-{run_id}-mut-{index}" + (f"-s{stage}" if stage else "")

    def merged_path(self, run_id: int, mount_name: str, stage: int = 0) -> Path:
        # ".sN" cannot be a mount name (those begin with a letter or digit).
        return self.root / str(run_id) / (f".s{stage}" if stage else "") / mount_name

    async def mount(self, run_id: int, index: int, base_volume: str, mount_name: str,
                    stage: int = 0) -> Path:
        """Mount the run's view of one worktree (creating its mutations volume
        the first time; a restart mounts the same one again).  In a
        pipeline, stage N's view has the upper layers the stages before it
        left as lower layers, the latest on top, over the base worktree."""
        volume = self.volume_name(run_id, index, stage)
        # One docker process, whether the volume is new or a restart's (kept).
        await self.engine.create_volume(volume, {
            LABEL_PREFIX + "instance": self.instance,
            LABEL_PREFIX + "run": str(run_id),
            LABEL_PREFIX + "stage": str(stage),
            LABEL_PREFIX + "base": base_volume})
        lowers = [await self.engine.volume_path(self.volume_name(run_id, index, earlier)) / "upper"
                  for earlier in range(stage - 1, -1, -1)]
        lowers.append(await self.engine.volume_path(base_volume))
        layers = await self.engine.volume_path(volume)
        merged = self.merged_path(run_id, mount_name, stage)
        try:
            await self.mounter.mount_overlay(lowers, layers / "upper", layers / "work", merged)
        except ValueError as e:  # past the kernel's limits: say so, not a bare EINVAL
            raise RunFailed(f"the view of /src/{mount_name} cannot be mounted: {e}") from None
        return merged

    async def unmount(self, run_id: int) -> None:
        """Unmount every view of the run; idempotent."""
        await self._unmount_below(self.root / str(run_id))

    async def unmount_all(self) -> None:
        """What a stopped or crashed agent left mounted."""
        await self._unmount_below(self.root)

    async def _unmount_below(self, root: Path) -> None:
        if not root.exists():
            return  # nothing can be mounted below it (and the mount table is not free)
        for point in self.mounter.mounted_under(root):
            await self.mounter.unmount(point)
        if root.is_dir():
            for directory in sorted(root.glob("**/"), key=lambda p: len(p.parts),
                                    reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    async def layer_dirs(self, run_id: int, worktrees: int, stage: int) -> list[Path]:
        """Where the run's upper layers are, the stages' up to ``stage``
        (what its ``limits.disk`` counts, with its container's own layer)."""
        return [await self.engine.volume_path(self.volume_name(run_id, index, earlier))
                for index in range(worktrees) for earlier in range(stage + 1)]

    async def layers_exist(self, run_id: int, worktrees: int, stage: int) -> bool:
        return all([await self.engine.volume_exists(self.volume_name(run_id, index, stage))
                    for index in range(worktrees)])

    async def remove_stage(self, run_id: int, stage: int) -> None:
        """Delete one pipeline stage's mutations volumes (the run's views
        must be unmounted)."""
        await self.engine.remove_volumes({"instance": self.instance, "run": str(run_id),
                                          "stage": str(stage)})

    async def remove(self, run_id: int) -> None:
        """Unmount and delete the run's mutations volumes."""
        await self.unmount(run_id)
        await self.engine.remove_volumes({"instance": self.instance, "run": str(run_id)})
