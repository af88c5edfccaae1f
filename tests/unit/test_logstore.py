from __future__ import annotations

from pathlib import Path

import trio
import trio.lowlevel

from agent.logstore import LogStore

NASTY = b"\x1b[31mred\x1b[0m\r\n\rprogress 50%\r\xff\xfe\x00 invalid utf-8 and NUL\n"


def test_bytes_in_bytes_out(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    writer = store.open_writer(1)
    writer.append(NASTY)
    writer.append(NASTY)
    writer.close()
    assert store.path(1).read_bytes() == NASTY * 2
    assert store.read(1, len(NASTY)) == NASTY and store.size(1) == 2 * len(NASTY)
    assert not store.is_live(1)


def test_limit_keeps_the_beginning_and_says_so(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=10)
    writer = store.open_writer(1)
    writer.append(b"0123456789abcdef")
    writer.append(b"more")
    writer.close()
    data = store.path(1).read_bytes()
    assert data.startswith(b"0123456789\r\n[efci: log limit of 10 bytes reached")
    assert b"more" not in data


async def test_follower_gets_everything_until_close(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    writer = store.open_writer(1)
    received = bytearray()

    async def follow() -> None:
        async for _, data in store.follow(1, 0):
            received.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        for i in range(50):
            writer.append(NASTY + str(i).encode())
            await trio.lowlevel.checkpoint()
        writer.close()
    assert bytes(received) == store.path(1).read_bytes()


async def test_follow_of_a_finished_log_ends_and_resumes_from_an_offset(tmp_path: Path) -> None:
    store = LogStore(tmp_path, limit=1 << 20)
    writer = store.open_writer(1)
    writer.append(b"abcdef")
    writer.close()
    chunks = [chunk async for chunk in store.follow(1, 2)]
    assert chunks == [(2, b"cdef")]
