"""What a push starts: a Gitea push event matched to the tasks it concerns.

Pure: the web page verifies the webhook's signature and hands the agent the
fields below; the agent checks them again here (nothing from the network is
trusted twice removed) and finds the tasks.

A push concerns a task when
- one of the task's repositories *is* the pushed repository: their URLs,
  normalised to (host, path) — lower case, without the scheme, user, port,
  a leading '/' or a trailing '.git' — are equal (Gitea's ssh_url or
  clone_url against the entry's repo_url);
- and the task's ``on: push`` patterns match the ref: for a branch, a
  ``branches`` pattern and the entry's own revision (a push to main re-checks
  out the mutable entry that follows main); for a tag, a ``tags`` pattern,
  and the run checks out exactly the pushed commit (an immutable entry).
A ref deletion (``after`` all zeros) starts nothing.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass

from . import names
from .errors import RequestError
from .model import Repository, Task

SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
ZERO = re.compile(r"0{40}|0{64}")
DELIVERY = re.compile(r"[A-Za-z0-9-]{1,64}")
SCP_LIKE = re.compile(r"(?:[^@/]+@)?([^:/]+):(.+)")


@dataclass(frozen=True)
class Push:
    delivery: str  # X-Gitea-Delivery
    repository: str  # full_name, for messages
    urls: tuple[str, ...]  # ssh_url, clone_url
    ref: str
    before: str
    after: str
    pusher: str

    def to_wire(self) -> dict[str, object]:
        return {"kind": "push", "delivery": self.delivery, "repository": self.repository,
                "ref": self.ref, "before": self.before, "after": self.after,
                "pusher": self.pusher}


def checked(push: Push) -> Push:
    """``push`` if every field is what Gitea sends; RequestError says what is not."""
    if not DELIVERY.fullmatch(push.delivery):
        raise RequestError("push: the delivery id is not a UUID")
    for name, sha in (("before", push.before), ("after", push.after)):
        if not SHA.fullmatch(sha):
            raise RequestError(f"push: {name} is not a commit sha")
    kind, _, name = push.ref.removeprefix("refs/").partition("/")
    if not push.ref.startswith("refs/") or kind not in ("heads", "tags") or not name:
        raise RequestError(f"push: {push.ref[:80]!r} is not refs/heads/NAME or refs/tags/NAME")
    problem = names.ref_format_problem(push.ref)
    if problem:
        raise RequestError(f"push: the ref {push.ref[:80]!r} {problem}")
    if not push.urls or any(len(u) > 1024 for u in push.urls):
        raise RequestError("push: the repository has no usable URL")
    return push


def repo_key(url: str) -> tuple[str, str] | None:
    """(host, path) of a git URL, normalised; None if it is not one."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        host, path = parts.hostname or "", parts.path
    elif m := SCP_LIKE.fullmatch(url):
        host, path = m.group(1), m.group(2)
    else:
        return None
    path = path.strip("/").removesuffix(".git").lower()
    return (host.lower(), path) if host and path else None


def glob_match(pattern: str, name: str) -> bool:
    """``*`` matches within one path component, ``**`` across them."""
    regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part)
                    for part in re.split(r"(\*\*|\*)", pattern))
    return re.fullmatch(regex, name) is not None


def tasks_for(push: Push, tasks: list[Task]) -> list[Task]:
    """The tasks ``push`` starts, each as the run should check it out."""
    if ZERO.fullmatch(push.after):
        return []
    pushed = {k for k in map(repo_key, push.urls) if k}
    kind, _, name = push.ref.removeprefix("refs/").partition("/")
    started = []
    for task in tasks:
        trigger = task.on_push
        if trigger is None:
            continue
        ours = [r for r in task.repositories if repo_key(r.repo_url) in pushed]
        if kind == "heads":
            if any(r.mutable and r.revision == name for r in ours) and \
                    any(glob_match(p, name) for p in trigger.branches):
                started.append(task)
        elif ours and any(glob_match(p, name) for p in trigger.tags):
            started.append(dataclasses.replace(task, repositories=tuple(
                _at(r, push.after) if r in ours else r for r in task.repositories)))
    return started


def mounts_of(push: Push, task: Task) -> list[str]:
    """The task's worktrees (``/src/NAME``) that check the pushed repository out."""
    pushed = {k for k in map(repo_key, push.urls) if k}
    return [r.mount_name for r in task.repositories if repo_key(r.repo_url) in pushed]


def _at(repo: Repository, sha: str) -> Repository:
    """The entry pinned to ``sha``: an immutable checkout of exactly that commit."""
    entry = {**repo.entry, "revision": sha, "mutable": False}
    return dataclasses.replace(repo, revision=sha, mutable=False, entry=entry)
