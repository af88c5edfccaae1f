"""The run queue: at most ``runs.max_parallel`` runs execute at once, and
the others start strictly in the order they were queued.

trio's own CapacityLimiter is fair among tasks already blocked on it, but
tasks started in one batch may reach it in any order (trio shuffles its run
queue on purpose); a run's place is taken here, synchronously, when it is
queued, so its position is known at once and never changes but forward.
The queue itself lives in memory; what makes it durable is the state store,
where every queued run keeps its status and launch arguments until it
starts (see Runs.recover).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class RunQueue(Generic[T]):
    def __init__(self, slots: int) -> None:
        """Items are told apart by identity (a run's record may equal another's)."""
        self.slots = slots
        self.busy = 0
        self.waiting: list[T] = []
        self._changed = trio.lowlevel.ParkingLot()

    def enqueue(self, item: T) -> None:
        self.waiting.append(item)

    def position(self, item: T) -> int | None:
        """1 for the next to start; None once it has started (or never queued)."""
        return next((i + 1 for i, x in enumerate(self.waiting) if x is item), None)

    async def take(self, item: T) -> None:
        """Wait for ``item``'s turn and a free slot, and take the slot (give
        it back with :meth:`release`).  Cancelled while waiting, the item
        leaves the queue."""
        try:
            while not (self.busy < self.slots and self.waiting[0] is item):
                await self._changed.park()
        except BaseException:
            self.waiting = [x for x in self.waiting if x is not item]
            self._changed.unpark_all()
            raise
        self.waiting.pop(0)
        self.busy += 1
        self._changed.unpark_all()  # the next one may have a free slot too

    def release(self) -> None:
        self.busy -= 1
        self._changed.unpark_all()
