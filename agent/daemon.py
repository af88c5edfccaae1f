"""``efci agent``: the Trio main.

Start-up: check dockerd answers, open the state store, load declarations,
recover what a previous agent left unfinished, bind the socket, serve.
SIGTERM/SIGINT stop it gracefully: the socket stops accepting, active runs
are cancelled (their containers stopped, their status recorded), then it
exits.  SIGHUP reloads the declarations, like ``efci reload``.
"""

from __future__ import annotations

import gc
import logging
import resource
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from . import __version__, declarations, gitea, ops, protocol
from .caches import Caches
from .checkout import Checkouts
from .config import AgentConfig
from .control import ControlServer, bind_socket
from .errors import CommandFailed, EfciError
from .gc import Collector
from .gitea import GiteaAPI, StatusSender
from .host.docker import DockerCLI
from .host.engine import Engine
from .keys import KeyStore
from .logstore import LogStore
from .model import RunStatus, Task
from .mutations import Mutations
from .network import TaskNetwork
from .runs import Runs
from .state import StateStore

log = logging.getLogger("efci.agent")

# How long in-flight requests may take to finish once the agent is stopping.
SHUTDOWN_GRACE = 5
# Files the agent holds besides clients: state, logs, PTYs, docker pipes.
OWN_FILES = 4096


class Agent:
    """The request handlers and the state they share."""

    def __init__(self, cfg: AgentConfig, engine: Engine, state: StateStore,
                 logs: LogStore) -> None:
        self.cfg = cfg
        self.engine = engine
        self.state = state
        self.logs = logs
        self.instance = state.instance()
        self.keys = KeyStore(cfg.secrets_base)
        self.gitea = GiteaAPI(cfg.gitea_api, cfg.gitea_token) if cfg.gitea_api else None
        self.checkouts = Checkouts(cfg, engine, state, self.keys, self.instance, self.gitea)
        self.mutations = Mutations(cfg, engine, self.instance)
        self.network = TaskNetwork(cfg, engine)
        self.caches = Caches(cfg, state)
        self.runs = Runs(cfg, engine, state, logs, self.checkouts, self.mutations, self.network,
                         self.caches, self.instance)
        self.decls = declarations.DeclarationSet()
        self.started_at = time.time()
        self.docker_version = ""
        self.web: dict[str, Any] | None = None  # efci web's announcement, while it is up
        self.statuses = StatusSender(state, self.gitea)
        self.gc = Collector(self)
        self.runs.on_end = self.run_ended

    # -- Gitea commit statuses ---------------------------------------------------

    async def commit_status(self, run_id: int, task: Task, trigger: dict[str, Any],
                            state: str, description: str, sha: str | None = None) -> None:
        """Queue the commit status of a run a push started (never fails the run)."""
        try:
            await self.statuses.add(
                run_id, trigger["repository"], sha or trigger["after"], state,
                f"efci/{task.owner}/{task.name}", f"{self.cfg.web_url}/runs/{run_id}",
                description)
        except EfciError as e:
            log.error("run %d: its commit status %s could not be queued: %s", run_id, state,
                      e.message)

    async def run_ended(self, run_id: int, task: Task, status: RunStatus) -> None:
        record = await self.state.call(self.state.get_run, run_id)
        trigger = record.to_wire()["trigger"] if record else {}
        if record is None or trigger.get("kind") != "push":
            return
        worktrees = await self.state.call(self.state.run_worktrees, run_id)
        checked_out = [w["commit_sha"] for w in worktrees
                       if w["mount_name"] in trigger.get("mounts", [])]
        took = (record.finished_at or 0) - (record.started_at or record.created_at)
        await self.commit_status(run_id, task, trigger, gitea.STATES[status],
                                 f"{status.value.replace('_', ' ')} in {took:.1f}s",
                                 sha=checked_out[0] if checked_out else None)

    # -- declarations ---------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read conf.d; broken files keep their last good version."""
        parsed = declarations.parse_all(self.cfg.declarations_dir,
                                        default_owner=self.cfg.owner,
                                        secrets_base=self.cfg.secrets_base,
                                        gitea_api=self.cfg.gitea_api,
                                        most=self.cfg.max_limits)
        refs = declarations.image_refs(parsed, self.decls)
        present = await self.engine.present_images(refs)
        self.decls = declarations.assemble(parsed, existing_images=present, previous=self.decls)
        if self.caches.problem:  # not checked yet, or mounted by the administrator since
            await self.caches.check(self.runs.docker_root)
        await self.caches.claim(list(self.decls.tasks.values()))
        await self.caches.sweep()  # claims just released may be past their grace
        for file, message in self.decls.errors.items():
            kept = " (its last good version stays in force)" if file in self.decls.by_file else ""
            log.error("declaration refused%s: %s", kept, message)
        for warning in self.decls.warnings:
            log.warning("%s", warning)
        log.info("declarations: %d tasks, %d images from %s", len(self.decls.tasks),
                 len(self.decls.images), self.cfg.declarations_dir)
        return self.declarations_summary()

    # -- for the operations ------------------------------------------------------

    def declarations_summary(self) -> dict[str, Any]:
        return {"tasks": len(self.decls.tasks), "images": len(self.decls.images),
                "errors": self.decls.errors, "warnings": self.decls.warnings,
                "directory": str(self.cfg.declarations_dir)}

    def tasks_using_key(self, owner: str, name: str) -> list[str]:
        return sorted(t.name for t in self.decls.tasks.values()
                      if t.owner == owner and any(r.key == name for r in t.repositories))

    async def handle(self, request: protocol.Request, call: protocol.Call) -> object:
        return await ops.dispatch(self, call, request)


