"""The seed's documents beside this checkout (../shared/seed), which some
tests compare against.  Missing, a test skips when run by hand and fails
under CI, where they are always there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SEED = Path(__file__).resolve().parents[2] / "shared/seed"


def seed_file(relative: str) -> Path:
    path = SEED / relative
    if not path.exists():
        message = f"{path} is missing: shared/seed is not beside this checkout"
        if os.environ.get("CI") or os.environ.get("EFCI_REQUIRE_INTEGRATION"):
            pytest.fail(message)
        pytest.skip(message)
    return path
