"""Where a run's time went: its phases on the monotonic clock.

A run's task sets :data:`current` to the run's :class:`Timings`; code
anywhere below it marks a phase with ``with timings.phase("mount views"):``
and passes nothing around (tasks a run starts inherit the variable).  Code
running outside a run (efci shell, gc) measures into nothing.  A phase
inside another is kept as its part, so ``efci show`` can say that a
checkout's second went to the fetch.  The clock is CLOCK_MONOTONIC, which
a container shares with the host, so the checkout container's own report
of its steps lands on the same time line.  Cheap: two clock reads and a
list append per phase, no process, no I/O until the run's end is saved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # monotonic seconds
    seconds: float
    parent: str | None  # the phase it is part of


@dataclass
class Timings:
    origin: float = field(default_factory=time.monotonic)  # when the run was queued
    phases: list[Phase] = field(default_factory=list)

    def add(self, name: str, start: float, end: float) -> None:
        self.phases.append(Phase(name, start, max(0.0, end - start), _parent.get()))

    def last_end(self) -> float:
        """When its last phase ended (its origin before the first)."""
        return max((p.start + p.seconds for p in self.phases), default=self.origin)

    def to_wire(self) -> list[dict[str, Any]]:
        """Phases in the order they began, each with its start relative to
        the run's queueing and the phase it is part of."""
        return [{"phase": p.name, "start": round(p.start - self.origin, 6),
                 "seconds": round(p.seconds, 6), "within": p.parent}
                for p in sorted(self.phases, key=lambda p: (p.start, -p.seconds))]

    def to_json(self) -> str:
        return json.dumps(self.to_wire())


current: ContextVar[Timings | None] = ContextVar("timings", default=None)
_parent: ContextVar[str | None] = ContextVar("timings_parent", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Measure the block as the run's phase ``name`` (a part of the
    enclosing phase, if any); kept even if the block raises."""
    timings = current.get()
    began = time.monotonic()
    token = _parent.set(name)
    try:
        yield
    finally:
        _parent.reset(token)
        if timings is not None:
            timings.add(name, began, time.monotonic())


def add(name: str, start: float, end: float) -> None:
    """A phase measured by other means (the checkout container's own clock
    readings), as a part of the enclosing phase."""
    timings = current.get()
    if timings is not None:
        timings.add(name, start, end)


def since(name: str, start: float) -> None:
    """A phase from ``start`` until now."""
    add(name, start, time.monotonic())
