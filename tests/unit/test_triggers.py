"""Which tasks a Gitea push starts, and what is refused before that."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import declarations, triggers
from agent.errors import RequestError
from agent.triggers import Push, glob_match, repo_key

SHA_A, SHA_B, ZERO = "a" * 40, "b" * 40, "0" * 40


def tasks(tmp_path: Path, text: str) -> dict:  # type: ignore[type-arg]
    (tmp_path / "t.yml").write_text(text)
    parsed = declarations.parse_all(tmp_path, default_owner="alice", secrets_base=tmp_path)
    decls = declarations.assemble(parsed, existing_images={"efci/base:bookworm"}, previous=None)
    if decls.errors:
        raise AssertionError(decls.errors)
    return decls.tasks


DECL = """
tasks:
  site:
    image: efci/base:bookworm
    on: {push: {branches: [main, "release/*"], tags: ["v*"]}}
    checkout:
      repositories:
        - {repo_url: "ssh://git@gitea.local:2222/Alice/Site.git", revision: main,
           mutable: true, key: deploy}
  other:
    image: efci/base:bookworm
    checkout:
      repositories:
        - {repo_url: "ssh://git@gitea.local:2222/alice/site.git", revision: main,
           mutable: true, key: deploy}
"""


def push(ref: str, after: str = SHA_B, url: str = "git@gitea.local:alice/site.git") -> Push:
    return triggers.checked(Push("5d8e-41aa", "alice/site", (url,), ref, SHA_A, after, "bob"))


def test_url_rule() -> None:
    key = ("gitea.local", "alice/site")
    for url in ("ssh://git@gitea.local:2222/alice/site.git", "git@GITEA.local:Alice/Site",
                "https://gitea.local/alice/site.git/", "http://user@gitea.local:3000/alice/site"):
        assert repo_key(url) == key, url
    assert repo_key("ssh://gitea.local/other/site.git") != key
    assert repo_key("not a url") is None


def test_globs() -> None:
    assert glob_match("release/*", "release/1.0") and not glob_match("release/*", "release/1/x")
    assert glob_match("release/**", "release/1/x") and glob_match("v*", "v1.2.3")
    assert not glob_match("main", "mainline") and not glob_match("v*", "xv1")


def test_a_branch_push_starts_the_tasks_that_follow_that_branch(tmp_path: Path) -> None:
    found = list(tasks(tmp_path, DECL).values())
    assert [t.name for t in triggers.tasks_for(push("refs/heads/main"), found)] == ["site"]
    assert triggers.tasks_for(push("refs/heads/feature"), found) == []  # not watched
    assert triggers.tasks_for(push("refs/heads/release/1.0"), found) == []  # entry follows main
    assert triggers.tasks_for(push("refs/heads/main", after=ZERO), found) == []  # deletion
    unknown = push("refs/heads/main", url="git@gitea.local:alice/elsewhere.git")
    assert triggers.tasks_for(unknown, found) == []


def test_a_tag_push_checks_out_exactly_that_commit(tmp_path: Path) -> None:
    found = list(tasks(tmp_path, DECL).values())
    (task,) = triggers.tasks_for(push("refs/tags/v1.0"), found)
    (repo,) = task.repositories
    assert (repo.revision, repo.mutable, repo.entry["revision"]) == (SHA_B, False, SHA_B)
    assert triggers.tasks_for(push("refs/tags/nightly"), found) == []


@pytest.mark.parametrize("ref", ["refs/heads/a..b", "refs/heads/x\x07", "refs/heads/",
                                 "refs/notes/x", "main", "refs/heads/a b"])
def test_bad_refs_are_refused(ref: str) -> None:
    with pytest.raises(RequestError):
        push(ref)


def test_bad_shas_and_deliveries_are_refused() -> None:
    with pytest.raises(RequestError, match="after"):
        triggers.checked(Push("d", "r", ("u",), "refs/heads/main", SHA_A, "HEAD", "p"))
    with pytest.raises(RequestError, match="delivery"):
        triggers.checked(Push("../x", "r", ("u",), "refs/heads/main", SHA_A, SHA_B, "p"))


def test_on_is_validated(tmp_path: Path) -> None:
    bad = DECL.replace('branches: [main, "release/*"]', 'branches: ["a..b"]')
    (tmp_path / "t.yml").write_text(bad)
    parsed = declarations.parse_all(tmp_path, default_owner="alice", secrets_base=tmp_path)
    errors = declarations.assemble(parsed, existing_images={"efci/base:bookworm"},
                                   previous=None).errors
    assert any("on.push.branches[0]" in e and "'..'" in e for e in errors.values()), errors


def test_a_repository_is_giteas_when_its_host_is_one_of_giteas_names() -> None:
    from agent.gitea import repository_on
    hosts = frozenset({"gitea.example.org", "git.example.org"})
    assert repository_on("git@git.example.org:Alice/Site.git", hosts) == "alice/site"
    assert repository_on("ssh://git@gitea.example.org:2222/alice/site", hosts) == "alice/site"
    assert repository_on("git@github.com:alice/site.git", hosts) is None
    assert repository_on("https://gitea.example.org/sub/alice/site.git", hosts) == "alice/site"
    assert repository_on("ssh://git@git.example.org/site.git", hosts) is None
    assert repository_on("git@git.example.org:alice/site.git", frozenset()) is None
