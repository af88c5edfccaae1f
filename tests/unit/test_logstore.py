"""The log store: framing, crash recovery, bounds, index, following."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from agent import logformat as fmt
from agent import logstore, ops, protocol, wire
from agent.logstore import LogStore, bounded, records_with_skip
from agent.model import Requester

NASTY = b"\x1b[31mred\x1b[0m\r\n\rprogress 50%\r\xff\xfe\x00 invalid utf-8 and NUL\n"


def output(store: LogStore, run_id: int) -> bytes:
    with store.reader(run_id) as reader:
        return b"".join(r.payload for r in reader.records_from(0) if r.kind is fmt.Kind.OUTPUT)


def test_bytes_in_bytes_out(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    w.message("run 1 started")
    w.output(NASTY)
    w.output(NASTY)
    w.event(fmt.Kind.RESIZE, {"cols": 80, "rows": 24}, stream=fmt.TASK_STREAM)
    w.close()
    assert output(store, 1) == NASTY * 2
    with store.reader(1) as reader:
        records = list(reader.records_from(0))
    kinds = [r.kind for r in records]
    assert kinds == [fmt.Kind.AGENT, fmt.Kind.OUTPUT, fmt.Kind.OUTPUT, fmt.Kind.RESIZE]
    times = [r.time_ns for r in records]
    assert times == sorted(times)
    assert not store.is_live(1) and store.end(1) == w.position


def test_segment_header_and_record_layout(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    w.output(b"abc")
    w.close()
    data = (tmp_path / "1/000000.seg").read_bytes()
    assert data[:8] == b"EFCILOG\x00" and fmt.parse_segment_header(data) == (0, 0)
    length, kind, stream, _, _, _ = fmt.RECORD_HEADER.unpack_from(data, 24)
    assert (length, kind, stream) == (3, fmt.Kind.OUTPUT, fmt.TASK_STREAM)
    assert data.endswith(b"abc")


def test_recovery_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "orig", limit=1 << 30)
    w = store.open_writer(1)
    w.output(b"first record\n")
    w.output(b"second record \xff\x00\n")
    last_start = w.position
    w.output(b"the last record, to be torn")
    w.close()
    seg = (tmp_path / "orig/1/000000.seg").read_bytes()
    index = (tmp_path / "orig/1/index").read_bytes()
    good = output(store, 1)[:-len(b"the last record, to be torn")]
    for cut in range(last_start, len(seg)):
        copy = LogStore(tmp_path / f"c{cut}", limit=1 << 30)
        (tmp_path / f"c{cut}/1").mkdir()
        (tmp_path / f"c{cut}/1/000000.seg").write_bytes(seg[:cut])
        (tmp_path / f"c{cut}/1/index").write_bytes(index)
        assert copy.recover(1) == cut - last_start
        assert output(copy, 1) == good, cut
        assert (tmp_path / f"c{cut}/1/000000.seg").read_bytes() == seg[:last_start]
        # and it can be appended to again
        w2 = copy.open_writer(1)
        w2.output(b"after")
        w2.close()
        assert output(copy, 1) == good + b"after"


def test_a_corrupted_tail_is_cut_not_believed(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    w.output(b"keep")
    w.output(b"flip")
    w.close()
    path = tmp_path / "1/000000.seg"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.recover(1) == fmt.RECORD_HEADER.size + 4
    assert output(store, 1) == b"keep"


def test_big_writes_are_split_and_roll_segments(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=64 << 20)  # segments of 8 MiB
    w = store.open_writer(1)
    line = bytes(range(256)) * (100 * 4096)  # 100 MiB, no newline
    w.output(line[: 30 << 20])
    w.close()
    assert len(list((tmp_path / "1").glob("*.seg"))) >= 4
    assert output(store, 1) == line[: 30 << 20]
    with store.reader(1) as reader:
        sizes = [len(r.payload) for r in reader.records_from(0) if r.kind is fmt.Kind.OUTPUT]
    assert sizes == [fmt.MAX_PAYLOAD] * 30  # split into records as big as the format allows


def test_past_the_limit_head_and_tail_are_kept_with_a_gap_record(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)  # 128 KiB segments, 8 kept
    w = store.open_writer(1)
    chunk = b"x" * 1000 + b"\n"
    for i in range(4000):  # ~4 MiB
        w.output(b"%06d" % i + chunk)
    w.output(b"THE END\n")
    w.close()
    total = sum(p.stat().st_size for p in (tmp_path / "1").glob("*.seg"))
    assert total <= (1 << 20) + store.segment_size
    with store.reader(1) as reader:
        records = list(reader.records_from(0))
    data = b"".join(r.payload for r in records if r.kind is fmt.Kind.OUTPUT)
    assert data.startswith(b"000000" + chunk) and data.endswith(b"THE END\n")
    gaps = [r.json() for r in records if r.kind is fmt.Kind.GAP]
    assert gaps and gaps[-1]["dropped_total"] > 2 << 20


def test_index_finds_a_time_and_the_last_lines(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10**18, 10**18 + 10**15, 10**8))  # 0.1 s per record
    monkeypatch.setattr("agent.logstore.time.time_ns", lambda: next(clock))
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    for i in range(5000):
        w.output(b"line %d\n" % i)
    w.output(b"partial")
    w.close()
    with store.reader(1) as reader:
        assert len(reader.index()) > 10
        pos, skip = reader.position_of_tail(3)
        tail = b"".join(r.payload for r in records_with_skip(reader.read(pos), skip))
        start = 10**18 + 2500 * 10**8
        first = reader.read(reader.position_at_time(start))[0]
    assert tail.startswith(b"line 4998\nline 4999\npartial")
    assert first.time_ns == start and first.payload == b"line 2500\n"


def test_reading_backwards_in_parts_gives_every_byte_once(tmp_path: Path) -> None:
    """The web viewer's "earlier lines": each part is the last lines before
    where the previous part began, to the byte, even inside one record."""
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    text = b"".join(b"line %d\n" % k for k in range(3000))
    for at in range(0, len(text), 37):  # records that hold some lines and split others
        w.output(text[at:at + 37])
    w.close()
    with store.reader(1) as reader:
        whole = b"".join(r.payload for r in reader.records_from(0)
                         if r.kind is fmt.Kind.OUTPUT)
        parts, until, until_skip = [], None, 0
        while True:
            pos, skip = reader.position_of_tail(100, until, until_skip)
            part = b"".join(r.payload for r in records_with_skip(
                list(bounded(reader.records_from(pos), until, until_skip)), skip)
                if r.kind is fmt.Kind.OUTPUT)
            parts.insert(0, part)
            if (pos, skip) == (until, until_skip) or (pos <= reader.start() and not skip):
                break
            until, until_skip = pos, skip
    assert whole == text and b"".join(parts) == text
    assert len(parts) == 30 and all(p.startswith(b"line ") for p in parts)


async def follow_into(store: LogStore, buf: bytearray) -> None:
    """A follower of run 1's log from its start, keeping its output."""
    async for batch in store.follow(1, 0, max_bytes=4096):
        buf.extend(b"".join(r.payload for r in batch if r.kind is fmt.Kind.OUTPUT))


