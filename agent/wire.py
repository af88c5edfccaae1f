"""What travels between the agent and its clients, without any I/O, and
cheap to import: a client command imports little more than this (see
:mod:`agent.protocol` for the protocol itself, and the agent's side).

Messages are JSON lines; one with a ``size`` field is followed by that many
raw bytes, its binary frame.  Log records carry their :class:`Kind`, the
same number on the wire as in the log files.
"""

from __future__ import annotations

import enum
import json

TYPE_CHECKING = False  # typing's own import is a tenth of a short command
if TYPE_CHECKING:
    from typing import Any


class Kind(enum.IntEnum):
    OUTPUT = 1  # bytes a stream produced, exactly as read
    AGENT = 2  # a message of the agent about the run (UTF-8 text)
    STATUS = 3  # a status change (JSON)
    RESIZE = 4  # the terminal size of a stream (JSON: cols, rows)
    MARKER = 5  # a step, stage or section begins or ends (JSON)
    STREAM = 6  # names a stream id (JSON: id, name)
    GAP = 7  # output was dropped here to keep the log within its limit (JSON)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class FrameDecoder:
    """The client's side: feed the agent's bytes, get whole messages, each a
    JSON line and, for one with a ``size``, that many raw bytes after it in
    ``payload``.  A big payload may be received straight into its own
    buffer: :meth:`room`, then :meth:`filled`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._message: dict[str, Any] | None = None  # its line read, its payload not whole
        self._payload = bytearray()
        self._filled = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            if self._message is not None:
                taken = min(len(self._payload) - self._filled, len(self._buf))
                self._payload[self._filled:self._filled + taken] = self._buf[:taken]
                del self._buf[:taken]
                if not self._fill(taken, out):
                    break
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                break
            message: dict[str, Any] = json.loads(self._buf[:end])
            del self._buf[:end + 1]
            if "size" in message:
                self._message, self._payload, self._filled = message, bytearray(message["size"]), 0
                self._fill(0, out)
            else:
                out.append(message)
        return out

    def room(self) -> memoryview | None:
        """Where the rest of a payload whose line was read goes, if one is
        on the way: receive into it, then say how much with :meth:`filled`."""
        if self._message is None:
            return None
        return memoryview(self._payload)[self._filled:]

    def filled(self, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._fill(count, out)
        return out

    def _fill(self, count: int, out: list[dict[str, Any]]) -> bool:
        """``count`` more payload bytes arrived; True if that made it whole."""
        self._filled += count
        if self._message is None or self._filled < len(self._payload):
            return False
        self._message["payload"] = self._payload
        out.append(self._message)
        self._message, self._payload, self._filled = None, bytearray(), 0
        return True

    @property
    def pending(self) -> int:
        return len(self._buf) + self._filled
