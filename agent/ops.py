"""The control operations, each declared once.

An operation is a plain async function over the agent's services:
``handler(agent, call, **arguments)``.  Its keyword-only parameters *are*
its argument schema (name, type, required when it has no default), so
validation (:func:`agent.protocol.parse_request`), dispatch and the handler
cannot disagree.  ``call`` says who asked and how to answer: the socket
server passes one, and so can any other front end (the web page).

Handlers raise :class:`~agent.errors.EfciError` for what a person should
read; anything else is a bug, answered as such by the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import trio

from . import __version__, diskspace, names, protocol, triggers
from .errors import Conflict, EfciError, NotFound, Refused, RequestError
from .gitea import repository_on
from .images import image_tag
from .keys import KeyInfo
from .logstore import Batch, Output, bounded, records_with_skip
from .model import Image, Requester, Task
from .protocol import Call
from .runs import task_to_wire
from .shell import serve_shell

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


Handler = Callable[..., Awaitable[object]]

# Log bytes read per batch for a follower: what a reader that stops reading
# holds in the agent (each of 50 stalled web viewers included).
STREAM_BATCH = 128 << 10
# A raw reader's batch: no per-record description to bound it; it holds two
# at most (one being sent, the next being read), and its socket buffer.
OUTPUT_BATCH = 4 << 20
SMALL_FRAME = 16 << 10  # a frame's payload that is sent with its line, in one piece

# A repository as Gitea names it: OWNER/NAME of letters, digits, '-', '_', '.'.
GITEA_REPO = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")


@dataclass(frozen=True)
class Op:
    name: str
    handler: Handler
    args: dict[str, tuple[type, bool]]  # argument -> (type, required)


OPS: dict[str, Op] = {}


# What an argument may be: JSON's own scalars (annotations are strings here).
_TYPES: dict[str, type] = {"str": str, "int": int, "bool": bool}


def _schema(handler: Handler) -> dict[str, tuple[type, bool]]:
    """The keyword-only parameters of a handler as (type, required); an
    optional one is ``T | None = None`` or has a default."""
    schema = {}
    for param in inspect.signature(handler).parameters.values():
        if param.kind is not param.KEYWORD_ONLY:
            continue
        names = [n for n in str(param.annotation).split(" | ") if n != "None"]
        if len(names) != 1 or names[0] not in _TYPES:
            raise TypeError(f"op {handler.__name__}: argument {param.name} must be one of "
                            f"{', '.join(_TYPES)} (or that | None), not {param.annotation}")
        schema[param.name] = (_TYPES[names[0]], param.default is param.empty)
    return schema


def op(handler: Handler) -> Handler:
    """Declare ``handler`` as the operation of its name."""
    OPS[handler.__name__] = Op(handler.__name__, handler, _schema(handler))
    return handler


def schemas() -> dict[str, dict[str, tuple[type, bool]]]:
    return {name: o.args for name, o in OPS.items()}


async def dispatch(agent: Agent, call: Call, request: protocol.Request) -> object:
    return await OPS[request.op].handler(agent, call, **request.args)


# -- the agent ------------------------------------------------------------------

@op
async def ping(agent: Agent, call: Call) -> object:
    return {"version": __version__}


@op
async def status(agent: Agent, call: Call) -> object:
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": agent.started_at,
        "config": agent.cfg.source,
        "socket": str(agent.cfg.socket_path),
        "state": str(agent.state.path),
        "docker": agent.docker_version,
        "active_runs": sorted(agent.runs.active),
        "queued_runs": [r.id for r in agent.runs.queue.waiting],
        "max_parallel": agent.cfg.max_parallel,
        "network": {"problems": await agent.network.problems(),
                    "last_probe": agent.network.last_probe.__dict__
                    if agent.network.last_probe else None},
        "declarations": agent.declarations_summary(),
        "web": agent.web,
        "caches": {"root": str(agent.cfg.caches_root), "problem": agent.caches.problem},
        **_resources(agent),
    }


def _resources(agent: Agent) -> dict[str, Any]:
    """The agent's own memory and descriptors, and the room left where it
    and dockerd write (a full disk is what stops a CI host)."""
    me = psutil.Process()
    return {"memory": me.memory_info().rss, "open_files": me.num_fds(),
            "disks": diskspace.usage(agent.runs.disk_places(), agent.cfg.min_free),
            "min_free": agent.cfg.min_free, "short_of_space": agent.runs.short_of_space}


@op
async def tasks(agent: Agent, call: Call) -> object:
    return [task_to_wire(t) for _, t in sorted(agent.decls.tasks.items())]


@op
async def reload(agent: Agent, call: Call) -> object:
    return await agent.reload()


# -- runs -------------------------------------------------------------------------

async def _who(agent: Agent, call: Call, session: str | None) -> Requester:
    """Who asked: the socket's peer, or, for the web page, the person whose
    session it passes on.  The agent looks the session up itself, so the
    page cannot act for anyone who is not logged in."""
    if session is None:
        return call.requester
    found = await _live_session(agent, session)
    return dataclasses.replace(call.requester, uid=found["uid"])


@op
async def run(agent: Agent, call: Call, *, task: str, follow: bool = False,
              session: str | None = None) -> object:
    found = agent.decls.tasks.get(task)
    if found is None:
        known = ", ".join(sorted(agent.decls.tasks)) or "none declared"
        raise NotFound(f"no task {task!r} (tasks: {known}); see efci tasks")
    run_id = await agent.runs.start(found, await _who(agent, call, session),
                                    image=agent.decls.images.get(found.image),
                                    stage_images=_stage_images(agent, found))
    return await _started(agent, call, run_id, 0, follow)


def _stage_images(agent: Agent, task: Task) -> dict[str, Image]:
    """The declared images its stages run in (built, if need be, when they start)."""
    return {s.image: agent.decls.images[s.image] for s in task.stages
            if s.image and s.image in agent.decls.images}


@op
async def runs(agent: Agent, call: Call, *, task: str | None = None, status: str | None = None,
               owner: str | None = None, limit: int = 20) -> object:
    records = await agent.runs.records(task=task, status=status, owner=owner,
                                       limit=min(limit, 1000))
    positions = agent.runs.queue_positions()
    return [{**r.to_wire(), "queue_position": positions.get(r.id)} for r in records]


@op
async def show(agent: Agent, call: Call, *, run: int) -> object:
    return await run_wire(agent, run)


@op
async def logs(agent: Agent, call: Call, *, run: int, follow: bool = False, position: int = 0,
               since_ns: int | None = None, tail: int | None = None,
               until: int | None = None, until_skip: int = 0, raw: bool = False,
               stream: str | None = None) -> object:
    """A run's log from ``position``, a time, or its last ``tail`` lines,
    up to byte ``until_skip`` of the record at ``until`` (where an earlier
    answer began: the viewer reads backwards that way, to the byte); the
    index finds the start without reading the whole log.  With ``raw``,
    the output bytes only (of ``stream``, or of all), in ``output`` events."""
    if raw and until is not None:
        raise RequestError("logs: raw reads forwards only; leave out until")
    if stream is not None and not raw:
        raise RequestError("logs: stream chooses what raw prints; give raw too")
    record = await run_wire(agent, run)  # NotFound for an unknown run
    named = agent.logs.streams(run)
    if stream is not None and stream not in named and not agent.logs.is_live(run):
        raise NotFound(f"run {run}'s log has no stream {stream!r}; it has "
                       f"{', '.join(sorted(set(named) - {'agent'}))}")
    if record["log_removed_at"] is not None:
        raise NotFound(f"run {run}'s log was removed by gc on "
                       f"{time.strftime('%Y-%m-%d', time.localtime(record['log_removed_at']))} "
                       "(gc.logs_keep in agent.yml); its record stays: efci show")
    skip = 0
    with agent.logs.reader(run) as reader:
        if since_ns is not None:
            position = await trio.to_thread.run_sync(reader.position_at_time, since_ns)
        if tail is not None:
            position, skip = await trio.to_thread.run_sync(reader.position_of_tail, tail, until,
                                                           until_skip)
        elif not await trio.to_thread.run_sync(reader.starts_record, position):
            raise RequestError(f"logs: position {position} is not where a record of run "
                               f"{run}'s log begins; resume from a 'next' the agent gave")
    if raw:
        end = await stream_output(agent, call, run, position, skip, follow=follow, stream=stream)
    else:
        end = await stream_log(agent, call, run, position, skip, follow=follow and until is None,
                               until=until, until_skip=until_skip)
    return {"run": run, "next": end}


@op
async def cancel(agent: Agent, call: Call, *, run: int, session: str | None = None) -> object:
    who = await _who(agent, call, session)
    await agent.runs.cancel(run, f"cancelled by uid {who.uid}")
    return await run_wire(agent, run)


@op
async def restart(agent: Agent, call: Call, *, run: int, follow: bool = False,
                  stage: str | None = None, session: str | None = None) -> object:
    who = await _who(agent, call, session)
    position = agent.logs.end(run)  # a follower reads from where the new attempt begins
    await agent.runs.restart(run, who, stage)
    return await _started(agent, call, run, position, follow)


@op
async def retry(agent: Agent, call: Call, *, run: int, stage: str, follow: bool = False,
                session: str | None = None) -> object:
    who = await _who(agent, call, session)
    position = agent.logs.end(run)
    await agent.runs.retry(run, stage, who)
    return await _started(agent, call, run, position, follow)


@op
async def rm(agent: Agent, call: Call, *, run: int, session: str | None = None) -> object:
    who = await _who(agent, call, session)
    await agent.runs.remove(run)
    log.info("run %d: container and layers removed (uid %d)", run, who.uid)
    return await run_wire(agent, run)


@op
async def shell(agent: Agent, call: Call, *, run: int, cols: int, rows: int,
                stage: str | None = None, discard: bool = False) -> object:
    return await serve_shell(agent.runs, call, run, cols, rows, stage, discard)


async def _started(agent: Agent, call: Call, run_id: int, position: int,
                   follow: bool) -> object:
    if follow:
        await call.event("started", run=run_id)
        await stream_log(agent, call, run_id, position, 0, follow=True)
    return await run_wire(agent, run_id)


async def run_wire(agent: Agent, run_id: int) -> dict[str, Any]:
    record = await agent.runs.record(run_id)
    if record is None:
        raise NotFound(f"no run {run_id}; see efci runs")
    worktrees = await agent.state.call(agent.state.run_worktrees, run_id)
    statuses = await agent.state.call(agent.state.run_statuses, run_id)
    stages = await agent.state.call(agent.state.run_stages, run_id)
    return {**record.to_wire(), "queue_position": agent.runs.queue_positions().get(run_id),
            "log_start": agent.logs.start(run_id),
            "log_size": agent.logs.end(run_id), "worktrees": worktrees,
            "commit_statuses": statuses, "stages": stages}


async def stream_log(agent: Agent, call: Call, run_id: int, position: int, skip: int, *,
                     follow: bool, until: int | None = None, until_skip: int = 0) -> int:
    """Send the log's records from byte ``skip`` of the record at
    ``position`` (which the first event names as ``start``, so a reader can
    go back from exactly there) up to ``until``/``until_skip`` (see
    :func:`~agent.logstore.bounded`), and with ``follow`` until the run
    ends; returns where to resume."""
    streams = agent.logs.streams(run_id)
    await call.event("streams", streams=streams, start=[position, skip])
    to_live_end = follow and until is None
    while True:
        async for records in agent.logs.follow(run_id, position, live=follow,
                                               max_bytes=STREAM_BATCH, to_live_end=to_live_end):
            batch = records if until is None else list(bounded(records, until, until_skip))
            if not batch:
                return position
            if any(r.stream not in streams.values() for r in batch):
                streams = agent.logs.streams(run_id)
                await call.event("streams", streams=streams)
            if not skip and batch is records:  # as every follower of a live log: made once
                frame = _shared_frame(call, records)
            else:
                frame = protocol.records_event(call.id, records_with_skip(batch, skip))
            await send_frame(call, *frame)
            skip = 0
            position = batch[-1].end
            if until is not None and (len(batch) < len(records) or batch[-1].position == until):
                return until  # reached it
        if not to_live_end or not agent.logs.is_live(run_id):
            return position
        position = await _take_appends(agent, call, run_id, position, set(streams.values()))


def _shared_frame(call: Call, records: Batch) -> tuple[bytes, bytes]:
    """The frame of records that every follower of a live log gets alike,
    made once for all whose requests had the same id (efci's all ask with
    1; a JSON ``true`` is not ``1``)."""
    key = (type(call.id), call.id)
    frame = records.shared.get(key)
    if frame is None:
        frame = records.shared[key] = protocol.records_event(call.id, records)
    return frame


async def _take_appends(agent: Agent, call: Call, run_id: int, position: int,
                        streams: set[int]) -> int:
    """Follow a live log from its end by taking each append as the writer
    writes it (LogStore.hand_appends) and sending it there and then, as
    far as the client's socket takes it without waiting: the one loop that
    reaches every follower of a busy log, with no task woken and nothing
    read back from the files for each.  The first append it cannot send
    whole (the client is not reading; a stream or part of the log it was
    not told of) ends it: a part that went out is finished here, waiting
    for the client, and the caller reads on from the position returned."""
    rest = b""

    def take(records: Batch) -> bool:
        nonlocal position, rest
        if records[0].position != position or any(r.stream not in streams for r in records):
            return False
        line, payload = _shared_frame(call, records)
        sent = call.send_nowait(line, payload)
        if sent == 0:
            return False
        position = records[-1].end
        if sent < len(line) + len(payload):
            rest = (line + payload)[sent:]
            return False
        return True

    await agent.logs.hand_appends(run_id, take)
    if rest:
        await call.send(rest)
    return position


async def stream_output(agent: Agent, call: Call, run_id: int, position: int, skip: int, *,
                        follow: bool, stream: str | None) -> int:
    """The output bytes from byte ``skip`` of the record at ``position``, in
    ``output`` events (a frame of ``size`` bytes, and ``next``, where to
    resume): no description of each record, so a big log goes out at the
    speed of the disk and the socket.  The next batch is read (in a worker
    thread) while this one is sent, and the socket holds one more, so the
    reading, the sending and the client's printing overlap.  Returns where
    to resume."""
    batches_in, batches_out = trio.open_memory_channel[Output](0)

    async def read_ahead(start: int) -> None:
        async with batches_in:
            async for output in agent.logs.follow_output(run_id, start, live=follow,
                                                         skip=skip, max_bytes=OUTPUT_BATCH,
                                                         stream=stream):
                await batches_in.send(output)

    call.bulk()
    async with trio.open_nursery() as nursery, batches_out:
        nursery.start_soon(read_ahead, position)
        async for output in batches_out:
            position = output.end
            if output.data:
                await send_frame(call, protocol.event(call.id, "output", next=position,
                                                      size=len(output.data)), output.data)
    return position


async def send_frame(call: Call, line: bytes, payload: bytes) -> None:
    if len(payload) < SMALL_FRAME:  # one send: the reader wakes once, not twice
        await call.send(line + payload)
    else:  # no copy of a big one
        await call.send(line)
        await call.send(payload)


# -- images -----------------------------------------------------------------------

@op
async def images(agent: Agent, call: Call) -> object:
    out: list[dict[str, Any]] = []
    for name, image in sorted(agent.decls.images.items()):
        try:
            tag = await trio.to_thread.run_sync(image_tag, image)
        except EfciError as e:
            out.append({"name": name, "source": image.source, "tag": None, "built": False,
                        "error": e.message, "used_by": []})
            continue
        out.append({"name": name, "source": image.source, "tag": tag,
                    "built": await agent.runs.images.exists(tag),
                    "used_by": sorted(t.name for t in agent.decls.tasks.values()
                                      if t.image == name)})
    return out


@op
async def image_build(agent: Agent, call: Call, *, name: str, follow: bool = False,
                      session: str | None = None) -> object:
    """A build is a run of its own (task ``image:NAME``), so its output is
    a log like any run's."""
    image = agent.decls.images.get(name)
    if image is None:
        raise NotFound(f"no image {name!r} is declared; see efci images")
    task = Task(name=f"image:{name}", owner=agent.cfg.owner, source=image.source,
                image=name, command=None)
    run_id = await agent.runs.start(task, await _who(agent, call, session), image=image,
                                    build_only=True)
    return await _started(agent, call, run_id, 0, follow)


