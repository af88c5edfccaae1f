"""A blocking client of the control socket, for ``efci`` and for tests.

Plain sockets, no Trio: a CLI call should start fast and do one thing.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

from . import wire
from .errors import AgentUnreachable, EfciError

TYPE_CHECKING = False  # see cli: a client command imports little
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    EventHandler = Callable[[dict[str, Any]], None]

BIG_PAYLOAD = 64 << 10  # the rest of a frame this big is received into its own buffer
_EXIT_BY_CODE = {"config": 78, "bad_request": 64, "not_found": 66, "conflict": 75,
                 "refused": 77}


class RemoteError(EfciError):
    """An error the agent answered with; keeps its code and fields."""

    def __init__(self, wire: dict[str, Any]) -> None:
        super().__init__(str(wire.get("message", "unknown error")))
        self.code = str(wire.get("code", "error"))
        self.exit_status = _EXIT_BY_CODE.get(self.code, 1)
        self.wire = wire

    def to_wire(self) -> dict[str, object]:
        return self.wire


def _permission_denied(socket_path: str | os.PathLike[str]) -> str:
    """The agent may well be running: the socket refused this user."""
    import getpass
    import grp

    try:
        group = grp.getgrgid(os.stat(socket_path).st_gid).gr_name
    except (OSError, KeyError):
        group = "efci-admin"
    return (f"permission denied on the agent's socket {socket_path}: only root and members "
            f"of the group {group} may use it. Ask an administrator to run "
            f"`adduser {getpass.getuser()} {group}`, then log in again.")


class Client:
    def __init__(self, socket_path: str | os.PathLike[str], *,
                 timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(timeout)
        except PermissionError:
            self._sock.close()
            raise AgentUnreachable(_permission_denied(socket_path)) from None
        except BlockingIOError:
            self._sock.close()
            raise AgentUnreachable(
                f"the efforting-ci agent at {socket_path} accepted no connection within "
                f"{timeout:g} s (Resource temporarily unavailable: its queue of new "
                "connections stayed full). It is overloaded or stuck; see its log "
                "(`journalctl -u efforting-ci`)."
            ) from None
        except OSError as e:
            self._sock.close()
            raise AgentUnreachable(
                f"cannot reach the efforting-ci agent at {socket_path}: {e.strerror}. "
                "Start it with `systemctl start efforting-ci` (or `efci agent`), or point "
                "efci at its socket with --root, --socket or EFCI_ROOT."
            ) from None
        self._frames = wire.FrameDecoder()
        self._messages: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def _connect(self, timeout: float | None) -> None:
        """Connect, waiting while the agent's listen backlog is full: a unix socket
        with a timeout answers EAGAIN then rather than blocking (a burst of clients)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            try:
                self._sock.connect(str(self.socket_path))
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send_raw(self, line: bytes) -> None:
        self._sock.sendall(line)

    def read_message(self) -> dict[str, Any]:
        """One message; a binary frame's bytes are put in ``payload``."""
        while not self._messages:
            room = self._frames.room()
            if room is not None and len(room) >= BIG_PAYLOAD:  # no copy in between
                count = self._sock.recv_into(room)
                data = b""
            else:
                data = self._sock.recv(1 << 20)
                count = len(data)
            if not count:
                middle = " in the middle of a message" if self._frames.pending else ""
                raise AgentUnreachable(f"the agent at {self.socket_path} closed the "
                                       f"connection{middle}")
            self._messages = self._frames.feed(data) if data else self._frames.filled(count)
        return self._messages.pop(0)

    def call(self, op: str, args: dict[str, Any] | None = None, *,
             on_event: EventHandler | None = None,
             on_output: Callable[[memoryview], object] | None = None) -> Any:
        """Send one request; pass its events to ``on_event``; return its
        result.  With ``on_output``, the bytes of ``output`` events go to it
        as they arrive (a view it must not keep), not into their message."""
        rid = next(self._ids)
        self.send_raw(wire.encode({"id": rid, "op": op, "args": args or {}}))
        self._frames.on_output = on_output
        try:
            while True:
                message = self.read_message()
                if "event" in message:
                    if on_event is not None:
                        on_event(message)
                    continue
                if message.get("ok"):
                    return message.get("result")
                raise RemoteError(message.get("error") or {})
        finally:
            self._frames.on_output = None
