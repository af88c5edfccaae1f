"""Run logs: append-only, binary-safe, followable, replayable by run id.

Each run's log is a directory ``<log_dir>/<run id>/`` of segment files
(``000000.seg``, ...; format in :mod:`agent.logformat`), an ``index`` of
fixed-size entries, and ``streams.json`` naming the stream ids.

Writing: one :class:`LogWriter` per run appends records with unbuffered
``os.write`` calls, so a killed agent loses nothing it had handed the
kernel; :meth:`LogWriter.sync` fsyncs (the agent calls it every second while
a run writes, and at the end).  After a crash, :meth:`LogStore.recover`
truncates a torn tail at the last whole record; nothing before it changes.

Bounds: past ``limit`` bytes the store keeps the first half of the limit's
segments and the most recent ones, dropping whole segments in between and
writing a GAP record that says how much went; the task keeps running and
memory stays flat (nothing is buffered beyond one record).

Reading: :class:`LogReader` walks records from any position, skipping the
gaps; the index lets it start at a time or at the last N lines without
reading the whole log.  Followers wait for the writer's next append.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from .logformat import (
    AGENT_STREAM,
    MAX_PAYLOAD,
    RECORD_HEADER,
    SEGMENT_HEADER,
    TASK_STREAM,
    IndexEntry,
    Kind,
    Record,
    encode_json,
    frames,
    iter_records,
    parse_index,
    parse_segment_header,
    record_header,
    segment_header,
    valid_end,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SEGMENT = 64 << 20
MIN_SEGMENT = 64 << 10
SYNC_INTERVAL = 1.0  # seconds between fsyncs of a live log
INDEX_EVERY_BYTES = 1 << 20  # an index entry per MiB of records
INDEX_EVERY_NS = 1_000_000_000  # and per second of writing
# How long before a container's start its task-start marker may be written
# (docker start is slow on a loaded host): where output_since_start looks.
MARKER_SLACK_NS = 600 * 1_000_000_000
CHUNK = MAX_PAYLOAD  # the largest payload one record holds: a bigger write is split


def segment_size_for(limit: int) -> int:
    """At least eight segments per limit, so head and tail keep useful parts."""
    return max(MIN_SEGMENT, min(MAX_SEGMENT, limit // 8))


@dataclass(frozen=True)
class Output:
    """What :meth:`LogReader.read_output` found: the output bytes of
    ``records`` whole records (any kind) read, and where to resume."""

    data: bytes
    records: int
    end: int


@dataclass(frozen=True)
class Segment:
    number: int
    start: int  # position of its first byte (the header)
    path: Path

    @property
    def first_record(self) -> int:
        return self.start + SEGMENT_HEADER.size


def _segment_path(run_dir: Path, number: int) -> Path:
    return run_dir / f"{number:06d}.seg"


def list_segments(run_dir: Path) -> list[Segment]:
    segments = []
    for path in sorted(run_dir.glob("*.seg")):
        with open(path, "rb") as f:
            number, start = parse_segment_header(f.read(SEGMENT_HEADER.size))
        segments.append(Segment(number, start, path))
    return segments


def _fsync_and_close(fds: list[int]) -> None:
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.rename(tmp, path)


def _append_whole(fd: int, data: bytes | Sequence[bytes | memoryview],
                  size_before: int) -> None:
    """Append all of ``data`` (bytes, or pieces written as one, without
    joining them) to an O_APPEND file, or nothing: what a short write (a
    full disk) got in is cut off again, so a record is never torn in the
    middle of a log that goes on."""
    pieces = [data] if isinstance(data, bytes) else data
    total, done = sum(len(piece) for piece in pieces), 0
    try:
        done = os.writev(fd, pieces)
        if done < total:  # rare: the rest, joined
            view = memoryview(b"".join(pieces))
            while done < total:
                n = os.write(fd, view[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
    except OSError:
        if done:
            os.ftruncate(fd, size_before)
        raise


class LogStore:
    def __init__(self, directory: Path, *, limit: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.limit = limit
        self.segment_size = segment_size_for(limit)
        self._writers: dict[int, LogWriter] = {}
        self._changed: dict[int, trio.Event] = {}  # set on a live log's next append
        # A live log's latest read that found records, (position, what kind of
        # read, what it found): the followers woken by one append read it
        # once between them.  A log only grows, so what was read at a
        # position stays true.
        self._last_read: dict[int, tuple[int, tuple[Any, ...], tuple[Any, int]]] = {}
        # Followers at a live log's end that take each append as it is
        # written (see hand_appends), by run.
        self._takers: dict[int, list[_Taker]] = {}

    def run_dir(self, run_id: int) -> Path:
        return self.directory / str(run_id)

    def open_writer(self, run_id: int) -> LogWriter:
        """The run's writer, appending after whatever the log already holds."""
        if run_id in self._writers:
            raise RuntimeError(f"log of run {run_id} already has a writer")
        writer = LogWriter(self, run_id)
        self._writers[run_id] = writer
        self._changed[run_id] = trio.Event()
        return writer

    async def sync_forever(self) -> None:
        """The fsync policy: every live log at least once a second (and each
        at its run's end, in LogWriter.close).  A failing disk is said once
        per log; the agent keeps going."""
        failing: set[int] = set()
        while True:
            await trio.sleep(SYNC_INTERVAL)
            for writer in self.live_writers():
                try:
                    await writer.sync()
                except OSError as e:
                    if writer.run_id not in failing:
                        log.error("run %d: could not fsync its log: %s", writer.run_id,
                                  e.strerror)
                    failing.add(writer.run_id)

    def is_live(self, run_id: int) -> bool:
        return run_id in self._writers

    def live_writers(self) -> list[LogWriter]:
        return list(self._writers.values())

    def _notify(self, run_id: int, records: list[Record] | None) -> None:
        event = self._changed.get(run_id)
        if event is not None:
            event.set()
            self._changed[run_id] = trio.Event()
        takers = self._takers.get(run_id)
        if takers and records:
            batch = Batch(records)
            for taker in list(takers):
                try:
                    taken = taker.take(batch)
                except Exception:  # a follower's fault must not stop the run's log
                    log.exception("run %d: a follower failed to take an append", run_id)
                    taken = False
                if not taken:
                    self._untake(run_id, taker)

    def _untake(self, run_id: int, taker: _Taker) -> None:
        takers = self._takers.get(run_id, [])
        if taker in takers:
            takers.remove(taker)
            if not takers:
                del self._takers[run_id]
        taker.done.set()

    def _closed(self, run_id: int) -> None:
        self._writers.pop(run_id, None)
        self._last_read.pop(run_id, None)
        event = self._changed.pop(run_id, None)
        if event is not None:
            event.set()
        for taker in self._takers.pop(run_id, []):
            taker.done.set()

    def takes_appends(self, run_id: int) -> bool:
        """Whether a follower takes this run's appends as they are written:
        then the writer hands them over as records."""
        return run_id in self._takers

    async def hand_appends(self, run_id: int, take: Callable[[Batch], bool]) -> None:
        """Give ``take`` each append to a live log, as records, in the
        writer's own call, until it returns False (it did not take that
        batch) or the log closes; returns at once if the log is not live.
        For followers at the live end: one append reaches them all in one
        loop, without waking a task or reading the files for each.  ``take``
        must neither block nor raise, and tells by the records' positions
        whether it missed anything (records the writer adds itself, a GAP or
        a new segment, are not handed over)."""
        if run_id not in self._writers:
            return
        taker = _Taker(take, trio.Event())
        self._takers.setdefault(run_id, []).append(taker)
        try:
            await taker.done.wait()
        finally:
            self._untake(run_id, taker)

    def start(self, run_id: int) -> int:
        """Where the first record kept of a run's log is (past any dropped part)."""
        with self.reader(run_id) as reader:
            return reader.start()

    def end(self, run_id: int) -> int:
        """The position just past the last record."""
        writer = self._writers.get(run_id)
        if writer is not None:
            return writer.position
        with self.reader(run_id) as reader:
            return reader.end()

    def streams(self, run_id: int) -> dict[str, int]:
        """Stream names and their ids in this run's log."""
        names = {"agent": AGENT_STREAM, "task": TASK_STREAM}
        path = self.run_dir(run_id) / "streams.json"
        if path.exists():
            names.update(json.loads(path.read_text()))
        return names

    def recover(self, run_id: int) -> int:
        """Truncate a torn tail left by a crash; returns the bytes cut off."""
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir() or run_id in self._writers:
            return 0
        return _recover(run_dir)

    def output_since_start(self, run_id: int, started_ns: int,
                           tail: int = 4096) -> tuple[int, bytes, int] | None:
        """The task output the log holds since the container's last start,
        which follows the last task-start marker (written just before the
        start): how many bytes, the last ``tail`` of them, and the marker's
        time, before any output of that start.  None when the log cannot say
        exactly: a gap (a dropped middle, a lost write) lies in that part, or
        the marker is not there."""
        with self.reader(run_id) as reader:
            entries = [e for e in reader.index() if e.time_ns <= started_ns - MARKER_SLACK_NS]
            count, last, marker = 0, bytearray(), None
            for record in reader.records_from(entries[-1].position if entries else 0):
                if record.kind is Kind.MARKER and json.loads(record.payload) == {
                        "step": "task", "event": "start"}:
                    count, last, marker = 0, bytearray(), record.time_ns
                elif record.kind is Kind.GAP:
                    marker = None  # uncertain until a later start marker
                elif record.kind is Kind.OUTPUT and record.stream == TASK_STREAM:
                    count += len(record.payload)
                    last += record.payload
                    del last[:-tail]
            return (count, bytes(last), marker) if marker is not None else None

    def last_status(self, run_id: int) -> dict[str, Any] | None:
        """The last status event of a run's log (a run's end is its log's
        last record), from the last index entry on: no whole-log read."""
        if not self.run_dir(run_id).is_dir():
            return None
        with self.reader(run_id) as reader:
            entries = reader.index()
            found = None
            for record in reader.records_from(entries[-1].position if entries else 0):
                if record.kind is Kind.STATUS:
                    found = json.loads(record.payload)
            return found

    def reader(self, run_id: int) -> LogReader:
        return LogReader(self.run_dir(run_id))

    async def follow(self, run_id: int, position: int = 0, *, live: bool = True,
                     max_bytes: int = 1 << 20, to_live_end: bool = False
                     ) -> AsyncIterator[Batch]:
        """Batches of records from ``position``; with ``live``, waits for
        more until the run's writer closes (with ``to_live_end``, ends on
        reaching the end of a live log instead: see hand_appends).  Reads go
        to the files, so a slow follower costs disk reads, never the agent's
        memory."""
        async def read(reader: LogReader, at: int) -> tuple[Batch, int] | None:
            records = Batch(reader.read(at, max_bytes))
            return (records, records[-1].end) if records else None

        async for records in self._follow(run_id, position, live, ("records", max_bytes), read,
                                          to_live_end):
            yield records

    async def follow_output(self, run_id: int, position: int = 0, *, live: bool = True,
                            max_bytes: int = 1 << 20, skip: int = 0,
                            stream: str | None = None) -> AsyncIterator[Output]:
        """Like :meth:`follow`, but each batch is the output bytes only, of
        the stream named ``stream`` (which may be named later) or of all;
        the first ``skip`` bytes of the record at ``position`` left out.
        Reads (and their checksums) run in a worker thread: a consumer that
        reads ahead (see ``ops.stream_output``) overlaps them with its sends."""
        async def read(reader: LogReader, at: int) -> tuple[Output, int] | None:
            nonlocal skip
            wanted = None if stream is None else self.streams(run_id).get(stream, -1)
            output = await trio.to_thread.run_sync(reader.read_output, at, max_bytes, wanted,
                                                   skip)
            skip = 0
            return (output, output.end) if output.records else None

        async for output in self._follow(run_id, position, live, None, read):
            yield output

    async def _follow(self, run_id: int, position: int, live: bool,
                      key: tuple[Any, ...] | None,
                      read: Callable[[LogReader, int], Awaitable[tuple[T, int] | None]],
                      to_live_end: bool = False) -> AsyncIterator[T]:
        """What ``read`` finds from ``position`` on, and where it ends; reads
        of the same ``key`` at the same position are shared (none if None)."""
        with self.reader(run_id) as reader:
            while True:
                changed = self._changed.get(run_id)  # taken before reading: no lost wakeup
                writer = self._writers.get(run_id)
                if live and changed is not None and writer is not None and \
                        position >= writer.position:
                    if to_live_end:
                        return
                    await changed.wait()  # at the live end: nothing to read before an append
                    continue
                last = self._last_read.get(run_id)
                found: tuple[T, int] | None
                if key is not None and last is not None and last[:2] == (position, key):
                    found = last[2]
                else:
                    found = await read(reader, position)
                    # live: the others woken with this one likely read the same
                    if key is not None and found and changed is not None:
                        self._last_read[run_id] = (position, key, found)
                if found:
                    yield found[0]
                    position = found[1]
                    await trio.lowlevel.checkpoint()
                    continue
                if not live or changed is None:
                    return
                await changed.wait()


