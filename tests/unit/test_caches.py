"""What the agent refuses a caches filesystem for, before any btrfs call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from agent import caches as cachesmod
from agent import config
from agent.host.mounts import MountEntry
from agent.state import StateStore


def make(tmp_path: Path) -> cachesmod.Caches:
    cfg = dataclasses.replace(config.defaults(config.Layout.under(tmp_path)),
                              caches_root=tmp_path / "caches")
    return cachesmod.Caches(cfg, StateStore(tmp_path / "s.db"))


def test_a_missing_caches_directory_says_how_to_make_one(tmp_path: Path) -> None:
    problem = trio.run(make(tmp_path)._problem, None)
    assert problem is not None and "is not a directory" in problem
    assert f"scripts/make-cache-fs 10G {tmp_path / 'caches'}" in problem


def test_docker_on_the_caches_filesystem_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "caches").mkdir()
    loop = MountEntry(Path("/"), frozenset(), "btrfs", "/dev/loop7")
    monkeypatch.setattr(cachesmod.mounts, "mount_of", lambda path: loop)
    problem = trio.run(make(tmp_path)._problem, Path("/var/lib/docker"))
    assert problem is not None and "Docker's data root /var/lib/docker" in problem


def test_another_filesystem_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "caches").mkdir()
    monkeypatch.setattr(cachesmod.mounts, "mount_of",
                        lambda path: MountEntry(Path("/"), frozenset(), "ext4", "/dev/vda1"))
    problem = trio.run(make(tmp_path)._problem, None)
    assert problem is not None and "is on ext4 filesystem, not btrfs" in problem


def test_a_symlink_is_not_the_caches_directory(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "caches").symlink_to(tmp_path / "elsewhere")
    problem = trio.run(make(tmp_path)._problem, None)
    assert problem is not None and "is not a directory" in problem
