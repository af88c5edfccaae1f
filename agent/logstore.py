"""Run logs: bytes in, the same bytes out, followable while they grow.

Each run has one append-only file ``<log_dir>/<run id>.log`` holding the
exact bytes its container printed, never decoded.  Followers read from an
offset and wait for the writer's next append; a run with no open writer is
finished, so following it ends at its end of file.

Past ``limit`` bytes the writer stops storing output and appends one
truncation notice, so a runaway task cannot fill the disk; the task itself
keeps running.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import trio

READ_CHUNK = 1 << 16


class LogStore:
    def __init__(self, directory: Path, *, limit: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.limit = limit
        self._changed: dict[int, trio.Event] = {}  # run id -> set on next append/close

    def path(self, run_id: int) -> Path:
        return self.directory / f"{run_id}.log"

    def open_writer(self, run_id: int) -> LogWriter:
        self._changed[run_id] = trio.Event()
        return LogWriter(self, run_id)

    def is_live(self, run_id: int) -> bool:
        return run_id in self._changed

    def _notify(self, run_id: int, *, closed: bool = False) -> None:
        event = self._changed.pop(run_id, None)
        if event is not None:
            event.set()
        if not closed:
            self._changed[run_id] = trio.Event()

    def size(self, run_id: int) -> int:
        try:
            return self.path(run_id).stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, run_id: int, offset: int, limit: int = READ_CHUNK) -> bytes:
        try:
            with open(self.path(run_id), "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    async def follow(self, run_id: int, offset: int = 0,
                     *, live: bool = True) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` chunks from ``offset``; with ``live``, wait
        for more until the run's writer closes."""
        while True:
            changed = self._changed.get(run_id)  # taken before reading: no lost wakeup
            data = self.read(run_id, offset)
            if data:
                yield offset, data
                offset += len(data)
                continue
            if not live or changed is None:
                return
            await changed.wait()


class LogWriter:
    def __init__(self, store: LogStore, run_id: int) -> None:
        self._store = store
        self._run_id = run_id
        self._file = open(store.path(run_id), "ab")  # noqa: SIM115 - closed by close()
        self._written = self._file.tell()
        self._truncated = False

    def append(self, data: bytes | bytearray) -> None:
        if self._truncated or not data:
            return
        room = self._store.limit - self._written
        if len(data) > room:
            data = data[:room] + (
                f"\r\n[efci: log limit of {self._store.limit} bytes reached; "
                "further output is not stored]\r\n").encode()
            self._truncated = True
        self._file.write(data)
        self._file.flush()
        self._written += len(data)
        self._store._notify(self._run_id)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._store._notify(self._run_id, closed=True)