# -- the network --------------------------------------------------------------------

@op
async def firewall_status(agent: Agent, call: Call) -> object:
    return await agent.network.status()


@op
async def firewall_probe(agent: Agent, call: Call) -> object:
    return (await agent.network.probe(agent.cfg.base_image)).__dict__


@op
async def firewall_remove(agent: Agent, call: Call) -> object:
    await agent.network.remove()
    log.warning("network rules removed by uid %d; the next run puts them back",
                call.requester.uid)
    return await agent.network.status()


# -- deploy keys (the private half never crosses the socket) --------------------------

async def _key_wire(agent: Agent, key: KeyInfo) -> dict[str, Any]:
    return {"owner": key.owner, "name": key.name, "public_key": key.public_key,
            "fingerprint": key.fingerprint, "created_at": key.created_at,
            "used_by": agent.tasks_using_key(key.owner, key.name),
            "registered": await agent.state.call(agent.state.key_registrations, key.owner,
                                                 key.name, key.fingerprint)}


@op
async def key_create(agent: Agent, call: Call, *, name: str, owner: str | None = None) -> object:
    key = await agent.keys.create(owner or agent.cfg.owner, name)
    log.info("created deploy key %s/%s (%s)", key.owner, key.name, key.fingerprint)
    return await _key_wire(agent, key)


