"""A subprocess attached to a host pseudo-terminal, read as a Trio stream.

The task container has its own TTY (``docker create --tty``); the docker
client that attaches to it writes the container's terminal output to our
PTY.  Our side is set to raw mode, so it adds nothing (no second CR before
each LF) and changes no byte: the log holds exactly what the container's
terminal produced.  The window size set here is what the docker client
passes on to the container's TTY, so programs inside see those columns.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import termios
import tty
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from . import command


def set_window_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyProcess:
    """Read the child's terminal output with :meth:`receive_some`; ``b""``
    means the child and everything holding the terminal are gone."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream,
                 master_fd: int) -> None:
        self.process = process
        self._master = master
        self._master_fd = master_fd

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """What the terminal has now, up to ``max_bytes``, waiting for it if
        there is none.  A PTY hands out about 4 KiB per read, so one call
        takes all that is there in several reads: fewer, larger log records,
        without waiting any longer.  Each call yields to the event loop once:
        after reading what a busy terminal (a task printing fast) already
        holds, or else while waiting for more."""
        await trio.lowlevel.checkpoint_if_cancelled()
        data = self._take(max_bytes)
        if data is not None:
            # What was read must reach the caller: a yield, never a cancel.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(self._master_fd)
            data = self._take(max_bytes)
            if data is not None:
                return data

    def _take(self, max_bytes: int) -> bytes | None:
        """What the non-blocking master has now (b"" at the end), or None."""
        chunks: list[bytes] = []
        size, ended = 0, False
        while size < max_bytes:
            try:
                more = os.read(self._master_fd, max_bytes - size)
            except BlockingIOError:
                break
            except OSError as e:
                # Linux answers EIO once the last slave descriptor is closed.
                if e.errno != errno.EIO:
                    raise
                more = b""
            if not more:
                ended = True  # said by the next call if this one has data
                break
            chunks.append(more)
            size += len(more)
        if not chunks:
            return b"" if ended else None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one copy at most

    async def send_all(self, data: bytes) -> None:
        """Type into the terminal (an interactive child's input)."""
        await self._master.send_all(data)

    def resize(self, cols: int, rows: int) -> None:
        set_window_size(self._master_fd, cols, rows)

    async def wait(self) -> int:
        return await self.process.wait()


@asynccontextmanager
async def open_pty_process(argv: Sequence[str], *, cols: int, rows: int,
                           interactive: bool = False) -> AsyncIterator[PtyProcess]:
    """Start ``argv`` with stdout and stderr (and with ``interactive`` its
    stdin) on a new raw PTY of the given size; on exit (also when cancelled)
    the child is killed and reaped."""
    master_fd, slave_fd = os.openpty()
    master = trio.lowlevel.FdStream(master_fd)  # takes ownership of master_fd
    try:
        tty.setraw(slave_fd)
        set_window_size(slave_fd, cols, rows)
        async with command.spawned(argv, stdin=slave_fd if interactive else subprocess.DEVNULL,
                                   stdout=slave_fd, stderr=slave_fd) as process:
            os.close(slave_fd)  # the child holds its own copies
            slave_fd = -1
            yield PtyProcess(process, master, master_fd)
    finally:
        if slave_fd >= 0:
            os.close(slave_fd)
        with trio.CancelScope(shield=True):
            await master.aclose()