async def test_followers_get_every_byte_until_close(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)  # small segments: rolls and drops
    w = store.open_writer(1)
    received: list[bytearray] = [bytearray() for _ in range(5)]

    async with trio.open_nursery() as nursery:
        for buf in received:
            nursery.start_soon(follow_into, store, buf)
        for i in range(300):
            w.output(NASTY + b"%d" % i)
            await trio.lowlevel.checkpoint()
        w.close()
    expected = b"".join(NASTY + b"%d" % i for i in range(300))
    assert all(bytes(buf) == expected for buf in received)


async def test_followers_at_the_live_end_read_each_append_once_between_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    reads = 0
    real = logstore.LogReader.read

    def counting(self: logstore.LogReader, position: int, max_bytes: int = 1 << 20) -> Any:
        nonlocal reads
        reads += 1
        return real(self, position, max_bytes)

    monkeypatch.setattr(logstore.LogReader, "read", counting)
    received: list[bytearray] = [bytearray() for _ in range(10)]

    async with trio.open_nursery() as nursery:
        for buf in received:
            nursery.start_soon(follow_into, store, buf)
        await trio.testing.wait_all_tasks_blocked()
        reads = 0
        for i in range(20):
            w.output(b"line %d\n" % i)
            await trio.testing.wait_all_tasks_blocked()
        w.close()
    assert all(bytes(buf) == b"".join(b"line %d\n" % i for i in range(20)) for buf in received)
    # Per line: one read of it for all ten (reading for itself, each would
    # read it too), and no look for more at the live end, which the writer
    # knows (that was another ten reads a line); a last look each after the
    # close.
    assert reads == 20 * 1 + 10


