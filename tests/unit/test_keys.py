"""The secrets store accepts only files the agent itself made: no symlink,
the agent's own user, a private key readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.keys import KeyRefused, KeyStore


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    keys = KeyStore(tmp_path / "secrets")
    keys._dirs("alice")
    private = keys.private_path("alice", "deploy")
    private.write_text("KEY\n")
    private.chmod(0o600)
    return keys


def test_a_key_the_agent_made_is_accepted(store: KeyStore) -> None:
    private = store.private_path("alice", "deploy")
    assert store.checked(private, private=True) == private


def test_a_symlinked_private_key_is_refused(store: KeyStore, tmp_path: Path) -> None:
    private = store.private_path("alice", "deploy")
    private.unlink()
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:20228::::::\n")
    shadow.chmod(0o600)
    private.symlink_to(shadow)
    with pytest.raises(KeyRefused, match="through a symlink"):
        store.checked(private, private=True)


def test_a_symlinked_directory_on_the_way_is_refused(store: KeyStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    os.rename(store.owner_dir("alice") / "private", elsewhere)
    (store.owner_dir("alice") / "private").symlink_to(elsewhere)
    with pytest.raises(KeyRefused, match="through a symlink"):
        store.checked(store.private_path("alice", "deploy"), private=True)


def test_a_private_key_others_can_read_is_refused(store: KeyStore) -> None:
    private = store.private_path("alice", "deploy")
    private.chmod(0o640)
    with pytest.raises(KeyRefused, match="mode 0640"):
        store.checked(private, private=True)


def test_a_key_of_another_user_is_refused(store: KeyStore) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    private = store.private_path("alice", "deploy")
    os.chown(private, 65534, 65534)
    with pytest.raises(KeyRefused, match="uid 65534"):
        store.checked(private, private=True)


def test_a_symlinked_known_hosts_is_neither_followed_nor_created_through(
        store: KeyStore, tmp_path: Path) -> None:
    target = tmp_path / "planted"
    (store.owner_dir("alice") / "known_hosts").symlink_to(target)
    path = store.known_hosts("alice")
    assert not target.exists()
    with pytest.raises(KeyRefused, match="through a symlink"):
        store.checked(path, private=False)
