"""Worktree volume names, ssh URLs and the checkout container's arguments."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from agent.host.git import (
    checkout_container,
    checkout_steps,
    ssh_host,
    volume_labels,
    worktree_volume_name,
)
from agent.model import Repository

from ..seed import seed_file

# Computed with node from worktree_volume_name in the seed's index.mjs.
VECTORS = [
    ("mikael-lovqvist",
     {"repo_url": "git@git.efforting.tech:mikael-lovqvist/websperiments.git",
      "revision": "main", "mutable": True, "key": "websperiments-deploy", "submodules": False},
     "ci-worktree-7d2d097976ef41dd031cd724"),
    ("mikael-lövqvist",
     {"repo_url": "git@git.efforting.tech:mikael/sité.git", "revision": "grüße/ünïcödé",
      "mutable": True, "key": "k", "submodules": False, "name": "日本語"},
     "ci-worktree-c16857b506fac26706f817f0"),
    ("o",
     {"repo_url": 'ssh://git@h:2222/a "quoted" \\ back\u0001.git',
      "revision": "0123456789abcdef0123456789abcdef01234567", "mutable": False, "key": "k",
      "submodules": True},
     "ci-worktree-c9a7dc35335ce4a1d199255d"),
    ("o", {"revision": "x", "repo_url": "u", "key": "k", "emoji": "😀\u2028", "mutable": True},
     "ci-worktree-ffa50cbc61c7517b27ff7612"),
]


@pytest.mark.parametrize(("owner", "entry", "name"), VECTORS)
def test_volume_names_match_the_experiment(owner: str, entry: dict[str, object],
                                           name: str) -> None:
    assert worktree_volume_name(owner, entry) == name
    assert worktree_volume_name(owner, dict(reversed(entry.items()))) == name  # key order


@pytest.mark.parametrize(("url", "host"), [
    ("git@git.efforting.tech:mikael-lovqvist/websperiments.git", ("git.efforting.tech", 22)),
    ("ssh://git@127.0.0.1:2222/srv/a.git", ("127.0.0.1", 2222)),
    ("ssh://[::1]:2200/a.git", ("::1", 2200)),
    ("example.org:repo.git", ("example.org", 22)),
    ("https://example.org/a.git", None),
    ("ext::sh -c touch% /tmp/x", None),
    ("/srv/a.git", None),
])
def test_ssh_host(url: str, host: tuple[str, int] | None) -> None:
    assert ssh_host(url) == host


REPO = Repository(repo_url="ssh://git@h:2222/a.git", revision="main", mutable=True, key="k",
                  submodules=True, mount_name="a", entry={})


def test_checkout_container_gets_the_key_read_only_and_little_else() -> None:
    c = checkout_container(name="efci-x-1-checkout-0", image="efci/checkout:1",
                           volume="ci-worktree-1",
                           key=Path("/srv/ci-secrets/git-ssh/o/private/k"),
                           known_hosts=Path("/srv/ci-secrets/git-ssh/o/known_hosts"),
                           network="host", unchecked_host_keys=False,
                           labels={"instance": "x"}, repo=REPO)
    assert [(m.kind, m.source, m.target, m.readonly) for m in c.mounts] == [
        ("volume", "ci-worktree-1", "/worktree", False),
        ("bind", "/srv/ci-secrets/git-ssh/o/private/k", "/efci/key", True),
        ("bind", "/srv/ci-secrets/git-ssh/o/known_hosts", "/efci/known_hosts", True)]
    assert (c.cap_drop, c.cap_add, c.network) == (("ALL",), ("DAC_OVERRIDE",), "host")
    assert c.args == ("--url", REPO.repo_url, "--revision", "main", "--submodules")
    sha = checkout_container(name="n", image="i", volume="v", key=Path("/k"),
                             known_hosts=Path("/h"), network="efci", labels={},
                             unchecked_host_keys=True,
                             repo=dataclasses.replace(REPO, revision="a" * 40, submodules=False))
    assert sha.args[-2:] == ("--sha", "--unchecked-host-keys")


def test_labels_are_the_experiments() -> None:
    """The labels index.mjs puts on a worktree volume, each with the value of
    the entry field it names, so volumes either made are read alike."""
    source = seed_file("experiments/01-rsync-publish/index.mjs").read_text()
    theirs = dict(re.findall(r"'--label', `(ci\.[a-z_]+)=\$\{(\w+)\}`", source))
    assert theirs, "index.mjs sets labels"
    entry = {"owner": "o", "repo_url": REPO.repo_url, "revision": REPO.revision,
             "mutable": "true"}  # JavaScript's `${true}`
    assert volume_labels("o", REPO) == {label: entry[field] for label, field in theirs.items()}


def test_checkout_steps_are_read_from_the_last_steps_line() -> None:
    out = (b"$ git fetch\r\nefci-checkout: steps begin=1.5 fetch=2.25\r\n"
           b"efci-checkout: steps begin=10.000001 fetch=11.5 mtimes=12.75\r\n"
           b"efci-checkout: HEAD " + b"a" * 40 + b"\r\n")
    assert checkout_steps(out) == [("begin", 10.000001), ("fetch", 11.5), ("mtimes", 12.75)]
    assert checkout_steps(b"efci-checkout: HEAD " + b"a" * 40) == []
