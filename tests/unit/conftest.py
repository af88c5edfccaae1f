"""Unit tests may not run host programs: the boundary with the integration
tests is enforced here, as cloud-init's disable_subp_usage does."""

from __future__ import annotations

import subprocess

import pytest
import trio


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"unit tests must not run programs: {args!r}")


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", _refuse)
    monkeypatch.setattr(trio, "run_process", _refuse)
    monkeypatch.setattr(trio.lowlevel, "open_process", _refuse)
