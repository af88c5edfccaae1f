"""Worktree mutations: each run's writable layer over its base worktrees.

For every repository entry a run gets a layer directory of its own (upper
and work directories for overlayfs) in the agent's layers volume, one named
Docker volume per agent instance (``efci-<instance>-layers``), so the
layers live where docker keeps the worktrees and count in ``docker system
df``.  The agent mounts the overlay with the base worktree volume as the
read-only lower layer at ``<state>/mounts/<run>/<name>``, and the task
container sees that merged view at ``/src/<name>``.  The task can write
anywhere in it; the base is never modified.  Mounts exist only while the
run's container runs; the layers stay (with the stopped container) until
``efci rm``.

A directory, not a volume per run as the seed had it: making a volume is a
docker process (12-15 ms) on every run's path, and a directory is a mkdir.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import trio

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
        self.volume = f"efci-{instance}-layers"
        self._root: Path | None = None

    async def layers_root(self) -> Path:
        """The layers volume's directory, the volume made if it is not
        there (the first run's, or after someone removed it)."""
        if self._root is None or not self._root.is_dir():
            if not await self.engine.volume_exists(self.volume):
                await self.engine.create_volume(self.volume, {
                    LABEL_PREFIX + "instance": self.instance, LABEL_PREFIX + "layers": "1"})
            self._root = await self.engine.volume_path(self.volume)
        return self._root

    async def run_layers(self, run_id: int) -> Path:
        """Where the run's layers are (its directory may not exist)."""
        return await self.layers_root() / str(run_id)

    async def layer_dir(self, run_id: int, index: int, stage: int = 0) -> Path:
        return await self.run_layers(run_id) / (f"{index}-s{stage}" if stage else str(index))

    def merged_path(self, run_id: int, mount_name: str, stage: int = 0) -> Path:
        # ".sN" cannot be a mount name (those begin with a letter or digit).
        return self.root / str(run_id) / (f".s{stage}" if stage else "") / mount_name

    async def mount(self, run_id: int, index: int, base_volume: str, mount_name: str,
                    stage: int = 0) -> Path:
        """Mount the run's view of one worktree (its layer made the first
        time; a restart mounts the same one again).  In a pipeline, stage
        N's view has the upper layers the stages before it left as lower
        layers, the latest on top, over the base worktree."""
        layer = await self.layer_dir(run_id, index, stage)
        layer.mkdir(parents=True, exist_ok=True)  # what tells a retry the stage's layer is here
        lowers = [await self.layer_dir(run_id, index, earlier) / "upper"
                  for earlier in range(stage - 1, -1, -1)]
        lowers.append(await self.engine.volume_path(base_volume))
        merged = self.merged_path(run_id, mount_name, stage)
        try:
            await self.mounter.mount_overlay(lowers, layer / "upper", layer / "work", merged)
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
        return [await self.layer_dir(run_id, index, earlier)
                for index in range(worktrees) for earlier in range(stage + 1)]

    async def layers_exist(self, run_id: int, worktrees: int, stage: int) -> bool:
        return all([(await self.layer_dir(run_id, index, stage)).is_dir()
                    for index in range(worktrees)])

    async def remove_stage(self, run_id: int, stage: int) -> None:
        """Delete one pipeline stage's layers (the run's views must be
        unmounted)."""
        run = await self.run_layers(run_id)
        for layer in run.iterdir() if run.is_dir() else ():
            if _stage_of(layer.name) == stage:
                await _delete(layer)

    async def remove(self, run_id: int) -> None:
        """Unmount the run's views and delete its layers."""
        await self.unmount(run_id)
        await _delete(await self.run_layers(run_id))

    async def runs_with_layers(self) -> list[int]:
        """The runs that have layers here (for the orphan sweep)."""
        if not await self.engine.volume_exists(self.volume):
            return []
        return sorted(int(p.name) for p in (await self.layers_root()).iterdir()
                      if p.name.isdigit())


def _stage_of(layer: str) -> int:
    """The stage of a layer directory's name (``<index>`` or ``<index>-s<stage>``)."""
    return int(layer.partition("-s")[2] or 0)


async def _delete(tree: Path) -> None:
    """A layer tree gone, in a thread: it may hold a build's million files.
    (overlayfs leaves work/work mode 000: root deletes it all the same.)"""
    await trio.to_thread.run_sync(shutil.rmtree, tree, True)
