"""The control protocol: JSON lines over a unix socket, without any I/O.

A client sends one request per line::

    {"id": 1, "op": "run", "args": {"task": "hello", "follow": true}}

and the agent answers with lines carrying the same id: zero or more
*events* (``{"id": 1, "event": "records", ...}``) for streaming operations,
then exactly one final line, ``{"id": 1, "ok": true, "result": ...}`` or
``{"id": 1, "ok": false, "error": {"code": ..., "message": ...}}``.
A message with a ``size`` field is followed by exactly that many raw bytes
(a binary frame): that is how log records travel, never as text that could
be re-encoded.  A connection may carry many requests, one after another.

Lines are capped at :data:`MAX_LINE` bytes; a longer one is refused and the
connection closed, since its end cannot be found without buffering it.
What a client needs of this (encoding a request, decoding frames) is in
:mod:`agent.wire`, which a client command imports without the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import EfciError, RequestError
from .logformat import Kind, Record
from .wire import encode

if TYPE_CHECKING:  # the client imports this module, and starts faster without the model
    from .model import Requester

MAX_LINE = 64 * 1024
# Bounds on what one JSON line may hold, whoever sends it (a client, a
# task's progress reports, a shell's input): Python's own parser would
# raise RecursionError past ~1000 levels and ValueError past 4300 digits.
MAX_DEPTH = 32
MAX_DIGITS = 20


# op -> {argument: (type, required)}: the table is agent.ops's, passed in.
Schemas = Mapping[str, Mapping[str, tuple[type, bool]]]


class LineTooLong(RequestError):
    pass


@dataclass(frozen=True)
class Request:
    id: int | str | None
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One request being answered: its id, who asked (SO_PEERCRED), how to
    send messages back, and (for efci shell) how to read what the peer sends
    next.  The socket server makes one per request; so can another front end."""

    id: int | str | None
    requester: Requester
    send: Callable[[bytes], Awaitable[None]]
    receive_line: Callable[[], Awaitable[bytes | None]]
    # Says a big answer follows: the connection may buffer more of it.
    bulk: Callable[[], None] = lambda: None
    # Sends a frame's line and payload as far as the peer takes them without
    # waiting, from code that cannot wait; how many bytes went (0: none).
    send_nowait: Callable[[bytes, bytes], int] = lambda line, payload: 0

    async def event(self, kind: str, **fields: Any) -> None:
        await self.send(event(self.id, kind, **fields))


class LineSplitter:
    """Feed bytes, get complete lines (without the newline)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self._max or any(len(line) > self._max for line in lines):
            raise LineTooLong(f"request line longer than {self._max} bytes")
        self._buf = bytearray(rest)
        return [bytes(line) for line in lines]


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def _depth(line: bytes) -> int:
    """How deeply arrays and objects nest, outside strings (linear time)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b'""', line)):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number longer than {MAX_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(line: bytes) -> Any:
    """Parse one untrusted JSON line within bounds: nesting up to MAX_DEPTH,
    integers up to MAX_DIGITS digits, no NaN or Infinity.  Raises ValueError
    (with what is wrong) for anything else, never another exception."""
    if _depth(line) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(line, parse_int=_bounded_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from None


def parse_request(line: bytes, ops: Schemas) -> Request:
    """Validate one request line against the operations' argument schemas;
    RequestError says what is wrong."""
    try:
        msg = loads(line)
    except ValueError as e:
        raise RequestError(f"request is not JSON within bounds: {e}") from None
    if not isinstance(msg, dict):
        raise RequestError("request must be a JSON object")
    rid = msg.get("id")
    if rid is not None and not (isinstance(rid, int | str) and not isinstance(rid, bool)
                                and len(str(rid)) <= 64):
        raise RequestError("id must be a number or a string of at most 64 characters")
    unknown = set(msg) - {"id", "op", "args"}
    if unknown:
        raise RequestError(f"unknown request field {sorted(unknown)[0]!r}")
    op = msg.get("op")
    if not isinstance(op, str) or op not in ops:
        raise RequestError(f"unknown op {op!r}; known: {', '.join(sorted(ops))}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise RequestError("args must be a JSON object")
    spec = ops[op]
    for name, value in args.items():
        if name not in spec:
            raise RequestError(f"{op}: unknown argument {name!r}")
        kind = spec[name][0]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RequestError(f"{op}: argument {name!r} must be {kind.__name__}")
        if isinstance(value, int) and not 0 <= value < 2**62:
            raise RequestError(f"{op}: argument {name!r} is out of range")
    for name, (_, required) in spec.items():
        if required and name not in args:
            raise RequestError(f"{op}: missing argument {name!r}")
    return Request(rid, op, args)


def request_id_of(line: bytes) -> int | str | None:
    """Best-effort id of a line that failed validation, to address the error."""
    try:
        rid = loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def ok(rid: int | str | None, result: Any) -> bytes:
    return encode({"id": rid, "ok": True, "result": result})


def error(rid: int | str | None, err: EfciError) -> bytes:
    return encode({"id": rid, "ok": False, "error": err.to_wire()})


def event(rid: int | str | None, kind: str, **fields: Any) -> bytes:
    return encode({"id": rid, "event": kind, **fields})


def records_event(rid: int | str | None, records: list[Record]) -> tuple[bytes, bytes]:
    """One binary frame, in two pieces sent one after the other (no third
    copy of the bytes): a line describing the records, then their payloads.

    ``records`` lists ``[position, kind, stream, time_ns, length]``; ``next``
    is where to resume reading after them."""
    meta = [[r.position, r.kind.value, r.stream, r.time_ns, len(r.payload)] for r in records]
    blob = b"".join(r.payload for r in records)
    return event(rid, "records", records=meta, next=records[-1].end, size=len(blob)), blob


def decode_records(message: dict[str, Any]) -> list[Record]:
    """The records of a ``records`` event whose frame was read into ``payload``."""
    out, at = [], 0
    with memoryview(message["payload"]) as blob:
        for position, kind, stream, time_ns, length in message["records"]:
            out.append(Record(position, Kind(kind), stream, time_ns, bytes(blob[at:at + length])))
            at += length
    return out
