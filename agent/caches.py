"""Caches: btrfs subvolumes with qgroup limits, mounted into runs.

Layout under ``paths.caches``, a btrfs filesystem with quotas on::

    <root>/<owner>/<name>/data       a plain cache: one subvolume, written in place
    <root>/<owner>/<name>/gen-<N>    a layered cache's current snapshot (read-only)
    <root>/<owner>/<name>/run-<id>   a layered cache as run <id> sees and writes it

Every subvolume of a cache belongs to one level-1 qgroup, ``1/<cache id>``,
whose limit is the cache's quota: the kernel counts extents shared between
snapshots once and refuses writes past it (EDQUOT).

Ownership: a cache is its owner's (``alice/cargo``); the tasks that declare
it *claim* it.  A private cache is claimed by one task; a shared one by
several, and its usage is split equally between the tasks that claim it.
A claim no declaration makes any more is released at reload, and the cache
is removed when every claim has been released for ``caches.release_grace``
(or at once, by ``efci cache release``).

A layered cache: each run gets a writable snapshot of the current
generation, so no run changes what the next one sees until that run's
snapshot is promoted (``efci cache promote``, or ``promote: on-success``):
made read-only and renamed to the next generation, which the runs that
start after it get.  A snapshot, not an overlay: overlayfs over btrfs
subvolumes takes all layers for one filesystem while btrfs numbers inodes
per subvolume, so the view shows one inode number twice (find(1) reports a
filesystem loop; tar and rsync would take files for hard links), and
xino cannot help on what it sees as one filesystem.  A snapshot has none of
that, renames never fail with EXDEV, and promotion is a rename.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .config import AgentConfig
from .errors import Conflict, EfciError, NotFound, Refused, RunFailed
from .host import btrfs, mounts
from .host.engine import Mount
from .model import CacheUse, Task
from .state import StateStore

log = logging.getLogger(__name__)

SWEEP_EVERY = 60.0  # seconds between looks for caches due for removal
FULL = 0.95  # a failed run whose cache is this full was probably stopped by the quota


class CacheRefused(RunFailed):
    code = "cache_refused"


@dataclass
class InUse:
    """What one run holds of one cache."""

    cache_id: int
    use: CacheUse
    generation: int = 0  # layered: the snapshot under the run's view
    layer: Path | None = None  # layered: the run's writable snapshot


@dataclass
class Caches:
    cfg: AgentConfig
    state: StateStore
    root: Path = field(init=False)
    problem: str | None = "not checked yet"  # why no task may use caches now
    users: dict[int, list[InUse]] = field(default_factory=dict)  # run -> what it holds
    _ended: dict[int, list[InUse]] = field(default_factory=dict)  # held until after_run
    _stale: bool = False  # subvolumes were deleted: their qgroups are to be cleared
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def __post_init__(self) -> None:
        self.root = self.cfg.caches_root

    # -- the filesystem -----------------------------------------------------------------

    async def check(self, docker_root: Path | None) -> None:
        """Is paths.caches a btrfs filesystem with quotas on (turned on if
        caches.enable_quota), and not where Docker keeps its data?"""
        self.problem = await self._problem(docker_root)
        if self.problem:
            log.warning("caches: %s; tasks that declare caches are refused", self.problem)
        else:
            log.info("caches: btrfs with quotas at %s", self.root)

    async def _problem(self, docker_root: Path | None) -> str | None:
        where = f"paths.caches {self.root}"
        fix = (f"make one with scripts/make-cache-fs 10G {self.root}, or mount a btrfs "
               "filesystem there (README: Caches)")
        if not self.root.is_dir() or self.root.is_symlink():
            return f"{where} is not a directory; {fix}"
        here = mounts.mount_of(self.root.resolve())
        if here is None or here.fstype != "btrfs":
            return f"{where} is on {here.fstype if here else 'no'} filesystem, not btrfs; {fix}"
        if docker_root is not None:
            docker = mounts.mount_of(docker_root.resolve())
            if docker is not None and docker.source == here.source:
                return (f"Docker's data root {docker_root} is on the caches filesystem "
                        f"({here.source}); give the caches a filesystem of their own")
        if not await btrfs.quotas_enabled(self.root):
            if not self.cfg.caches_enable_quota:
                return (f"quotas are off on {where} and caches.enable_quota is false; turn "
                        f"them on with: btrfs quota enable {self.root}")
            log.info("caches: turning btrfs quotas on at %s (caches.enable_quota)", self.root)
            await btrfs.enable_quotas(self.root)
        return None

    # -- claims, from the declarations ----------------------------------------------------

    async def claim(self, tasks: list[Task]) -> None:
        claims = [{"owner": t.owner, "name": c.name, "task": t.name, "shared": c.shared,
                   "layered": c.layered, "quota": c.quota, "source": c.source}
                  for t in tasks for c in t.all_caches]
        for line in await self.state.call(self.state.claim_caches, claims):
            log.info("%s", line)

    # -- for runs -----------------------------------------------------------------------------

    async def mount(self, run_id: int, task: Task,
                    message: Callable[[str], object]) -> list[Mount]:
        """The run's cache mounts (for its container); :meth:`unmount`
        gives them back, then :meth:`after_run`."""
        if not task.caches:
            return []
        if self.problem:
            raise CacheRefused(f"task {task.qualified_name} declares caches, but {self.problem}")
        held = self.users.setdefault(run_id, [])
        out = []
        space = os.statvfs(self.root)
        async with self._lock:
            for use in task.caches:
                cache = await self._cache(task.owner, use.name)
                if self._quota(cache) > space.f_blocks * space.f_frsize:
                    raise CacheRefused(
                        f"cache {task.owner}/{use.name} ({use.source}): its quota of "
                        f"{self._quota(cache)} bytes (from {self._quota_from(cache)}) is more "
                        f"than the caches filesystem holds ({space.f_blocks * space.f_frsize} "
                        "bytes)")
                await self._make(cache, message)
                item = InUse(cache["id"], use)
                held.append(item)
                if use.layered:
                    item.layer = await self._run_layer(run_id, cache, item)
                    out.append(Mount("bind", str(item.layer), use.path, readonly=False))
                else:
                    out.append(Mount("bind", str(self._dir(cache) / "data"), use.path,
                                     readonly=False))
                await self.state.call(self.state.add_run_cache, run_id, cache["id"],
                                      item.generation)
                await self.state.call(self.state.update_cache, cache["id"],
                                      last_used_at=time.time())
                message(f"cache {task.owner}/{use.name} at {use.path}"
                        + (f" (layered, generation {item.generation})" if use.layered else ""))
        return out

    async def unmount(self, run_id: int) -> None:
        """The run's container no longer uses its caches; :meth:`after_run`
        comes next, once the run's result is known."""
        self._ended[run_id] = self.users.pop(run_id, [])

    def forget(self, run_id: int) -> None:
        """The run ended before :meth:`after_run` (refused, cancelled, broken)."""
        self._ended.pop(run_id, None)

    async def after_run(self, run_id: int, *, succeeded: bool,
                        say: Callable[[str], object]) -> list[str]:
        """Once the run has ended: promote the layered caches that ask for
        it if it succeeded; if it did not, say which caches it filled (the
        likely reason).  Returns those sentences."""
        held = self._ended.pop(run_id, [])
        full = [] if succeeded or not held else await self._full(run_id, held)
        for line in full:
            say(line)
        for item in held:
            if succeeded and item.use.promote_on_success:
                try:
                    generation = await self.promote(run_id, item.use.name, owner=None,
                                                    cache_id=item.cache_id)
                    say(f"cache {item.use.name}: this run's view is now its generation "
                        f"{generation} (promote: on-success)")
                except EfciError as e:
                    say(f"cache {item.use.name}: not promoted: {e.message}")
        return full

    async def _full(self, run_id: int, held: list[InUse]) -> list[str]:
        usages = await btrfs.usage(self.root)
        caches = {c["id"]: c for c in await self.state.call(self.state.caches)}
        out = []
        for item in held:
            cache = caches.get(item.cache_id)
            if cache is None:
                continue
            quota = self._quota(cache)
            if item.layer is None or not btrfs.is_subvolume(item.layer):
                used = usages.by_group.get(self._group(cache))
            else:  # the cache as the run saw it, limited on its own
                used = usages.by_group.get(f"0/{await btrfs.subvolume_id(item.layer)}")
            if used is not None and used.referenced >= FULL * quota:
                out.append(f"cache {cache['owner']}/{cache['name']} is full: "
                           f"{used.referenced} of its quota of {quota} bytes; writes past it "
                           "fail with 'Disk quota exceeded' (efci cache set-quota raises it)")
        return out

    # -- making and mounting ------------------------------------------------------------------

    async def _cache(self, owner: str, name: str) -> dict[str, Any]:
        for cache in await self.state.call(self.state.caches):
            if (cache["owner"], cache["name"]) == (owner, name):
                return cache
        raise NotFound(f"no cache {owner}/{name}; efci cache ls lists them")

    def _dir(self, cache: dict[str, Any]) -> Path:
        return self.root / cache["owner"] / cache["name"]

    def _quota(self, cache: dict[str, Any]) -> int:
        return int(cache["quota"] or cache["declared_quota"] or self.cfg.caches_default_quota)

    def _quota_from(self, cache: dict[str, Any]) -> str:
        return ("efci cache set-quota" if cache["quota"] else "the declaration"
                if cache["declared_quota"] else "caches.default_quota")

    def _group(self, cache: dict[str, Any]) -> str:
        return f"1/{cache['id']}"

    async def _make(self, cache: dict[str, Any], message: Callable[[str], object]) -> None:
        """Its directory, qgroup and subvolume(s): made the first time, and
        made again (empty) if removed behind the agent's back."""
        where = self._dir(cache)
        for part in (self.root / cache["owner"], where):
            if part.is_symlink() or (part.exists() and not part.is_dir()):
                raise CacheRefused(f"{part} is not the directory the agent made (a symlink or "
                                   f"a file); remove it, or efci cache rm {cache['name']} "
                                   f"--owner {cache['owner']} --force")
            part.mkdir(mode=0o755, exist_ok=True)
        if not cache["made"]:
            await btrfs.create_group(self.root, self._group(cache))
            await btrfs.set_group_limit(self.root, self._group(cache), self._quota(cache))
            await self.state.call(self.state.update_cache, cache["id"], made=1)
        if cache["layered"]:
            current = where / f"gen-{cache['generation']}"
            if cache["generation"] and btrfs.is_subvolume(current):
                return
            if cache["generation"]:
                message(f"cache {cache['name']}: its snapshot {current} was missing (removed "
                        "outside efci); starting again from an empty one")
            await self._refuse_replaced(current)
            generation = cache["generation"] + 1
            fresh = where / f"gen-{generation}"
            await self._refuse_replaced(fresh)
            await btrfs.create_subvolume(fresh, group=self._group(cache))
            await btrfs.set_readonly(fresh)
            cache["generation"] = generation
            await self.state.call(self.state.update_cache, cache["id"], generation=generation)
            return
        data = where / "data"
        if btrfs.is_subvolume(data):
            return
        await self._refuse_replaced(data)
        if cache["made"]:
            message(f"cache {cache['name']}: its subvolume {data} was missing (removed "
                    "outside efci); it starts empty again")
        await btrfs.create_subvolume(data, group=self._group(cache))

    async def _refuse_replaced(self, path: Path) -> None:
        if path.is_symlink() or path.exists():
            raise CacheRefused(f"{path} is not a subvolume the agent made (replaced by "
                               "something else behind its back); remove it and run again")

    async def _run_layer(self, run_id: int, cache: dict[str, Any], item: InUse) -> Path:
        """The run's writable snapshot of the current generation; a restart
        of the run gets its own again."""
        layer = self._dir(cache) / f"run-{run_id}"
        earlier = [r for r in await self.state.call(self.state.run_caches, run_id)
                   if r["cache_id"] == cache["id"]]
        if earlier and btrfs.is_subvolume(layer):
            item.generation = earlier[0]["generation"]
            return layer
        await self._refuse_replaced(layer)
        item.generation = cache["generation"]
        await btrfs.snapshot(self._dir(cache) / f"gen-{item.generation}", layer,
                             readonly=False, group=self._group(cache))
        await btrfs.set_limit(layer, self._quota(cache))
        return layer

    # -- promotion --------------------------------------------------------------------------------

    async def promote(self, run_id: int, name: str, *, owner: str | None,
                      cache_id: int | None = None) -> int:
        """Make run ``run_id``'s view of a layered cache its next generation."""
        async with self._lock:
            caches = await self.state.call(self.state.caches)
            found = [c for c in caches if c["id"] == cache_id or (
                cache_id is None and c["name"] == name and c["owner"] == owner)]
            if not found:
                raise NotFound(f"no cache {owner}/{name}")
            cache = found[0]
            if not cache["layered"]:
                raise Refused(f"cache {cache['owner']}/{name} is not layered: runs write it "
                              "in place, there is nothing to promote")
            used = [r for r in await self.state.call(self.state.run_caches, run_id)
                    if r["cache_id"] == cache["id"]]
            if not used:
                raise NotFound(f"run {run_id} did not use cache {cache['owner']}/{name}")
            if any(i.cache_id == cache["id"] for i in self.users.get(run_id, [])):
                raise Conflict(f"run {run_id} is still running; promote it when it ends")
            base = used[0]["generation"]
            if base != cache["generation"]:
                raise Conflict(f"run {run_id} saw generation {base} of {cache['owner']}/{name}, "
                               f"but generation {cache['generation']} has been promoted since; "
                               "run it again to promote its work")
            where = self._dir(cache)
            layers = where / f"run-{run_id}"
            if not btrfs.is_subvolume(layers):
                raise NotFound(f"run {run_id}'s layer of {cache['owner']}/{name} is gone "
                               "(removed with the run)")
            generation = base + 1
            target = where / f"gen-{generation}"
            await self._refuse_replaced(target)
            await btrfs.set_readonly(layers)
            os.rename(layers, target)  # the runs that start from now on get it
            await self.state.call(self.state.update_cache, cache["id"], generation=generation)
            log.info("cache %s/%s: run %d promoted to generation %d", cache["owner"], name,
                     run_id, generation)
        await self._drop_unused_generations()
        return generation

    async def _drop_unused_generations(self) -> None:
        """Generations before the current one (a run's snapshot does not
        depend on the one it was taken from), and the layers of finished runs
        taken from them, which can no longer be promoted."""
        async with self._lock:
            active = set(self.users) | set(self._ended)
            for cache in await self.state.call(self.state.caches):
                where = self._dir(cache)
                if not cache["layered"] or not where.is_dir():
                    continue
                for path in [*where.glob("gen-*"), *where.glob("run-*")]:
                    number = path.name.partition("-")[2]
                    if not number.isdigit() or not btrfs.is_subvolume(path):
                        continue
                    if path.name.startswith("gen-"):
                        old = int(number) < cache["generation"]
                    else:
                        used = [r["generation"] for r in await self.state.call(
                            self.state.run_caches, int(number)) if r["cache_id"] == cache["id"]]
                        old = int(number) not in active and (
                            not used or used[0] < cache["generation"])
                    if old:
                        await btrfs.delete_subvolume(path)
                        self._stale = True
                        log.info("cache %s/%s: %s removed (superseded by generation %d)",
                                 cache["owner"], cache["name"], path.name, cache["generation"])

    async def remove_run(self, run_id: int) -> None:
        """``efci rm``: the run's layers of layered caches go with it."""
        async with self._lock:
            for cache in await self.state.call(self.state.caches):
                layer = self._dir(cache) / f"run-{run_id}"
                if cache["layered"] and btrfs.is_subvolume(layer):
                    await btrfs.delete_subvolume(layer)
                    self._stale = True

    # -- administration ---------------------------------------------------------------------------

    async def listing(self) -> dict[str, Any]:
        caches = await self.state.call(self.state.caches)
        usages = None
        if self.problem is None and caches:
            usages = await btrfs.usage(self.root)
            if usages.inconsistent:
                await btrfs.rescan(self.root)
        now = time.time()
        out = []
        for cache in caches:
            quota = self._quota(cache)
            used = usages.by_group.get(self._group(cache)) if usages and cache["made"] else None
            active = [k for k in cache["claims"] if k["released_at"] is None]
            removal = self._removal_at(cache)
            share = (used.referenced // len(active)) if used and active else 0
            out.append({
                "owner": cache["owner"], "name": cache["name"], "shared": cache["shared"],
                "layered": cache["layered"], "generation": cache["generation"],
                "quota": quota, "quota_from": self._quota_from(cache),
                "referenced": used.referenced if used else 0,
                "exclusive": used.exclusive if used else 0,
                "apportioned": {k["task"]: share for k in active},
                "claims": cache["claims"], "last_used_at": cache["last_used_at"],
                "used_by_runs": self._runs_using(cache["id"]),
                "removal_at": removal, "removal_due": removal is not None and removal <= now,
                "path": str(self._dir(cache)), "qgroup": self._group(cache),
            })
        return {"root": str(self.root), "problem": self.problem,
                "usage_inconsistent": bool(usages and usages.inconsistent), "caches": out}

    def _runs_using(self, cache_id: int) -> list[int]:
        return sorted(r for r, held in self.users.items()
                      if any(i.cache_id == cache_id for i in held))

    def _removal_at(self, cache: dict[str, Any]) -> float | None:
        """When a cache that no task claims any more is due to go (None while
        one does): caches.release_grace after its last claim was released."""
        if any(k["released_at"] is None for k in cache["claims"]):
            return None
        released = [k["released_at"] for k in cache["claims"]]
        return (max(released) if released else cache["created_at"]) \
            + self.cfg.caches_release_grace

    async def set_quota(self, owner: str, name: str, quota: int) -> dict[str, Any]:
        if self.problem:
            raise Refused(f"caches are not available: {self.problem}")
        size = os.statvfs(self.root)
        if quota > size.f_blocks * size.f_frsize:
            raise Refused(f"{quota} bytes is more than the caches filesystem holds "
                          f"({size.f_blocks * size.f_frsize} bytes)")
        async with self._lock:
            cache = await self._cache(owner, name)
            await self.state.call(self.state.update_cache, cache["id"], quota=quota)
            if cache["made"]:
                await btrfs.set_group_limit(self.root, self._group(cache), quota)
        return {"owner": owner, "name": name, "quota": quota}

    async def release_claim(self, owner: str, name: str, task: str, declared: bool,
                            uid: int) -> dict[str, Any]:
        cache = await self._cache(owner, name)
        claim = [k for k in cache["claims"] if k["task"] == task]
        if not claim:
            raise NotFound(f"task {task} has no claim on cache {owner}/{name}; its claims: "
                           + (", ".join(k["task"] for k in cache["claims"]) or "none"))
        if declared:
            raise Conflict(f"task {owner}/{task} still declares cache {name} "
                           f"({claim[0]['source']}); remove it from the declaration and "
                           "reload first")
        await self.state.call(self.state.forget_cache_claim, cache["id"], task)
        left = [k["task"] for k in cache["claims"] if k["task"] != task]
        removed = False
        if not left:
            await self.remove(owner, name, force=False)
            removed = True
        log.info("cache %s/%s released by task %s (uid %d)%s", owner, name, task, uid,
                 "; removed" if removed else f"; still claimed by {', '.join(left)}")
        return {"owner": owner, "name": name, "task": task, "removed": removed,
                "still_claimed_by": left}

    async def remove(self, owner: str, name: str, *, force: bool) -> dict[str, Any]:
        async with self._lock:
            cache = await self._cache(owner, name)
            running = self._runs_using(cache["id"])
            if running:
                raise Conflict(f"cache {owner}/{name} is in use by run"
                               f"{'s' if len(running) > 1 else ''} "
                               f"{', '.join(map(str, running))}; try again when they end")
            claimed = [k["task"] for k in cache["claims"] if k["released_at"] is None]
            if claimed and not force:
                raise Conflict(f"cache {owner}/{name} is claimed by task"
                               f"{'s' if len(claimed) > 1 else ''} {', '.join(claimed)}; give "
                               "--force to remove it anyway (their next run starts empty)")
            await self._delete(cache)
        log.info("cache %s/%s removed%s", owner, name, " (forced)" if claimed else "")
        return {"owner": owner, "name": name, "was_claimed_by": claimed}

    async def _delete(self, cache: dict[str, Any]) -> None:
        where = self._dir(cache)
        if where.is_dir() and not where.is_symlink():
            for path in sorted(where.iterdir()):
                if btrfs.is_subvolume(path):
                    await btrfs.delete_subvolume(path)  # works over quota too
                    self._stale = True
                elif path.is_symlink() or not path.is_dir():
                    path.unlink()
            with contextlib.suppress(OSError):
                where.rmdir()
        if cache["made"] and self.problem is None:
            await btrfs.destroy_group(self.root, self._group(cache))
        await self.state.call(self.state.drop_cache, cache["id"])

    # -- in the background -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove caches whose grace has run out, and the stale qgroups that
        deleted subvolumes leave."""
        task_status.started()
        while True:
            await trio.sleep(SWEEP_EVERY)
            await self.sweep()

    async def sweep(self) -> None:
        if self.problem:
            return
        try:
            now = time.time()
            for cache in await self.state.call(self.state.caches):
                removal = self._removal_at(cache)
                if removal is not None and removal <= now and not self._runs_using(cache["id"]):
                    log.info("cache %s/%s: no claim for caches.release_grace; removing it",
                             cache["owner"], cache["name"])
                    await self.remove(cache["owner"], cache["name"], force=False)
            if self._stale:
                self._stale = False
                await btrfs.clear_stale(self.root)
        except EfciError as e:
            log.error("caches: the sweep failed: %s", e.message)
