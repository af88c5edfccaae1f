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
    from collections.abc import Callable
    from typing import Any

PASSING_BUFFER = 1 << 20  # what a passed-through output event is received into, at most


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
    ``payload``.  A big payload may be received straight into its buffer:
    :meth:`room`, then :meth:`filled`.  With ``on_output`` set, an
    ``output`` event's bytes go to it as they come, through one buffer
    used again and again, instead of into ``payload``: a raw log passes
    through without a buffer of its own for each frame."""

    def __init__(self) -> None:
        self.on_output: Callable[[memoryview], object] | None = None
        self._buf = bytearray()
        self._message: dict[str, Any] | None = None  # its line read, its payload not whole
        self._payload = bytearray()  # where the payload goes (passing: the reused buffer)
        self._filled = 0
        self._left = 0  # of the payload, still to come
        self._passing = False  # the payload goes to on_output

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            if self._message is not None:
                taken = min(self._left, len(self._buf))
                if self._passing:
                    with memoryview(self._buf) as view:
                        self._pass(view[:taken])
                else:
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
            if "size" not in message:
                out.append(message)
                continue
            self._message, self._filled, self._left = message, 0, message["size"]
            self._passing = self.on_output is not None and message.get("event") == "output"
            if self._passing:
                if len(self._payload) < PASSING_BUFFER:
                    self._payload = bytearray(PASSING_BUFFER)
            else:
                self._payload = bytearray(self._left)
            self._fill(0, out)
        return out

    def room(self) -> memoryview | None:
        """Where the rest of a payload whose line was read goes, if one is
        on the way: receive into it, then say how much with :meth:`filled`."""
        if self._message is None:
            return None
        if self._passing:
            return memoryview(self._payload)[:self._left]
        return memoryview(self._payload)[self._filled:]

    def filled(self, count: int) -> list[dict[str, Any]]:
        if self._passing:
            with memoryview(self._payload) as view:
                self._pass(view[:count])
        out: list[dict[str, Any]] = []
        self._fill(count, out)
        return out

    def _pass(self, data: memoryview) -> None:
        assert self.on_output is not None
        if data:
            self.on_output(data)

    def _fill(self, count: int, out: list[dict[str, Any]]) -> bool:
        """``count`` more payload bytes arrived; True if that made it whole."""
        self._filled += count
        self._left -= count
        if self._message is None or self._left > 0:
            return False
        if not self._passing:
            self._message["payload"] = self._payload
            self._payload = bytearray()
        out.append(self._message)
        self._message, self._filled = None, 0
        return True

    @property
    def pending(self) -> int:
        return len(self._buf) + self._filled
