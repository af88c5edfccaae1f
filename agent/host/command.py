"""The one place that runs host programs (cloud-init's subp habit).

Argument lists only, never a shell.  A failure raises
:class:`~agent.errors.CommandFailed`, whose message shows the command, its
exit status and its indented output.  Unit tests forbid this module (see
tests/unit/conftest.py), which keeps the unit/integration line honest.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

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
