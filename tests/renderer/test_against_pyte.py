"""The log viewer's terminal (agent/web/static/terminal.mjs) against pyte.

The corpus under tests/renderer/corpus/ is real output of real tools,
recorded through a PTY by scripts/record-terminal-corpus.  The final screen
the project's renderer draws must be the one pyte, a VT100 emulator, draws
for the same bytes.  The hand-written cases for each escape are node's own
tests (tests/renderer/*.test.mjs); they run here too, so one pytest run
covers both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyte
import pytest

RENDERER = Path(__file__).resolve().parent
CORPUS = RENDERER / "corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is needed for the renderer's tests: run scripts/setup-host")
    return found


def pyte_screen(data: bytes, cols: int, rows: int) -> list[str]:
    screen = pyte.Screen(cols, rows)
    screen.set_mode(pyte.modes.LNM)  # the viewer's line feed returns the carriage
    pyte.ByteStream(screen).feed(data)
    return [line.rstrip() for line in screen.display]


def our_screen(path: Path, cols: int, rows: int, chunk: int | None = None) -> list[str]:
    argv = [node(), str(RENDERER / "screen.mjs"), str(path), str(cols), str(rows)]
    out = subprocess.run([*argv, *([str(chunk)] if chunk else [])], check=True,
                         capture_output=True, timeout=60).stdout
    return [line.rstrip() for line in json.loads(out)]


# ESC ( 0 selects DEC special graphics (curses' boxes).  xterm, VTE and the
# Linux console draw them in UTF-8 mode and so does the viewer; pyte ignores
# the switch in UTF-8 mode (Markus Kuhn's advice), leaving the ASCII letters.
# For files that use it, the comparison maps the viewer's box characters
# back to those letters: every other character must be pyte's exactly.
DEC_GRAPHICS = dict(zip("◆▒°±┘┐┌└┼⎺⎻─⎼⎽├┤┴┬│≤≥π≠£·", "`afgjklmnopqrstuvwxyz{|}~", strict=True))


def test_the_corpus_is_there() -> None:
    assert len(INDEX["files"]) >= 7


@pytest.mark.parametrize("name", INDEX["files"])
def test_the_final_screen_is_pytes(name: str) -> None:
    path = CORPUS / f"{name}.bin"
    cols, rows = INDEX["cols"], INDEX["rows"]
    expected = pyte_screen(path.read_bytes(), cols, rows)
    assert any(expected), "a corpus file that draws nothing proves nothing"
    ours = our_screen(path, cols, rows)
    if b"\x1b(0" in path.read_bytes():
        ours = ["".join(DEC_GRAPHICS.get(c, c) for c in line) for line in ours]
    assert ours == expected


@pytest.mark.parametrize("name", INDEX["files"])
def test_slicing_the_bytes_changes_nothing(name: str) -> None:
    """Records split output anywhere, UTF-8 characters and escapes included."""
    path = CORPUS / f"{name}.bin"
    cols, rows = INDEX["cols"], INDEX["rows"]
    assert our_screen(path, cols, rows, chunk=3) == our_screen(path, cols, rows)


def test_node_suite() -> None:
    tests = sorted(str(p) for p in RENDERER.glob("*.test.mjs"))
    assert tests
    done = subprocess.run([node(), "--test", *tests], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
