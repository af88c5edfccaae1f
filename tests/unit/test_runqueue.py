"""The run queue: max_parallel at a time, strictly in queued order."""

from __future__ import annotations

import trio
import trio.testing

from agent.runqueue import RunQueue


def test_runs_start_in_the_order_they_were_queued_at_most_n_at_once() -> None:
    trio.run(_in_order, clock=trio.testing.MockClock(autojump_threshold=0))


async def _in_order() -> None:
    queue: RunQueue[int] = RunQueue(3)
    started: list[int] = []
    running = peak = 0

    async def run(n: int) -> None:
        nonlocal running, peak
        await queue.take(n)
        started.append(n)
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.01 * (n % 4))
        running -= 1
        queue.release()

    async with trio.open_nursery() as nursery:
        for n in range(40):  # one batch: trio may schedule them in any order
            queue.enqueue(n)
            nursery.start_soon(run, n)
        assert [queue.position(n) for n in (0, 5, 39)] == [1, 6, 40]
    assert started == list(range(40))
    assert peak == 3 and queue.busy == 0 and queue.waiting == []


def test_a_run_cancelled_while_queued_leaves_the_queue() -> None:
    trio.run(_cancelled)


async def _cancelled() -> None:
    queue: RunQueue[str] = RunQueue(1)
    order: list[str] = []
    gate = trio.Event()

    async def run(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            await queue.take(name)
            order.append(name)
            if name == "first":
                await gate.wait()
            queue.release()

    async with trio.open_nursery() as nursery:
        second = trio.CancelScope()
        for name in ("first", "second", "third"):
            queue.enqueue(name)
        nursery.start_soon(run, "first")
        nursery.start_soon(run, "second", second)
        nursery.start_soon(run, "third")
        await trio.testing.wait_all_tasks_blocked()
        assert queue.position("third") == 2
        second.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert queue.waiting == ["third"] and queue.position("second") is None
        gate.set()
    assert order == ["first", "third"]
