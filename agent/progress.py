"""The progress channel (the seed's open question): a unix socket the task
may write JSON lines to, without any network.

Each run gets ``<state>/progress/<run>/progress.sock``; its directory is
mounted at ``/run/efci`` in the task container, so a task reports with e.g.::

    echo '{"progress": 0.4, "message": "linking"}' | socat - UNIX-CONNECT:/run/efci/progress.sock
    python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); ...'

``progress`` is a number from 0 to 1 and ``message`` a short text; either
may be left out.  The latest report is kept with the run (``efci show``,
``efci runs``) and every accepted one goes into the log as a status record.
Input is untrusted: lines are capped, malformed ones are counted and
dropped, and a flood is cut to a few updates a second.
"""

from __future__ import annotations

import math
import os
import shutil
import socket as stdsocket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .protocol import LineSplitter, LineTooLong, loads

MOUNT_POINT = "/run/efci"
MAX_LINE = 4096
MAX_MESSAGE = 200
MAX_CONNECTIONS = 8
MIN_INTERVAL = 0.25  # seconds between updates handed on

Update = Callable[[float | None, str | None], Awaitable[None]]


def parse_report(line: bytes) -> tuple[float | None, str | None] | None:
    """(progress, message) of a report line, or None if it is not one."""
    try:
        report = loads(line)
    except ValueError:
        return None
    if not isinstance(report, dict) or not report or set(report) - {"progress", "message"}:
        return None
    progress, message = report.get("progress"), report.get("message")
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, int | float) \
                or not math.isfinite(progress) or not 0 <= progress <= 1:
            return None
        progress = float(progress)
    if message is not None:
        if not isinstance(message, str):
            return None
        message = "".join(c for c in message if c.isprintable())[:MAX_MESSAGE]
    return progress, message


class ProgressChannels:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "progress"

    def directory(self, run_id: int) -> Path:
        return self.root / str(run_id)

    @asynccontextmanager
    async def open(self, run_id: int, update: Update) -> AsyncIterator[Path]:
        """Listen on the run's socket while the block runs; yields the
        directory to mount at /run/efci.  The socket is gone afterwards."""
        directory = self.directory(run_id)
        try:
            directory.mkdir(parents=True, mode=0o755)
        except FileExistsError:  # left by an attempt before, or a crash
            shutil.rmtree(directory)
            directory.mkdir(mode=0o755)
        os.chmod(directory, 0o755)  # noqa: S103 - the task may run as any user
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        channel = _Channel(update)
        try:
            await sock.bind(str(directory / "progress.sock"))
            os.chmod(directory / "progress.sock", 0o777)  # noqa: S103 - any user in the task
            sock.listen(MAX_CONNECTIONS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.serve, sock)
                nursery.start_soon(channel.flush_forever)
                try:
                    yield directory
                finally:
                    nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await channel.flush()  # the last report is never lost to the rate limit
        finally:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)


class _Channel:
    """Keeps the latest report; hands it on at most every MIN_INTERVAL."""

    def __init__(self, update: Update) -> None:
        self._update = update
        self._pending: tuple[float | None, str | None] | None = None
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def flush(self) -> None:
        if self._pending is not None:
            report, self._pending = self._pending, None
            await self._update(*report)

    async def flush_forever(self) -> None:
        while True:
            await trio.sleep(MIN_INTERVAL)
            await self.flush()

    async def serve(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                return  # too many at once: refused
            try:
                splitter = LineSplitter(MAX_LINE)
                while data := await conn.recv(65536):
                    for line in splitter.feed(data):
                        report = parse_report(line)
                        if report is not None:
                            self._pending = report
            except (LineTooLong, OSError):
                pass
            finally:
                self._slots.release()