@op
async def key_list(agent: Agent, call: Call, *, owner: str | None = None) -> object:
    return [await _key_wire(agent, k) for k in await agent.keys.all(owner)]


@op
async def key_show(agent: Agent, call: Call, *, name: str, owner: str | None = None) -> object:
    return await _key_wire(agent, await agent.keys.info(owner or agent.cfg.owner, name))


@op
async def key_delete(agent: Agent, call: Call, *, name: str, owner: str | None = None,
                     force: bool = False) -> object:
    owner = owner or agent.cfg.owner
    users = agent.tasks_using_key(owner, name)
    if users and not force:
        raise Conflict(f"key {name!r} of owner {owner!r} is used by task"
                       f"{'s' if len(users) > 1 else ''} {', '.join(users)}; "
                       "give --force to delete it anyway")
    agent.keys.delete(owner, name)
    registered = await agent.state.call(agent.state.drop_key_registrations, owner, name)
    log.info("deleted deploy key %s/%s%s", owner, name, " (forced)" if users else "")
    return {"owner": owner, "name": name, "was_used_by": users,
            "still_on_gitea": registered}


@op
async def key_register(agent: Agent, call: Call, *, name: str, repo: str,
                       owner: str | None = None) -> object:
    """Add a key's public half to a Gitea repository as a read-only deploy
    key, once: a key already there (same fingerprint) is only recorded."""
    owner = owner or agent.cfg.owner
    if agent.gitea is None:
        raise Refused("this agent has no Gitea API: set gitea.api in agent.yml and put a "
                      f"token in {agent.cfg.gitea_token} first")
    if not GITEA_REPO.fullmatch(repo) or ".." in repo:
        raise RequestError(f"repo: {repo[:200]!r} is not OWNER/REPOSITORY as Gitea names it")
    key = await agent.keys.info(owner, name)
    there = [k for k in await agent.gitea.deploy_keys(repo, key.fingerprint)
             if k.get("fingerprint") == key.fingerprint]
    if there:
        found, added = there[0], False
    else:
        title = f"efci {owner}/{name} ({socket.gethostname()})"
        found, added = await agent.gitea.add_deploy_key(repo, title, key.public_key), True
    if not isinstance(found.get("id"), int):
        raise EfciError(f"Gitea's answer names no deploy key id: {str(found)[:200]}")
    await agent.state.call(agent.state.add_key_registration, owner, name, key.fingerprint,
                           repo, found["id"])
    log.info("deploy key %s/%s %s %s as key %d", owner, name,
             "registered on" if added else "was already on", repo, found["id"])
    return {"owner": owner, "name": name, "repo": repo, "gitea_id": found["id"],
            "added": added, "read_only": found.get("read_only", True)}


