"""The run log's on-disk format, without any I/O (see README, "Log format").

A log is a sequence of segment files.  Each starts with a header::

    magic "EFCILOG\\0" (8) | version u32 | segment number u32 | start position u64

then holds records, back to back, each::

    length u32 | kind u8 | stream u8 | flags u16 | time ns u64 | crc32 u32 | payload

all little-endian.  ``crc32`` covers the first 16 header bytes and the
payload, so a torn or corrupted record is recognised.  A record's *position*
is its byte offset in the whole log: the segment's start position plus its
offset in the segment file.  Positions only grow, even when the store drops
middle segments of an oversized log.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .wire import Kind as Kind  # the same kinds travel on the wire

MAGIC = b"EFCILOG\x00"
VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sIIQ")
RECORD_HEADER = struct.Struct("<IBBHQI")
MAX_PAYLOAD = 1 << 20


# Fixed stream ids; others are named by STREAM records.
AGENT_STREAM = 0
TASK_STREAM = 1


class FormatError(Exception):
    pass


@dataclass(frozen=True)
class Record:
    position: int
    kind: Kind
    stream: int
    time_ns: int
    payload: bytes

    @property
    def size(self) -> int:
        return RECORD_HEADER.size + len(self.payload)

    @property
    def end(self) -> int:
        return self.position + self.size

    def json(self) -> Any:
        return json.loads(self.payload)


def segment_header(number: int, start: int) -> bytes:
    return SEGMENT_HEADER.pack(MAGIC, VERSION, number, start)


def parse_segment_header(data: bytes) -> tuple[int, int]:
    """(segment number, start position); FormatError if it is not one of ours."""
    if len(data) < SEGMENT_HEADER.size:
        raise FormatError("segment header is incomplete")
    magic, version, number, start = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not an efforting-ci log segment (bad magic)")
    if version != VERSION:
        raise FormatError(f"log format version {version} is not supported (this is {VERSION})")
    return number, start


def record_header(kind: Kind, stream: int, time_ns: int,
                  payload: bytes | bytearray | memoryview) -> bytes:
    """The header of a record of ``payload``, which follows it."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = struct.pack("<IBBHQ", len(payload), kind, stream, 0, time_ns)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def encode_record(kind: Kind, stream: int, time_ns: int,
                  payload: bytes | bytearray | memoryview) -> bytes:
    return record_header(kind, stream, time_ns, payload) + payload


def encode_json(kind: Kind, stream: int, time_ns: int, value: Any) -> bytes:
    return encode_record(kind, stream, time_ns,
                         json.dumps(value, separators=(",", ":")).encode())


def frames(buf: bytes | memoryview, offset: int) -> Iterator[tuple[int, int, int, int, memoryview]]:
    """``(offset, kind, stream, time_ns, payload)`` of each whole, valid record
    in ``buf`` from ``offset``, the payload a view into ``buf``; stops at the
    first incomplete or invalid one (a torn tail, a bad checksum, an unknown
    kind).  The one place that decides what a valid record is."""
    view = memoryview(buf)
    end = len(view)
    size = RECORD_HEADER.size
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    kinds = len(Kind)
    while offset + size <= end:
        length, kind, stream, _flags, time_ns, crc = unpack(view, offset)
        stop = offset + size + length
        if length > MAX_PAYLOAD or stop > end or not 1 <= kind <= kinds:
            return
        payload = view[offset + size:stop]
        if crc32(payload, crc32(view[offset:offset + 16])) != crc:
            return
        yield offset, kind, stream, time_ns, payload
        offset = stop


def iter_records(buf: bytes | memoryview, offset: int, base: int) -> Iterator[Record]:
    """Whole, valid records in ``buf`` from ``offset`` (see :func:`frames`).
    ``base`` is the position of ``buf[0]``."""
    for at, kind, stream, time_ns, payload in frames(buf, offset):
        yield Record(base + at, Kind(kind), stream, time_ns, bytes(payload))


def valid_end(buf: bytes | memoryview, offset: int) -> int:
    """The offset just past the last whole, valid record from ``offset``: where
    a torn tail begins."""
    for at, _kind, _stream, _time, payload in frames(buf, offset):
        offset = at + RECORD_HEADER.size + len(payload)
    return offset


# -- the index: an entry every so often, so readers need not scan everything ------

INDEX_ENTRY = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class IndexEntry:
    position: int  # a record boundary
    time_ns: int  # that record's time
    output_bytes: int  # OUTPUT payload bytes before it
    # Written as 0.  (It was to count the newlines before the entry; nothing
    # read them, and counting cost a tenth of the agent's time on busy output.)
    reserved: int = 0

    def pack(self) -> bytes:
        return INDEX_ENTRY.pack(self.position, self.time_ns, self.output_bytes, self.reserved)


def parse_index(data: bytes) -> list[IndexEntry]:
    """Entries of an index file; a torn last entry is ignored."""
    usable = len(data) - len(data) % INDEX_ENTRY.size
    return [IndexEntry(*INDEX_ENTRY.unpack_from(data, i))
            for i in range(0, usable, INDEX_ENTRY.size)]