def _recover(run_dir: Path) -> int:
    segments = list_segments(run_dir)
    if not segments:
        return 0
    last = segments[-1]
    data = last.path.read_bytes()
    end = valid_end(data, SEGMENT_HEADER.size)
    cut = len(data) - end
    if cut:
        with open(last.path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    index = run_dir / "index"
    if index.exists():
        log_end = last.start + end
        entries = [e for e in parse_index(index.read_bytes()) if e.position < log_end]
        _write_atomically(index, b"".join(e.pack() for e in entries))
    return cut


@dataclass
class _Taker:
    take: Callable[[Batch], bool]
    done: trio.Event  # set once it takes no more


class Batch(list[Record]):
    """Records read together, or one append handed over as it is written.
    The followers of a live log share one (see LogStore._follow and
    LogStore.hand_appends), and ``shared`` holds what they make of it
    alike, made once: the frame that sends it (ops.stream_log)."""

    __slots__ = ("shared",)

    def __init__(self, records: Iterable[Record]) -> None:
        super().__init__(records)
        self.shared: dict[Any, Any] = {}


class LogWriter:
    """Appends records to one run's log.  Not shared between tasks: each run
    has exactly one, opened by the run and closed at its end."""

    def __init__(self, store: LogStore, run_id: int) -> None:
        self.store = store
        self.run_id = run_id
        self.dir = store.run_dir(run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        _recover(self.dir)
        self.streams = store.streams(run_id)
        self._segments = list_segments(self.dir)
        self._index = os.open(self.dir / "index", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._dirty = False
        self._retired: list[int] = []  # finished segments, not yet fsynced
        self.lost_bytes = 0  # bytes that could not be written (a full disk)
        self.lost_reason = ""
        self._unnoted = 0  # lost bytes no GAP record tells of yet
        self._streams_saved = True
        self._last_time = 0
        entries = parse_index((self.dir / "index").read_bytes())
        self._last_entry = entries[-1] if entries else IndexEntry(0, 0, 0, 0)
        self.output_bytes = self._output_bytes(self._last_entry)
        if self._segments:
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self._segment_bytes = os.fstat(self._fd).st_size
            self.position = last.start + self._segment_bytes
        else:
            self._fd = -1
            self.position = 0
            self._open_segment(0, 0)

    def _output_bytes(self, entry: IndexEntry) -> int:
        """Output bytes up to the end, from an index entry on."""
        output = entry.output_bytes
        with LogReader(self.dir) as reader:
            for record in reader.records_from(entry.position):
                if record.kind is Kind.OUTPUT:
                    output += len(record.payload)
        return output

    # -- writing ---------------------------------------------------------------

    def _open_segment(self, number: int, start: int) -> None:
        """Start a segment file; on failure (a full disk) nothing changed."""
        segment = Segment(number, start, _segment_path(self.dir, number))
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _append_whole(fd, segment_header(number, start), 0)
        except OSError:
            os.close(fd)
            segment.path.unlink()
            raise
        if self._fd >= 0:  # the finished segment is fsynced and closed by the next sync
            self._retired.append(self._fd)
        self._fd = fd
        self._segments.append(segment)
        self._segment_bytes = SEGMENT_HEADER.size
        self.position = start + SEGMENT_HEADER.size

    def _roll(self) -> None:
        """Start the next segment, dropping middle ones past the limit."""
        current = self._segments[-1]
        self._open_segment(current.number + 1, self.position)
        keep = max(2, self.store.limit // self.store.segment_size)
        head = keep // 2
        dropped = 0
        while len(self._segments) > keep:
            victim = self._segments[head]
            nxt = self._segments[head + 1]
            dropped += nxt.start - victim.start
            victim.path.unlink()
            del self._segments[head]
        if dropped:
            # The holes between the segments left are everything dropped so far.
            total = sum(b.start - a.start - a.path.stat().st_size
                        for a, b in zip(self._segments, self._segments[1:], strict=False))
            self._write(encode_json(Kind.GAP, AGENT_STREAM, self._now(),
                                    {"dropped_bytes": dropped, "dropped_total": total,
                                     "message": f"{total} bytes of log were dropped before "
                                                f"this point to keep it within "
                                                f"{self.store.limit} bytes"}))

    def _now(self) -> int:
        self._last_time = max(time.time_ns(), self._last_time)  # never goes back
        return self._last_time

    def _write(self, *record: bytes | memoryview) -> None:
        """Append one whole record (in pieces: its header, its payload), or
        nothing (OSError: a full disk...)."""
        size = sum(len(piece) for piece in record)
        if self._segment_bytes + size > self.store.segment_size and \
                self._segment_bytes > SEGMENT_HEADER.size:
            self._roll()
        _append_whole(self._fd, record, self._segment_bytes)
        self._segment_bytes += size
        self.position += size
        self._dirty = True

    def _append(self, kind: Kind, stream: int, payload: bytes | bytearray | memoryview) -> None:
        """Append a payload as records.  A write that fails (a full or
        failing disk) never raises: the bytes are counted as lost, and the
        next append that can be written is preceded by a GAP record saying
        how many and why.  The run's end says so too (see ``lost_bytes``)."""
        view = memoryview(payload)
        written = 0
        # What a follower taking appends as they are written gets (hand_appends).
        records: list[Record] | None = [] if self.store.takes_appends(self.run_id) else None
        try:
            if self._unnoted:
                self._note_loss()
            now = self._now()
            if self.position - self._last_entry.position >= INDEX_EVERY_BYTES or \
                    now - self._last_entry.time_ns >= INDEX_EVERY_NS:
                self._add_index_entry(now)
            for start in range(0, max(len(view), 1), CHUNK):
                chunk = view[start:start + CHUNK]
                self._write(record_header(kind, stream, now, chunk), chunk)
                written = start + len(chunk)
                if records is not None:
                    records.append(Record(self.position - RECORD_HEADER.size - len(chunk), kind,
                                          stream, now, bytes(chunk)))
        except OSError as e:
            self._lose(len(view) - written, e)
        if kind is Kind.OUTPUT:
            self.output_bytes += written
        if written:
            self.store._notify(self.run_id, records)

    def _lose(self, size: int, error: OSError) -> None:
        if not self.lost_reason:
            self.lost_reason = f"{error.strerror or error} in {self.dir}"
            log.error("run %d: its log cannot be written (%s); counting what is lost",
                      self.run_id, self.lost_reason)
        self.lost_bytes += size
        self._unnoted += size

    def _note_loss(self) -> None:
        self._write(encode_json(Kind.GAP, AGENT_STREAM, self._now(), {
            "lost_bytes": self._unnoted, "lost_total": self.lost_bytes,
            "message": f"{self._unnoted} bytes of the run's log could not be written before "
                       f"this point ({self.lost_reason})"}))
        self._unnoted = 0

    def _add_index_entry(self, now: int) -> None:
        """An index entry for the record about to be written.  The index only
        speeds up look-ups, so one that cannot be written is left out."""
        if self._segment_bytes + 1 > self.store.segment_size:
            self._roll()  # the entry must point at the record about to be written
        entry = IndexEntry(self.position, now, self.output_bytes)
        try:
            _append_whole(self._index, entry.pack(), os.fstat(self._index).st_size)
        except OSError:
            return
        self._last_entry = entry

    def stream(self, name: str) -> int:
        """The id of a named stream (the checkout, a stage), defined once."""
        if name not in self.streams:
            if len(self.streams) >= 255:
                raise ValueError("too many streams in one log")
            self.streams[name] = max(self.streams.values()) + 1
            self._save_streams()
        return self.streams[name]

    def _save_streams(self) -> None:
        """Stream names for readers; kept in memory and saved again at close
        if the disk is full now."""
        try:
            _write_atomically(self.dir / "streams.json", json.dumps(self.streams).encode())
            self._streams_saved = True
        except OSError:
            self._streams_saved = False

    def output(self, data: bytes | bytearray, stream: int = TASK_STREAM) -> None:
        if data:
            self._append(Kind.OUTPUT, stream, data)

    def message(self, text: str) -> None:
        self._append(Kind.AGENT, AGENT_STREAM, text.encode())

    def event(self, kind: Kind, value: dict[str, Any], stream: int = AGENT_STREAM) -> None:
        self._append(kind, stream, json.dumps(value, separators=(",", ":")).encode())

    async def sync(self) -> None:
        """fsync what was written since the last sync, in a worker thread.

        The thread gets its own descriptors (duplicates, and the retired
        segments'), so the writer may roll to a new segment or close while
        it runs."""
        if self._fd < 0 or not (self._dirty or self._retired):
            return
        self._dirty = False
        retired, self._retired = self._retired, []
        owned = [*retired, os.dup(self._fd), os.dup(self._index)]
        await trio.to_thread.run_sync(_fsync_and_close, owned)

    def close(self) -> None:
        """Say what was lost if it can now, sync and close; idempotent, and
        never raises: the run's end must be recorded whatever the disk does."""
        if self._fd >= 0:
            if self._unnoted:
                with contextlib.suppress(OSError):
                    self._note_loss()
            if not self._streams_saved:
                self._save_streams()
            try:
                _fsync_and_close([*self._retired, self._fd, self._index])
            except OSError as e:
                log.error("run %d: could not fsync its log: %s", self.run_id, e.strerror)
            self._retired = []
            self._fd = -1
        self.store._closed(self.run_id)


class LogReader:
    """Reads records of one log from any position; keeps one file open."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self._segments: list[Segment] = []
        self._file: Any = None
        self._file_number = -1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._file_number = -1

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _refresh(self) -> None:
        self._segments = list_segments(self.dir) if self.dir.is_dir() else []

    def _open(self, seg: Segment) -> bool:
        if self._file_number != seg.number:
            self.close()
            try:
                self._file = open(seg.path, "rb")  # noqa: SIM115 - kept open across reads
            except FileNotFoundError:
                return False  # dropped to keep the log within its limit
            self._file_number = seg.number
        return True

    def read(self, position: int, max_bytes: int = 1 << 20) -> list[Record]:
        """Whole records from ``position`` (a record boundary, or a position
        in dropped space, which moves on to the next record there is), about
        ``max_bytes`` of them but at least one if there is one."""
        position, data = self._chunk(position, max_bytes)
        return list(iter_records(data, 0, position))

    def read_output(self, position: int, max_bytes: int, stream: int | None,
                    skip: int = 0) -> Output:
        """Like :meth:`read`, but only the OUTPUT payloads (of ``stream``, or
        of every stream), joined, the first ``skip`` bytes of the record at
        ``position`` left out: what ``efci logs --raw`` prints, without an
        object per record."""
        position, data = self._chunk(position, max_bytes)
        pieces, end, count = [], 0, 0
        for at, kind, of, _time, payload in frames(data, 0):
            if kind == Kind.OUTPUT and stream in (None, of):
                pieces.append(payload[skip:] if at == 0 else payload)
            end = at + RECORD_HEADER.size + len(payload)
            count += 1
        return Output(b"".join(pieces), count, position + end)

    def _chunk(self, position: int, max_bytes: int) -> tuple[int, bytes]:
        """The log's bytes from the record at ``position`` (moved past dropped
        space), about ``max_bytes`` of them, or all of the record there if it
        is longer: ``(its position, bytes)``; no bytes at the end, for now."""
        for _ in range(3):  # segments may roll or be dropped between two looks
            if not self._segments or position >= self._segments[-1].start:
                self._refresh()
            starts = [s.start for s in self._segments]
            i = max(bisect.bisect_right(starts, position) - 1, 0)
            while i < len(self._segments):
                seg = self._segments[i]
                if not self._open(seg):
                    break  # refresh and look again
                position = max(position, seg.first_record)
                offset = position - seg.start
                if offset < os.fstat(self._file.fileno()).st_size:
                    return position, self._read_at(offset, max_bytes)
                i += 1
                if i == len(self._segments):
                    return position, b""  # the end, for now
                position = self._segments[i].first_record
            else:
                return position, b""
        return position, b""

    def _read_at(self, offset: int, max_bytes: int) -> bytes:
        self._file.seek(offset)
        data: bytes = self._file.read(max_bytes)
        whole = RECORD_HEADER.size + int.from_bytes(data[:4], "little")
        if len(data) >= 4 and len(data) < whole <= RECORD_HEADER.size + MAX_PAYLOAD:
            # one record larger than max_bytes
            data += self._file.read(whole - len(data))
        return data

    def starts_record(self, position: int) -> bool:
        """Whether ``position`` is a record boundary (the end included) or
        in dropped space, i.e. a place a reader may start from."""
        return position >= self.end() or bool(self.read(position, 64 * 1024))

    def records_from(self, position: int) -> Any:
        """Every record from ``position`` to the current end (a generator)."""
        while records := self.read(position):
            yield from records
            position = records[-1].end

    # -- where to start ------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        path = self.dir / "index"
        return parse_index(path.read_bytes()) if path.exists() else []

    def position_at_time(self, time_ns: int) -> int:
        """The first record at or after ``time_ns``."""
        entries = [e for e in self.index() if e.time_ns <= time_ns]
        start = entries[-1].position if entries else 0
        for record in self.records_from(start):
            if record.time_ns >= time_ns:
                return record.position
        return self.end()

    def start(self) -> int:
        self._refresh()
        return self._segments[0].first_record if self._segments else 0

    def end(self) -> int:
        self._refresh()
        if not self._segments:
            return 0
        last = self._segments[-1]
        return last.start + last.path.stat().st_size

    def position_of_tail(self, lines: int, until: int | None = None,
                         until_skip: int = 0) -> tuple[int, int]:
        """(record position, bytes to skip in it) where the last ``lines``
        lines of output before ``until`` (default: the end; see
        :func:`bounded`) begin, scanning only from a late enough index entry."""
        entries = [e for e in self.index() if until is None or e.position <= until]
        for entry in reversed([IndexEntry(0, 0, 0, 0), *entries]):
            found = self._tail_from(entry, lines, until, until_skip)
            if found is not None:
                return found
        return 0, 0

    def _tail_from(self, entry: IndexEntry, lines: int, until: int | None,
                   until_skip: int) -> tuple[int, int] | None:
        # Newline positions after the entry: (record position, offset after it).
        marks: list[tuple[int, int]] = []
        last_byte = b"\n"
        for record in bounded(self.records_from(entry.position), until, until_skip):
            if record.kind is not Kind.OUTPUT or not record.payload:
                continue
            start = 0
            while (i := record.payload.find(b"\n", start)) >= 0:
                marks.append((record.position, i + 1))
                start = i + 1
            last_byte = record.payload[-1:]
        wanted = lines if last_byte == b"\n" else lines - 1  # newlines to keep after start
        if lines <= 0:
            return (self.end() if until is None else until), 0
        if len(marks) > wanted:
            return marks[len(marks) - wanted - 1]
        if entry.position == 0:
            return 0, 0
        return None


def bounded(records: Iterable[Record], until: int | None,
            until_skip: int = 0) -> Iterator[Record]:
    """``records`` up to byte ``until_skip`` of the record at ``until`` (the
    records before it whole, then that one's first bytes): where a part of
    the log that began there leaves off, to the byte."""
    for record in records:
        if until is not None and record.position >= until:
            if record.position == until and until_skip:
                yield Record(record.position, record.kind, record.stream, record.time_ns,
                             record.payload[:until_skip])
            return
        yield record


def records_with_skip(records: list[Record], skip: int) -> list[Record]:
    """``records`` with the first one's payload shortened by ``skip`` bytes."""
    if not skip or not records:
        return records
    first = records[0]
    trimmed = Record(first.position, first.kind, first.stream, first.time_ns,
                     first.payload[skip:])
    return [trimmed, *records[1:]]

