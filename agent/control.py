"""The control socket server: a thin shell around :mod:`agent.protocol`.

Access control is the socket file itself (mode 0660, group efci-admin);
each connection's peer uid/gid/pid come from SO_PEERCRED and are handed to
the handler, which records them with every run a peer starts.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import logging
import math
import os
import socket as stdsocket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from . import protocol
from .errors import Conflict, EfciError, RequestError, internal_error
from .model import Requester

log = logging.getLogger(__name__)

# A client that takes no data for this long is dropped, so a stuck follower
# ties up no task; it can resume from the last position it received.
SEND_TIMEOUT = 60

# Bounds on reading and discarding a refused client's remaining input.
LINGER_SECONDS = 5
LINGER_BYTES = 64 << 20

# What a connection sending a big answer may have in the kernel's buffer: a
# batch of ops.OUTPUT_BATCH.  SO_SNDBUFFORCE is Linux's own number for the
# option (Python's socket module does not name it).
BULK_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32

# Answers one validated request; the server makes the Call it gets.
Handler = Callable[[protocol.Request, protocol.Call], Awaitable[object]]


class SocketInUse(EfciError):
    """The control socket cannot be made: in use, or not ours to make."""

    code = "socket_in_use"


def peer_credentials(sock: trio.socket.SocketType) -> Requester:
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Requester(uid=uid, gid=gid, pid=pid)


def bind_socket(path: Path, *, mode: int, group: str) -> stdsocket.socket:
    """Bind the control socket with its permissions already set.

    It is bound under a temporary name, chmod/chown'd, then renamed into
    place, so no client ever sees it with looser permissions.  A stale
    socket (nobody listening) is replaced; a live one is an error.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass  # stale: replaced below by the rename
        else:
            raise SocketInUse(f"another agent is already listening on {path}")
        finally:
            probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        try:
            os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            log.warning("group %s does not exist; %s is usable by its owner only", group, path)
        except PermissionError:
            raise SocketInUse(f"cannot give {path} to group {group}: the agent's user must "
                              f"be a member of {group} (or have CAP_CHOWN)") from None
        os.rename(tmp, path)
        # The kernel caps this at net.core.somaxconn; a burst of clients beyond the
        # backlog would get EAGAIN from connect() before the agent could accept them.
        sock.listen(stdsocket.SOMAXCONN)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


