"""The engine contract, against the fake engine (the integration tests run
the same against the docker CLI)."""

from __future__ import annotations

from pathlib import Path

import trio

from ..engine_contract import PRINT_AND_EXIT, PRINT_PAUSE_PRINT, SAY_AND_FAIL, SLEEP, check_engine
from ..fake_engine import FakeEngine, FakeTerminal, prints, sleeps


async def test_the_fake_engine_keeps_the_contract(tmp_path: Path) -> None:
    async def say_and_fail(terminal: FakeTerminal) -> int:
        await terminal.write(b"said\n")
        return 2

    async def print_pause_print(terminal: FakeTerminal) -> int:
        await terminal.write(b"\xff\xfe\x00 before, ")
        await trio.sleep(2)
        await terminal.write(b"after")
        return 4

    engine = FakeEngine(tmp_path, programs={PRINT_AND_EXIT: prints(b"hi there", 3),
                                            SAY_AND_FAIL: say_and_fail, SLEEP: sleeps(),
                                            PRINT_PAUSE_PRINT: print_pause_print})
    await check_engine(engine, "efci/base:bookworm")