@op
async def key_scan(agent: Agent, call: Call, *, host: str, port: int = 22) -> object:
    return {"host": host, "port": port, **await agent.keys.scan(host, port)}


@op
async def key_trust(agent: Agent, call: Call, *, host: str, port: int = 22,
                    owner: str | None = None, keys: str | None = None) -> object:
    owner = owner or agent.cfg.owner
    fingerprints = await agent.keys.trust(owner, host, port, keys)
    log.info("pinned host keys of %s port %d for %s", host, port, owner)
    return {"owner": owner, "host": host, "port": port, "fingerprints": fingerprints,
            "scanned": keys is None}


# -- eviction ----------------------------------------------------------------------------

@op
async def gc(agent: Agent, call: Call, *, dry_run: bool = False,
             owner: str | None = None) -> object:
    """Apply agent.yml's gc policy now (see agent/gc.py)."""
    removed = await agent.gc.collect(dry_run=dry_run, owner=owner)
    log.info("gc by uid %d%s: %d removals", call.requester.uid,
             " (dry run)" if dry_run else "", len(removed))
    return {"dry_run": dry_run, "removed": [r.to_wire() for r in removed],
            "bytes": sum(r.bytes for r in removed)}


# -- caches ------------------------------------------------------------------------------

@op
async def cache_ls(agent: Agent, call: Call) -> object:
    return await agent.caches.listing()