async def test_follow_of_a_finished_log_ends(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    w.output(b"abc")
    w.output(b"def")
    w.close()
    with store.reader(1) as reader:
        second = reader.read(0)[1].position
    batches = [b async for b in store.follow(1, second)]
    assert [r.payload for b in batches for r in b] == [b"def"]


async def test_output_alone_is_what_the_records_hold_whatever_the_batch_size(
        tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)  # 128 KiB segments: rolls and a dropped middle
    w = store.open_writer(1)
    checkout = w.stream("checkout:src")
    w.message("started")
    w.output(b"cloning\n", stream=checkout)
    w.output(b"x" * (300 << 10))  # split into records, each bigger than the smallest batch
    for i in range(3000):
        w.output(NASTY * 12 + b"%d" % i)
        if i % 500 == 0:
            w.message(f"at {i}")
            w.output(b"fetch %d\n" % i, stream=checkout)
    w.close()
    with store.reader(1) as reader:
        records = list(reader.records_from(0))
    assert any(r.kind is fmt.Kind.GAP for r in records)
    every = b"".join(r.payload for r in records if r.kind is fmt.Kind.OUTPUT)
    task, cloned = (b"".join(r.payload for r in records
                             if r.kind is fmt.Kind.OUTPUT and r.stream == stream)
                    for stream in (fmt.TASK_STREAM, checkout))
    assert cloned.startswith(b"cloning\nfetch 0\n") and cloned.endswith(b"fetch 2500\n")
    for max_bytes in (100, 4096, 1 << 20):
        for stream, expected in ((None, every), ("task", task), ("checkout:src", cloned),
                                 ("nothing", b"")):
            batches = [o async for o in store.follow_output(1, live=False, max_bytes=max_bytes,
                                                            stream=stream)]
            assert b"".join(o.data for o in batches) == expected, (max_bytes, stream)
            assert batches[-1].end == store.end(1)
    third = records[2]  # the first task output
    skipped = [o async for o in store.follow_output(1, third.position, live=False, skip=5,
                                                    stream="task")]
    assert b"".join(o.data for o in skipped) == task[5:]


async def test_output_followers_get_every_byte_until_close(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    received = bytearray()

    async def follow() -> None:
        async for output in store.follow_output(1, max_bytes=4096):
            received.extend(output.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        for i in range(300):
            w.output(NASTY + b"%d" % i)
            w.message("not output")
            await trio.lowlevel.checkpoint()
        w.close()
    assert bytes(received) == b"".join(NASTY + b"%d" % i for i in range(300))


async def test_sync_fsyncs_in_a_worker_thread_only_what_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, list[int]]] = []
    real = logstore._fsync_and_close

    def recording(fds: list[int]) -> None:
        synced.append((threading.current_thread().name, [os.fstat(fd).st_ino for fd in fds]))
        real(fds)

    monkeypatch.setattr(logstore, "_fsync_and_close", recording)
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    w.output(b"x")
    await w.sync()
    await w.sync()  # nothing new: no work
    assert len(synced) == 1 and synced[0][0] != threading.main_thread().name
    segment, index = (tmp_path / "1/000000.seg").stat(), (tmp_path / "1/index").stat()
    assert sorted(synced[0][1]) == sorted([segment.st_ino, index.st_ino])
    w.close()  # the last sync, at the end
    assert len(synced) == 2 and synced[1][0] == threading.main_thread().name


def test_streams_are_named_once(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    checkout = w.stream("checkout")
    assert w.stream("checkout") == checkout and checkout not in (0, 1)
    w.close()
    w2 = store.open_writer(1)
    assert w2.stream("checkout") == checkout and w2.stream("stage:b") == checkout + 1
    w2.close()


async def test_syncs_while_segments_roll_and_drop(tmp_path: Path) -> None:
    """The fsync thread must never touch a descriptor the writer closed."""
    fds_before = len(list(Path("/proc/self/fd").iterdir()))
    store = LogStore(tmp_path, limit=1 << 20)  # 128 KiB segments: many rolls and drops
    w = store.open_writer(1)

    async def syncer() -> None:
        for _ in range(200):
            await w.sync()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(syncer)
        for i in range(4000):
            w.output(b"%06d" % i + b"x" * 994)
            if i % 5 == 0:
                await trio.lowlevel.checkpoint()
    w.close()
    assert len(list(Path("/proc/self/fd").iterdir())) == fds_before
    with store.reader(1) as reader:
        data = b"".join(r.payload for r in reader.records_from(0) if r.kind is fmt.Kind.OUTPUT)
    assert data.startswith(b"000000") and data.endswith(b"003999" + b"x" * 994)


class FullDisk:
    """The os module as the log store sees it, on a disk with ``free``
    bytes left: a write past it is cut short, the next fails with ENOSPC
    (as a real full disk does; the integration tests use a real one)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, bytes(data[:self.free]))
        self.free -= written
        return written

    def writev(self, fd: int, pieces: list[bytes]) -> int:
        return self.write(fd, b"".join(pieces))

    def ftruncate(self, fd: int, size: int) -> None:
        self.free += os.fstat(fd).st_size - size
        os.ftruncate(fd, size)


def test_a_full_disk_loses_bytes_counted_and_never_tears_a_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    w.output(b"a" * 1000)
    disk = FullDisk(50_000)
    monkeypatch.setattr(logstore, "os", disk)
    for _ in range(100):  # 100 KB more, of which about half fits
        w.output(b"b" * 1000)
    w.message("still here")
    assert w.lost_bytes > 40_000 and "No space left on device" in w.lost_reason
    disk.free = 1 << 30
    w.output(b"c" * 1000)  # there is room again: the loss is told first
    w.close()
    monkeypatch.undo()
    with store.reader(1) as reader:
        records = list(reader.records_from(0))
    gaps = [r.json() for r in records if r.kind is fmt.Kind.GAP]
    # A gap record may fit where the next record does not: several may tell
    # of one loss, and together they tell of every byte lost.
    assert sum(g["lost_bytes"] for g in gaps) == w.lost_bytes == gaps[-1]["lost_total"]
    assert "could not be written before this point (No space left" in gaps[0]["message"]
    data = output(store, 1)
    assert data.startswith(b"a" * 1000 + b"b" * 1000) and data.endswith(b"c" * 1000)
    assert len(data) + w.lost_bytes == 102_000 + len("still here")  # every byte accounted
    assert w.output_bytes == len(data)
    assert store.recover(1) == 0  # nothing torn


def test_a_writer_on_a_full_disk_still_closes(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(2)
    monkeypatch.setattr(logstore, "os", FullDisk(0))
    w.output(b"x" * 1000)
    w.close()  # the gap record cannot be written either; close still ends the log
    assert not store.is_live(2) and w.lost_bytes == 1000


def test_what_the_log_holds_of_the_containers_last_start(tmp_path: Path) -> None:
    """For a re-attach: the output after the last task-start marker, its
    tail, and none at all when a gap makes the count uncertain; and the
    log's last status."""
    store = LogStore(tmp_path, limit=1 << 30)
    w = store.open_writer(1)
    w.event(fmt.Kind.STATUS, {"status": "running"})
    w.event(fmt.Kind.MARKER, {"step": "task", "event": "start"})
    w.output(b"first attempt\r\n")
    w.event(fmt.Kind.MARKER, {"step": "task", "event": "start"})  # a restart
    w.output(b"abc")
    w.message("an agent message is not task output")
    w.output(b"defg" * 2000)  # os.write, unbuffered: readable at once
    now = time.time_ns()
    count, tail, marker = store.output_since_start(1, now, tail=5)  # type: ignore[misc]
    assert (count, tail) == (3 + 8000, b"gdefg") and 0 < marker <= now
    assert store.last_status(1) == {"status": "running"}
    w.event(fmt.Kind.GAP, {"lost_bytes": 10})
    w.output(b"more")
    assert store.output_since_start(1, now) is None  # a gap: cannot say exactly
    w.event(fmt.Kind.STATUS, {"status": "failed", "exit_code": 2})
    w.close()
    assert store.last_status(1) == {"status": "failed", "exit_code": 2}
    assert store.last_status(2) is None


async def test_followers_that_asked_alike_share_one_frame_per_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.stream_log encodes a live append once for every follower whose
    request had the same id (efci's all ask with 1), and each its own for
    an id that differs, even one JSON tells apart and Python does not."""
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    encoded = 0
    real = protocol.records_event

    def counting(rid: Any, records: list[fmt.Record]) -> tuple[bytes, bytes]:
        nonlocal encoded
        encoded += 1
        return real(rid, records)

    monkeypatch.setattr(protocol, "records_event", counting)
    ids: list[Any] = [1, 1, 1, "1", True, 2]
    sent = [bytearray() for _ in ids]

    async with trio.open_nursery() as nursery:
        for rid, into in zip(ids, sent, strict=True):
            nursery.start_soon(stream_log_into, store, rid, into, "all")
        await trio.testing.wait_all_tasks_blocked()
        encoded = 0
        for i in range(20):
            w.output(b"line %d\n" % i)
            await trio.testing.wait_all_tasks_blocked()
        w.close()
    assert encoded == 20 * 4  # 1 (three followers), "1", True, 2
    for rid, data in zip(ids, sent, strict=True):
        messages = wire.FrameDecoder().feed(bytes(data))
        assert all((m["id"], type(m["id"])) == (rid, type(rid)) for m in messages)
        output = b"".join(bytes(m["payload"]) for m in messages if m["event"] == "records")
        assert output.endswith(b"".join(b"line %d\n" % i for i in range(20)))


async def stream_log_into(store: LogStore, rid: Any, into: bytearray, takes: str) -> None:
    """ops.stream_log of run 1 to a client whose socket takes ``takes`` of
    what is sent without waiting: "all", "none" or "part" (half a frame)."""
    async def send(data: bytes) -> None:
        into.extend(data)

    def send_nowait(line: bytes, payload: bytes) -> int:
        data = line + payload
        taken = {"all": len(data), "none": 0, "part": len(data) // 2}[takes]
        into.extend(data[:taken])
        return taken

    call = protocol.Call(rid, Requester(0, 0, 1), send, lambda: None,  # type: ignore[arg-type]
                         send_nowait=send_nowait)
    await ops.stream_log(SimpleNamespace(logs=store), call, 1, 0, 0,  # type: ignore[arg-type]
                         follow=True)


@pytest.mark.parametrize("takes", ["all", "none", "part"])
async def test_live_followers_get_every_record_once_however_much_their_socket_takes(
        tmp_path: Path, takes: str) -> None:
    """A follower at a live log's end is handed each append as it is
    written and sent it at once; what its socket does not take then (none
    of it, or part of a frame) goes out waiting, from where it stopped.
    Every record arrives once and in order, also across segment rolls and
    the GAP record of a dropped middle, which the writer does not hand over."""
    store = LogStore(tmp_path, limit=1 << 20)  # 128 KiB segments: rolls, then drops
    w = store.open_writer(1)
    lines = [b"%04d " % i + NASTY * 30 for i in range(900)]  # 1.4 MiB in all
    into = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream_log_into, store, 1, into, takes)
        await trio.testing.wait_all_tasks_blocked()
        for line in lines:
            w.output(line)
            await trio.testing.wait_all_tasks_blocked()
        w.close()
    records = [r for m in wire.FrameDecoder().feed(bytes(into)) if m["event"] == "records"
               for r in protocol.decode_records(m)]
    positions = [r.position for r in records]
    assert positions == sorted(set(positions))  # each once, in order
    assert b"".join(r.payload for r in records if r.kind is fmt.Kind.OUTPUT) == b"".join(lines)
    assert any(r.kind is fmt.Kind.GAP for r in records)


async def test_appends_are_handed_over_until_the_taker_declines_or_the_log_closes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    w = store.open_writer(1)
    taken: list[list[fmt.Record]] = []

    def take(records: logstore.Batch) -> bool:
        taken.append(list(records))
        return len(taken) < 2

    def fail(records: logstore.Batch) -> bool:
        raise RuntimeError("a follower's bug")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.hand_appends, 1, take)
        nursery.start_soon(store.hand_appends, 1, fail)
        await trio.testing.wait_all_tasks_blocked()
        w.output(b"one")
        w.message("two")
        w.output(b"three")  # neither takes it: both have ended
        assert not store.takes_appends(1)
    with store.reader(1) as reader:
        written = list(reader.records_from(0))
    assert [r for batch in taken for r in batch] == written[:2]
    assert "a follower failed to take an append" in caplog.text
    assert [r.payload for r in written] == [b"one", b"two", b"three"]  # the log went on

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.hand_appends, 1, take)
        await trio.testing.wait_all_tasks_blocked()
        w.close()  # ends it
    with trio.fail_after(1):
        await store.hand_appends(1, take)  # not live: returns at once