def _open_files_for(cfg: AgentConfig) -> None:
    """Room for socket.max_connections clients besides the agent's own
    files: the soft limit raised as far as the hard one allows (1024 by
    default, which 1000 clients plus runs' PTYs and logs would pass)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = cfg.socket_max_connections + OWN_FILES
    if soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        if raised < wanted:
            log.warning("open files are limited to %d; socket.max_connections %d needs %d",
                        raised, cfg.socket_max_connections, wanted)


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT.  The signals are ours from
    the start to the end: one that comes while starting is acted on once
    serving, and one that comes while stopping cannot cut the cleanup short."""
    _open_files_for(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        await _serve(cfg, signals)


async def _serve(cfg: AgentConfig, signals: AsyncIterator[int]) -> None:
    engine = DockerCLI(cfg.docker)
    try:
        version = await engine.version()
    except CommandFailed as e:
        raise EfciError(f"dockerd does not answer ({e.stderr_text or e.message}); start it "
                        "(systemctl start docker, or dockerd &) and try again") from e
    state = StateStore(cfg.state_dir / "state.db")
    try:
        agent = Agent(cfg, engine, state, LogStore(cfg.log_dir, limit=cfg.log_limit))
        agent.docker_version = version
        agent.runs.docker_root = await engine.root_dir()
        log.info("efforting-ci %s starting: config %s, state %s, docker %s", __version__,
                 cfg.source, cfg.state_dir, version)
        await agent.runs.recover()
        await agent.network.ensure()
        try:
            await agent.reload()
            if await engine.present_images({cfg.base_image}):
                await agent.network.probe(cfg.base_image)
            else:
                log.warning("no %s to probe the network rules with", cfg.base_image)
            sock = bind_socket(cfg.socket_path, mode=cfg.socket_mode, group=cfg.socket_group)
            try:
                await _serve_until_signal(agent, sock, signals)
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


async def _serve_until_signal(agent: Agent, sock: Any, signals: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.runs.serve)
        await nursery.start(agent.statuses.serve)
        await nursery.start(agent.caches.serve)
        await nursery.start(agent.gc.serve)
        server = ControlServer(sock, agent.handle, ops.schemas(),
                               max_connections=agent.cfg.socket_max_connections,
                               idle_timeout=agent.cfg.socket_idle_timeout)
        await nursery.start(server.serve)
        # What starting made (modules, settings, declarations) lives as long
        # as the agent: frozen, a full garbage collection no longer walks it
        # each time, which paused everything, a live log's followers too,
        # for some 40 ms.
        gc.freeze()
        log.info("listening on %s", agent.cfg.socket_path)
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading declarations")
                await agent.reload()
                continue
            log.info("%s: stopping (%d active runs)", signal.Signals(signum).name,
                     len(agent.runs.active))
            break
        async with trio.open_nursery() as stopping:
            stopping.start_soon(_hurry_on_signal, signals, agent)
            await agent.runs.shutdown()
            stopping.cancel_scope.cancel()
        # Followers of the cancelled runs now get their last bytes and
        # status; give in-flight requests a moment, then close.
        with trio.move_on_after(SHUTDOWN_GRACE):
            await server.wait_idle()
        nursery.cancel_scope.cancel()


async def _hurry_on_signal(signals: AsyncIterator[int], agent: Agent) -> None:
    """A second SIGTERM or SIGINT while draining cancels the running runs now."""
    async for signum in signals:
        if signum != signal.SIGHUP:
            log.info("%s again: cancelling the running runs now", signal.Signals(signum).name)
            agent.runs.hurry()