@op
async def cache_set_quota(agent: Agent, call: Call, *, name: str, quota: str,
                          owner: str | None = None) -> object:
    size = names.parse_size(quota)
    if size is None or size <= 0:
        raise RequestError(f"quota: {quota[:50]!r} is not a size such as 512MiB or 2GiB")
    return await agent.caches.set_quota(owner or agent.cfg.owner, name, size)


@op
async def cache_rm(agent: Agent, call: Call, *, name: str, owner: str | None = None,
                   force: bool = False) -> object:
    return await agent.caches.remove(owner or agent.cfg.owner, name, force=force)


@op
async def cache_release(agent: Agent, call: Call, *, name: str, task: str,
                        owner: str | None = None) -> object:
    owner = owner or agent.cfg.owner
    declared = any(t.owner == owner and t.name == task and any(c.name == name for c in t.caches)
                   for t in agent.decls.tasks.values())
    return await agent.caches.release_claim(owner, name, task, declared, call.requester.uid)


@op
async def cache_promote(agent: Agent, call: Call, *, run: int, name: str) -> object:
    record = await agent.runs.record(run)
    if record is None:
        raise NotFound(f"no run {run}")
    generation = await agent.caches.promote(run, name, owner=record.owner)
    return {"run": run, "owner": record.owner, "name": name, "generation": generation}


