"""The shared documents beside this checkout (../shared: the seed, Gitea's
API description), which some tests compare or validate against.  Missing,
a test skips when run by hand and fails under CI, where they are always
there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def seed_file(relative: str) -> Path:
    return shared_file(f"seed/{relative}")


def shared_file(relative: str) -> Path:
    """A file of ../shared (the seed, Gitea's API description)."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} is missing: shared/ is not beside this checkout"
        if os.environ.get("CI") or os.environ.get("EFCI_REQUIRE_INTEGRATION"):
            pytest.fail(message)
        pytest.skip(message)
    return path
