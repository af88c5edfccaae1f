"""The service unit leaves a graceful stop the time the agent's drain takes."""

from __future__ import annotations

import re
from pathlib import Path

from agent import config, daemon, runs

UNIT = Path(__file__).parents[2] / "debian/efforting-ci.service"


def test_timeout_stop_sec_covers_the_drain_and_the_teardown() -> None:
    cfg = config.defaults(config.Layout.under(Path("/x")))
    found = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert found, "the unit sets TimeoutStopSec"
    needed = cfg.drain + cfg.stop_grace + runs.TEARDOWN_SLACK + daemon.SHUTDOWN_GRACE
    assert int(found.group(1)) >= needed
