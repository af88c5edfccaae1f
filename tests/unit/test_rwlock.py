"""The base worktree lock: many uses at once, a checkout alone."""

from __future__ import annotations

import trio
import trio.testing

from agent.checkout import ReadWriteLock


async def _readers_and_a_writer() -> None:
    lock = ReadWriteLock()
    events: list[str] = []

    async def reader(name: str, hold: float) -> None:
        await lock.acquire_read()
        events.append(f"{name} in")
        await trio.sleep(hold)
        events.append(f"{name} out")
        lock.release_read()

    async def writer() -> None:
        await trio.sleep(0.1)  # after both readers are in
        await lock.acquire_write()
        events.append("writer in")
        await trio.sleep(1)
        events.append("writer downgrades")
        lock.downgrade()  # its checkout becomes a use
        await trio.sleep(1)
        lock.release_read()

    async def late_reader() -> None:
        await trio.sleep(2.5)  # the writer holds the lock now
        await reader("late", 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "a", 1)
        nursery.start_soon(reader, "b", 2)
        nursery.start_soon(writer)
        nursery.start_soon(late_reader)
    assert set(events[:2]) == {"a in", "b in"}  # together, in either order
    assert events[2:] == ["a out", "b out", "writer in", "writer downgrades", "late in",
                          "late out"]


def test_readers_share_and_a_writer_waits_for_them() -> None:
    trio.run(_readers_and_a_writer, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_writer_excludes_another_writer() -> None:
    lock = ReadWriteLock()
    order: list[int] = []

    async def writer(n: int) -> None:
        await lock.acquire_write()
        order.append(n)
        await trio.sleep(0.01)
        order.append(n)
        lock.release_write()

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(writer, n)
    assert all(order[i] == order[i + 1] for i in range(0, len(order), 2))


def test_a_release_in_a_teardown_past_its_deadline_still_releases() -> None:
    """The bug: release was async, awaited in a finally under a teardown's
    deadline; a `docker stop` past that deadline made the release raise
    Cancelled, the use stayed held, and every later checkout waited for ever."""

    async def main() -> None:
        lock = ReadWriteLock()
        await lock.acquire_read()
        with trio.move_on_after(1) as teardown:
            teardown.shield = True
            try:
                await trio.sleep(5)  # docker stop, past the deadline
            finally:
                lock.release_read()
        assert teardown.cancelled_caught
        with trio.fail_after(1):
            async with lock.write():
                pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_cancelled_wait_takes_nothing() -> None:
    async def main() -> None:
        lock = ReadWriteLock()
        async with lock.read():
            with trio.move_on_after(1):
                await lock.acquire_write()  # waits for the reader, then gives up
        with trio.fail_after(1):
            async with lock.write():
                pass

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
