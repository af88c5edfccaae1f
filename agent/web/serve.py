"""``efci web``: hypercorn's trio worker serving the page, and the call
that tells the agent (and so ``efci status``) that the page is up."""

from __future__ import annotations

import logging
import signal
import socket
import warnings

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..config import AgentConfig
from ..errors import EfciError
from .app import make_app
from .link import AgentLink

log = logging.getLogger(__name__)

RETRY = 2.0  # seconds between attempts to reach an agent that is not up


async def announce(link: AgentLink, url: str) -> None:
    """Keep a web_hello call open while serving; again after the agent restarts."""
    said = False  # one warning per outage, not one per retry
    while True:
        try:
            async with link.open("web_hello", url=url) as exchange:
                await exchange.next()  # the agent's hello: it has us
                log.info("the agent at %s knows the page is up", link.socket_path)
                said = False
                await exchange.next()  # only when the agent goes away
        except EfciError as e:
            if not said:
                log.warning("the agent is not answering (%s); the page says so until it "
                            "does, trying every %.0f s", e, RETRY)
                said = True
        await trio.sleep(RETRY)


async def _stop_on_signal(done: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping the web page")
            done.set()
            return


def check_listen(cfg: AgentConfig) -> None:
    """Say plainly when the address is taken, before hypercorn would (in a
    traceback)."""
    host, port = cfg.web_listen
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise EfciError(f"the web page cannot listen on {host}:{port}: {e.strerror}; "
                            f"stop what uses it or set web.listen in {cfg.source}") from None


async def serve(cfg: AgentConfig) -> None:
    # Debian's hypercorn 0.13 still catches trio.MultiError: its warning, not ours.
    warnings.filterwarnings("ignore", message=".*MultiError is deprecated", module="hypercorn")
    check_listen(cfg)
    link = AgentLink(cfg.socket_path)
    host, port = cfg.web_listen
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # paths are no secret, but keep the journal for what matters
    config.h11_max_incomplete_size = 16 * 1024  # bounds a request line and its headers
    config.graceful_timeout = 2.0
    done = trio.Event()
    log.info("serving the web page on %s for the agent at %s (%s)", config.bind[0],
             cfg.socket_path, cfg.web_url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, done)
        nursery.start_soon(announce, link, cfg.web_url)
        await hypercorn_serve(make_app(cfg, link), config,  # type: ignore[arg-type]
                              shutdown_trigger=done.wait)
        nursery.cancel_scope.cancel()