# -- Gitea ------------------------------------------------------------------------------

@op
async def gitea_check(agent: Agent, call: Call) -> object:
    """Whether Gitea's API answers, whose token the agent holds, and what it
    may do in each declared repository on that Gitea."""
    if agent.gitea is None:
        raise Refused("this agent has no Gitea API: set gitea.api in agent.yml (see "
                      "efci-agent.yml(5))")
    repos = sorted({on for t in agent.decls.tasks.values() for r in t.repositories
                    if (on := repository_on(r.repo_url, agent.cfg.gitea_hosts))})
    return await agent.gitea.check(repos)


@op
async def push(agent: Agent, call: Call, *, delivery: str, repository: str, ssh_url: str,
               clone_url: str, ref: str, before: str, after: str, pusher: str) -> object:
    """A Gitea push whose webhook signature the web page verified: start
    the tasks it concerns (see agent/triggers.py), once per delivery."""
    event = triggers.checked(triggers.Push(
        delivery, repository[:255], tuple(u for u in (ssh_url, clone_url) if u), ref,
        before, after, pusher[:255]))
    if not await agent.state.call(agent.state.first_delivery, delivery):
        log.info("push delivery %s was seen before: it starts nothing again", delivery)
        return {"duplicate": True, "runs": []}
    started = []
    for task in triggers.tasks_for(event, list(agent.decls.tasks.values())):
        trigger = {**event.to_wire(), "mounts": triggers.mounts_of(event, task)}
        run_id = await agent.runs.start(task, call.requester, trigger=trigger,
                                        image=agent.decls.images.get(task.image),
                                        stage_images=_stage_images(agent, task))
        await agent.commit_status(run_id, task, trigger, "pending", "queued")
        replaced = await agent.runs.replace_queued(task, event.ref, run_id)
        started.append({"run": run_id, "task": task.name, "owner": task.owner,
                        "replaced": replaced})
    log.info("push %s of %s %s by %s: %s", delivery, event.repository, event.ref, event.pusher,
             ", ".join(f"run {r['run']} ({r['task']})" for r in started) or "no task watches it")
    return {"duplicate": False, "runs": started}


