"""The one place that runs host programs (cloud-init's subp habit).

Argument lists only, never a shell.  A failure raises
:class:`~agent.errors.CommandFailed`, whose message shows the command, its
exit status and its indented output.  Unit tests forbid this module (see
tests/unit/conftest.py), which keeps the unit/integration line honest.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import CommandFailed

log = logging.getLogger(__name__)


async def run(argv: Sequence[str], *, stdin: bytes = b"", check: bool = True,
              ) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion, capturing its output.

    On cancellation trio kills and reaps the child before re-raising, so a
    cancelled call leaves no process behind.
    """
    argv = list(argv)
    log.debug("run: %s", argv)
    try:
        result = await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                        capture_stderr=True, check=False)
    except FileNotFoundError as e:
        raise CommandFailed(argv, 127, b"", f"{argv[0]}: not found on PATH".encode()) from e
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
    return result


@asynccontextmanager
async def spawned(argv: Sequence[str], **options: Any) -> AsyncIterator[trio.Process]:
    """A child process for the block; on leaving it, also when cancelled,
    the child is killed if still running and always reaped (shielded)."""
    argv = list(argv)
    log.debug("spawn: %s", argv)
    try:
        process = await trio.lowlevel.open_process(argv, **options)
    except FileNotFoundError as e:
        raise CommandFailed(argv, 127, b"", f"{argv[0]}: not found on PATH".encode()) from e
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def stream(argv: Sequence[str], *, output: Callable[[bytes], object],
                 stdin: bytes = b"") -> int:
    """Run ``argv`` with ``stdin``, handing its output (stdout and stderr,
    interleaved as written) to ``output`` as it comes; its exit status."""
    async with spawned(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT) as process:
        assert process.stdin is not None and process.stdout is not None
        async with process.stdin:
            await process.stdin.send_all(stdin)
        while data := await process.stdout.receive_some(65536):
            output(bytes(data))
        return await process.wait()