class ControlServer:
    """Serves the socket; knows how many requests are being handled so a
    stopping agent can let them finish (up to a deadline) before it closes."""

    def __init__(self, sock: stdsocket.socket, handler: Handler, ops: protocol.Schemas, *,
                 max_connections: int = 1000, idle_timeout: float = 120) -> None:
        self._sock = sock
        self._handler = handler
        self._ops = ops
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._connections = 0
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Accept connections until cancelled; each gets its own task."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                requester = peer_credentials(stream.socket)
                if self._connections >= self._max_connections:
                    nursery.start_soon(self._refuse, stream, requester)
                    continue
                nursery.start_soon(self._connection, stream, requester)

    async def _connection(self, stream: trio.SocketStream, requester: Requester) -> None:
        self._connections += 1
        try:
            await serve_connection(stream, requester, self._tracked, self._ops,
                                   idle_timeout=self._idle_timeout)
        finally:
            self._connections -= 1

    async def _refuse(self, stream: trio.SocketStream, requester: Requester) -> None:
        """Past the limit: a clear error, then closed (bounded in time, so a
        flood of refused clients holds nothing either)."""
        log.warning("refused a client (pid %d): %d clients are connected "
                    "(socket.max_connections)", requester.pid, self._connections)
        error = Conflict(f"the agent has {self._connections} clients connected, its limit "
                             "(socket.max_connections in agent.yml); try again shortly")
        async with stream:
            with trio.move_on_after(LINGER_SECONDS), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(protocol.error(None, error))

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def _tracked(self, request: protocol.Request, call: protocol.Call) -> object:
        if self._in_flight == 0:
            self._idle = trio.Event()
        self._in_flight += 1
        try:
            return await self._handler(request, call)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class Connection:
    """One client.  Calling it sends bytes (a client that takes nothing for
    SEND_TIMEOUT is dropped); :meth:`receive_line` reads the next line, for
    the request loop and for handlers that take input (efci shell)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, requester: Requester) -> None:
        self.stream = stream
        self.requester = requester
        self._socket = getattr(stream, "socket", None)  # None: not a socket (a test's stream)
        self._send_lock = trio.Lock()
        self._splitter = protocol.LineSplitter()
        self._lines: collections.deque[bytes] = collections.deque()

    async def __call__(self, data: bytes) -> None:
        # Taken without a checkpoint when free: a line of a live log goes to
        # each of its followers' sockets in turn, rather than all of them
        # first yielding once at the lock and sending only on the next round.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            log.warning("dropped a client (pid %d) that read nothing for %ds",
                        self.requester.pid, SEND_TIMEOUT)
            raise trio.BrokenResourceError("client too slow") from None
        finally:
            self._send_lock.release()

    def send_nowait(self, line: bytes, payload: bytes) -> int:
        """Send what the socket takes now of ``line`` and ``payload``, unless
        a send is under way (its bytes go first); how many bytes went."""
        # The descriptor is asked each time: -1 once closed, never another file's.
        fd = self._socket.fileno() if self._socket is not None else -1
        if fd < 0 or self._send_lock.locked():
            return 0
        try:  # non-blocking, as Trio's sockets are; an error is left for Trio's send to raise
            return os.writev(fd, (line, payload)) if payload else os.write(fd, line)
        except OSError:
            return 0

    def bulk(self) -> None:
        """A big answer follows (a raw log): let the kernel hold BULK_BUFFER
        of it, so the agent reads the next part while the client takes this
        one.  SO_SNDBUFFORCE passes net.core.wmem_max (the agent may, with
        CAP_NET_ADMIN); SO_SNDBUF, within it, is the fallback."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            return  # not a socket (a test's stream)
        for option in (SO_SNDBUFFORCE, stdsocket.SO_SNDBUF):
            try:
                sock.setsockopt(stdsocket.SOL_SOCKET, option, BULK_BUFFER)
                return
            except OSError:
                continue

    async def receive_line(self) -> bytes | None:
        """The next line, or None when the client closed its side."""
        while not self._lines:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._lines.extend(self._splitter.feed(data))
        return self._lines.popleft()


async def serve_connection(stream: trio.abc.HalfCloseableStream, requester: Requester,
                           handler: Handler, ops: protocol.Schemas, *,
                           idle_timeout: float = math.inf) -> None:
    """Answer one client's requests, in order, until it hangs up or sends
    no request for ``idle_timeout`` seconds."""
    conn = Connection(stream, requester)
    async with stream:
        try:
            while True:
                with trio.move_on_after(idle_timeout) as idle:
                    line = await conn.receive_line()
                if idle.cancelled_caught:
                    log.info("disconnected a client (pid %d) that sent no request for %ds",
                             requester.pid, idle_timeout)
                    break
                if line is None:
                    break
                if line.strip():
                    await _one_request(line, handler, ops, conn)
        except protocol.LineTooLong as e:
            await conn(protocol.error(None, e))
            await _lingering_close(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nothing to answer
        except Exception as e:
            # Nothing one client sends may end the agent: this connection
            # gets an error answer and is closed; every other goes on.
            log.exception("connection of pid %d failed", requester.pid)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn(protocol.error(None, internal_error(e)))


async def _lingering_close(stream: trio.abc.HalfCloseableStream) -> None:
    """Close after an error without losing the error: closing a unix socket
    with unread input resets it, and the peer would never read our answer.
    So half-close, then discard what the peer still sends, within bounds."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_SECONDS):
        discarded = 0
        while discarded < LINGER_BYTES and (data := await stream.receive_some(65536)):
            discarded += len(data)


async def _one_request(line: bytes, handler: Handler, ops: protocol.Schemas,
                       send: Connection) -> None:
    try:
        request = protocol.parse_request(line, ops)
    except RequestError as e:
        await send(protocol.error(protocol.request_id_of(line), e))
        return
    call = protocol.Call(request.id, send.requester, send, send.receive_line, send.bulk,
                         send.send_nowait)
    try:
        result = await handler(request, call)
    except EfciError as e:
        await send(protocol.error(request.id, e))
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled):
        raise
    except Exception as e:
        log.exception("op %s failed", request.op)
        await send(protocol.error(request.id, internal_error(e)))
        return
    await send(protocol.ok(request.id, result))