# -- the web page (efci web is a client like efci; these are its logins) ------------

def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token(argument: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{20,100}", value):
        raise Refused(f"the {argument} is not a token of ours")  # never echo it
    return value


@op
async def web_login(agent: Agent, call: Call) -> object:
    """A one-time login URL.  The token rides in the URL's fragment, which
    browsers never send to a server or a proxy's access log: the login page
    posts it."""
    token = secrets.token_urlsafe(32)
    expires = await agent.state.call(agent.state.add_web_token, "login", _digest(token),
                                     call.requester.uid, agent.cfg.web_login_lifetime)
    log.info("web login URL issued to uid %d", call.requester.uid)
    return {"url": f"{agent.cfg.web_url}/login#{token}", "expires_at": expires,
            "web_up": agent.web is not None}


@op
async def web_session_open(agent: Agent, call: Call, *, token: str) -> object:
    """Trade a login token (once) for a session and its CSRF token."""
    login = await agent.state.call(agent.state.web_token, "login",
                                   _digest(_token("token", token)), take=True)
    if login is None:
        raise Refused("this login link is unknown, used or expired; "
                      "get a new one with `efci web-login`")
    session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    expires = await agent.state.call(agent.state.add_web_token, "session", _digest(session),
                                     login["uid"], agent.cfg.web_session_lifetime, csrf)
    log.info("web session opened for uid %d", login["uid"])
    return {"session": session, "csrf": csrf, "uid": login["uid"], "expires_at": expires}


async def _live_session(agent: Agent, session: str) -> dict[str, Any]:
    found = await agent.state.call(agent.state.web_token, "session",
                                   _digest(_token("session", session)))
    if found is None:
        raise Refused("not logged in, or the session expired or was revoked; "
                      "get a login link with `efci web-login`")
    return found


@op
async def web_session(agent: Agent, call: Call, *, session: str) -> object:
    return await _live_session(agent, session)


@op
async def web_logout(agent: Agent, call: Call, *, session: str | None = None,
                     all: bool = False) -> object:
    if all == (session is not None):
        raise RequestError("web_logout: give either a session or all")
    digest = None if all else _digest(_token("session", session or ""))
    count = await agent.state.call(agent.state.drop_web_tokens, digest)
    log.info("%d web session(s) and login(s) revoked by uid %d", count, call.requester.uid)
    return {"revoked": count}


@op
async def web_hello(agent: Agent, call: Call, *, url: str) -> object:
    """efci web announces itself and keeps this call open while it serves,
    so efci status shows the page's URL exactly while it is up."""
    agent.web = {"url": url, "pid": call.requester.pid, "since": time.time()}
    log.info("web page up at %s (pid %d)", url, call.requester.pid)
    try:
        await call.event("hello", version=__version__)
        while await call.receive_line() is not None:
            pass
    finally:
        agent.web = None
        log.info("web page at %s went away", url)
    return None
