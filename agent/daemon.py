"""``efci agent``: the Trio main.

Start-up: check dockerd answers, open the state store, load declarations,
recover what a previous agent left unfinished, bind the socket, serve.
SIGTERM/SIGINT stop it gracefully: the socket stops accepting, active runs
are cancelled (their containers stopped, their status recorded), then it
exits.  SIGHUP reloads the declarations, like ``efci reload``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import trio

from . import __version__, declarations, protocol
from .access import deploy_targets, sweep_target
from .checkout import Checkouts
from .config import AgentConfig
from .control import Connection, ControlServer, bind_socket
from .errors import CommandFailed, Conflict, EfciError, NotFound
from .host import docker
from .images import image_tag
from .keys import KeyInfo, KeyStore
from .logformat import Kind
from .logstore import LogStore, records_with_skip
from .model import Requester, RunStatus, Task
from .mutations import Mutations
from .network import TaskNetwork
from .runs import Runs, task_from_wire, task_to_wire
from .shell import serve_shell
from .state import StateStore

log = logging.getLogger("efci.agent")

# How long in-flight requests may take to finish once the agent is stopping.
SHUTDOWN_GRACE = 5


class Agent:
    """The request handlers and the state they share."""

    def __init__(self, cfg: AgentConfig, state: StateStore, logs: LogStore) -> None:
        self.cfg = cfg
        self.state = state
        self.logs = logs
        self.instance = state.instance()
        self.keys = KeyStore(cfg.secrets_base)
        self.checkouts = Checkouts(cfg, state, self.keys, self.instance)
        self.mutations = Mutations(cfg, self.instance)
        self.network = TaskNetwork(cfg)
        self.runs = Runs(cfg, state, logs, self.checkouts, self.mutations, self.network,
                         self.instance)
        self.decls = declarations.DeclarationSet()
        self.started_at = time.time()
        self.docker_version = ""

    # -- declarations ---------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read conf.d; broken files keep their last good version."""
        parsed = declarations.parse_all(self.cfg.declarations_dir,
                                        default_owner=self.cfg.owner,
                                        secrets_base=self.cfg.secrets_base)
        refs = declarations.image_refs(parsed, self.decls)
        present = await docker.present_images(self.cfg.docker, refs)
        self.decls = declarations.assemble(parsed, existing_images=present, previous=self.decls)
        for file, message in self.decls.errors.items():
            kept = " (its last good version stays in force)" if file in self.decls.by_file else ""
            log.error("declaration refused%s: %s", kept, message)
        for warning in self.decls.warnings:
            log.warning("%s", warning)
        log.info("declarations: %d tasks, %d images from %s", len(self.decls.tasks),
                 len(self.decls.images), self.cfg.declarations_dir)
        return self._declarations_summary()

    def _declarations_summary(self) -> dict[str, Any]:
        return {"tasks": len(self.decls.tasks), "images": len(self.decls.images),
                "errors": self.decls.errors, "warnings": self.decls.warnings,
                "directory": str(self.cfg.declarations_dir)}

    # -- recovery -------------------------------------------------------------

    async def recover(self) -> None:
        """Finish the records of runs a previous agent left unfinished, and
        unmount what it left mounted."""
        for record in await self.state.call(self.state.unfinished_runs):
            fields: dict[str, Any] = {"finished_at": time.time()}
            container = record.container_id or record.container_name or ""
            found = await docker.inspect(self.cfg.docker, container) if container else None
            if found is None:
                status = RunStatus.CANCELLED
                fields["error"] = "the agent stopped before the run's container ran"
            elif found.status in ("running", "paused", "restarting"):
                await docker.stop(self.cfg.docker, container, grace=self.cfg.stop_grace)
                status = RunStatus.CANCELLED
                fields["error"] = "the agent stopped while it ran; its container was stopped"
            elif found.status == "created":
                status = RunStatus.CANCELLED
                fields["error"] = "the agent stopped before the run's container started"
            else:
                # Never "succeeded": what it printed after the agent stopped
                # is not in its log, so the record cannot vouch for the run.
                status = RunStatus.ERROR
                fields.update(exit_code=found.exit_code, image_id=found.image_id,
                              error=f"finished while the agent was not running (exit status "
                                    f"{found.exit_code}); output after the agent stopped is "
                                    "not in the log")
            await self.state.call(self.state.update_run, record.id, status=status, **fields)
            self._close_log_of_recovered(record.id, status, fields)
            log.warning("recovered run %d: %s (%s)", record.id, status.value, fields["error"])
            await self._sweep_targets_of(record.id)
        await self.mutations.unmount_all()

    async def _sweep_targets_of(self, run_id: int) -> None:
        """What the run's task may have left in its deploy targets before the
        agent stopped (the run's own teardown never ran)."""
        task = task_from_wire(await self.state.call(self.state.run_declaration, run_id))
        try:
            targets = deploy_targets(self.cfg, task)
        except EfciError:
            return  # no longer allowed or no longer there: nothing was mounted for it now
        for target in targets:
            await sweep_target(target.path, lambda line: log.warning("run %d: %s", run_id, line))

    def _close_log_of_recovered(self, run_id: int, status: RunStatus,
                                fields: dict[str, Any]) -> None:
        cut = self.logs.recover(run_id)
        writer = self.logs.open_writer(run_id)
        try:
            if cut:
                writer.message(f"{cut} bytes of a torn last record were cut off at recovery")
            writer.message(f"run {run_id} {status.value}: {fields['error']}")
            writer.event(Kind.STATUS, {"status": status.value, **fields})
        finally:
            writer.close()

    # -- requests ---------------------------------------------------------------

    async def handle(self, request: protocol.Request, requester: Requester,
                     send: Connection) -> object:
        method = getattr(self, f"op_{request.op}")
        return await method(request, requester, send, **request.args)

    async def op_ping(self, *_: Any) -> object:
        return {"version": __version__}

    async def op_status(self, *_: Any) -> object:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "config": self.cfg.source,
            "socket": str(self.cfg.socket_path),
            "state": str(self.state.path),
            "docker": self.docker_version,
            "active_runs": sorted(self.runs.active),
            "network": {"problems": await self.network.problems(),
                        "last_probe": self.network.last_probe.__dict__
                        if self.network.last_probe else None},
            "declarations": self._declarations_summary(),
        }

    async def op_tasks(self, *_: Any) -> object:
        return [task_to_wire(t) for _, t in sorted(self.decls.tasks.items())]

    async def op_reload(self, *_: Any) -> object:
        return await self.reload()

    async def op_run(self, request: protocol.Request, requester: Requester, send: Connection,
                     task: str, follow: bool = False) -> object:
        found = self.decls.tasks.get(task)
        if found is None:
            known = ", ".join(sorted(self.decls.tasks)) or "none declared"
            raise NotFound(f"no task {task!r} (tasks: {known}); see efci tasks")
        run_id = await self.runs.start(found, requester, image=self.decls.images.get(found.image))
        if follow:
            await send(protocol.event(request.id, "started", run=run_id))
            await self._stream_log(request, send, run_id, 0, 0, follow=True)
        return await self._run_wire(run_id)

    async def op_images(self, *_: Any) -> object:
        out: list[dict[str, Any]] = []
        for name, image in sorted(self.decls.images.items()):
            try:
                tag = await trio.to_thread.run_sync(image_tag, image)
            except EfciError as e:
                out.append({"name": name, "source": image.source, "tag": None, "built": False,
                            "error": e.message, "used_by": []})
                continue
            out.append({"name": name, "source": image.source, "tag": tag,
                        "built": await self.runs.images.exists(tag),
                        "used_by": sorted(t.name for t in self.decls.tasks.values()
                                          if t.image == name)})
        return out

    async def op_image_build(self, request: protocol.Request, requester: Requester,
                             send: Connection, name: str, follow: bool = False) -> object:
        """A build is a run of its own (task ``image:NAME``), so its output
        is a log like any run's."""
        image = self.decls.images.get(name)
        if image is None:
            raise NotFound(f"no image {name!r} is declared; see efci images")
        task = Task(name=f"image:{name}", owner=self.cfg.owner, source=image.source,
                    image=name, command=None)
        run_id = await self.runs.start(task, requester, image=image, build_only=True)
        if follow:
            await send(protocol.event(request.id, "started", run=run_id))
            await self._stream_log(request, send, run_id, 0, 0, follow=True)
        return await self._run_wire(run_id)

    async def op_runs(self, *_: Any, task: str | None = None, limit: int = 20) -> object:
        records = await self.runs.records(task=task, limit=min(limit, 1000))
        return [r.to_wire() for r in records]

    async def op_show(self, _r: Any, _q: Any, _s: Any, run: int) -> object:
        return await self._run_wire(run)

    async def op_logs(self, request: protocol.Request, _q: Any, send: Connection, run: int,
                      follow: bool = False, position: int = 0, since_ns: int | None = None,
                      tail: int | None = None) -> object:
        """A run's log from ``position``, a time, or its last ``tail`` lines;
        the index finds the start without reading the whole log."""
        await self._run_wire(run)  # NotFound for an unknown run
        skip = 0
        with self.logs.reader(run) as reader:
            if since_ns is not None:
                position = await trio.to_thread.run_sync(reader.position_at_time, since_ns)
            if tail is not None:
                position, skip = await trio.to_thread.run_sync(reader.position_of_tail, tail)
        end = await self._stream_log(request, send, run, position, skip, follow=follow)
        return {"run": run, "next": end}

    async def op_restart(self, request: protocol.Request, requester: Requester, send: Connection,
                         run: int, follow: bool = False) -> object:
        position = self.logs.end(run)
        await self.runs.restart(run, requester)
        if follow:  # from where the new attempt begins
            await send(protocol.event(request.id, "started", run=run))
            await self._stream_log(request, send, run, position, 0, follow=True)
        return await self._run_wire(run)

    async def op_rm(self, _r: Any, requester: Requester, _s: Any, run: int) -> object:
        await self.runs.remove(run)
        log.info("run %d: container and mutations removed (uid %d)", run, requester.uid)
        return await self._run_wire(run)

    async def op_shell(self, request: protocol.Request, requester: Requester, send: Connection,
                       run: int, cols: int, rows: int) -> object:
        return await serve_shell(self.runs, request, send, requester, run, cols, rows)

    async def op_firewall_status(self, *_: Any) -> object:
        return await self.network.status()

    async def op_firewall_probe(self, *_: Any) -> object:
        return (await self.network.probe(self.cfg.base_image)).__dict__

    async def op_firewall_remove(self, _r: Any, requester: Requester, *_: Any) -> object:
        await self.network.remove()
        log.warning("network rules removed by uid %d; the next run puts them back",
                    requester.uid)
        return await self.network.status()

    async def op_cancel(self, _r: Any, requester: Requester, _s: Any, run: int) -> object:
        await self.runs.cancel(run, f"cancelled by uid {requester.uid}")
        return await self._run_wire(run)

    async def _run_wire(self, run_id: int) -> dict[str, Any]:
        record = await self.runs.record(run_id)
        if record is None:
            raise NotFound(f"no run {run_id}; see efci runs")
        worktrees = await self.state.call(self.state.run_worktrees, run_id)
        return {**record.to_wire(), "log_size": self.logs.end(run_id), "worktrees": worktrees}

    # -- deploy keys (the private half never crosses the socket) ------------------

    def _key_wire(self, key: KeyInfo) -> dict[str, Any]:
        return {"owner": key.owner, "name": key.name, "public_key": key.public_key,
                "fingerprint": key.fingerprint, "created_at": key.created_at,
                "used_by": self._tasks_using(key.owner, key.name)}

    def _tasks_using(self, owner: str, name: str) -> list[str]:
        return sorted(t.name for t in self.decls.tasks.values()
                      if t.owner == owner and any(r.key == name for r in t.repositories))

    async def op_key_create(self, *_: Any, name: str, owner: str | None = None) -> object:
        key = await self.keys.create(owner or self.cfg.owner, name)
        log.info("created deploy key %s/%s (%s)", key.owner, key.name, key.fingerprint)
        return self._key_wire(key)

    async def op_key_list(self, *_: Any, owner: str | None = None) -> object:
        return [self._key_wire(k) for k in await self.keys.all(owner)]

    async def op_key_show(self, *_: Any, name: str, owner: str | None = None) -> object:
        return self._key_wire(await self.keys.info(owner or self.cfg.owner, name))

    async def op_key_delete(self, *_: Any, name: str, owner: str | None = None,
                            force: bool = False) -> object:
        owner = owner or self.cfg.owner
        users = self._tasks_using(owner, name)
        if users and not force:
            raise Conflict(f"key {name!r} of owner {owner!r} is used by task"
                           f"{'s' if len(users) > 1 else ''} {', '.join(users)}; "
                           "give --force to delete it anyway")
        self.keys.delete(owner, name)
        log.info("deleted deploy key %s/%s%s", owner, name, " (forced)" if users else "")
        return {"owner": owner, "name": name, "was_used_by": users}

    async def op_key_trust(self, *_: Any, host: str, port: int = 22, owner: str | None = None,
                           keys: str | None = None) -> object:
        owner = owner or self.cfg.owner
        fingerprints = await self.keys.trust(owner, host, port, keys)
        log.info("pinned host keys of %s port %d for %s", host, port, owner)
        return {"owner": owner, "host": host, "port": port, "fingerprints": fingerprints,
                "scanned": keys is None}

    async def _stream_log(self, request: protocol.Request, send: Connection, run_id: int,
                          position: int, skip: int, *, follow: bool) -> int:
        streams = self.logs.streams(run_id)
        await send(protocol.event(request.id, "streams", streams=streams))
        async for batch in self.logs.follow(run_id, position, live=follow):
            if any(r.stream not in streams.values() for r in batch):
                streams = self.logs.streams(run_id)
                await send(protocol.event(request.id, "streams", streams=streams))
            await send(protocol.records_event(request.id, records_with_skip(batch, skip)))
            skip = 0
            position = batch[-1].end
        return position


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    try:
        version = await docker.server_version(cfg.docker)
    except CommandFailed as e:
        raise EfciError(f"dockerd does not answer ({e.stderr_text or e.message}); start it "
                        "(systemctl start docker, or dockerd &) and try again") from e
    state = StateStore(cfg.state_dir / "state.db")
    try:
        agent = Agent(cfg, state, LogStore(cfg.log_dir, limit=cfg.log_limit))
        agent.docker_version = version
        log.info("efforting-ci %s starting: config %s, state %s, docker %s", __version__,
                 cfg.source, cfg.state_dir, version)
        await agent.recover()
        await agent.network.ensure()
        try:
            await agent.reload()
            if await docker.present_images(cfg.docker, {cfg.base_image}):
                await agent.network.probe(cfg.base_image)
            else:
                log.warning("no %s to probe the network rules with", cfg.base_image)
            sock = bind_socket(cfg.socket_path, mode=cfg.socket_mode, group=cfg.socket_group)
            try:
                await _serve_until_signal(agent, sock)
            finally:
                sock.close()
                if cfg.socket_path.is_socket():
                    cfg.socket_path.unlink()
        finally:
            with trio.CancelScope(shield=True):
                await agent.network.remove()
    finally:
        state.close()
    log.info("efforting-ci stopped")


async def _serve_until_signal(agent: Agent, sock: Any) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.runs.serve)
            server = ControlServer(sock, agent.handle)
            await nursery.start(server.serve)
            log.info("listening on %s", agent.cfg.socket_path)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading declarations")
                    await agent.reload()
                    continue
                log.info("%s: stopping (%d active runs)", signal.Signals(signum).name,
                         len(agent.runs.active))
                break
            await agent.runs.shutdown()
            with trio.CancelScope(shield=True):
                await agent.runs.save_ends()  # a last try; else recovery settles them
                await agent.mutations.unmount_all()  # each run did; this makes sure
                await agent.runs.guards.remove_all()
            # Followers of the cancelled runs now get their last bytes and
            # status; give in-flight requests a moment, then close.
            with trio.move_on_after(SHUTDOWN_GRACE):
                await server.wait_idle()
            nursery.cancel_scope.cancel()
