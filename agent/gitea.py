"""Gitea's API, as the agent uses it: commit statuses sent from an outbox,
literal shas checked before their first checkout, deploy keys registered,
and what ``efci gitea check`` asks.

A status to send is written to the state store first (the outbox) and
sent in the background, retried with growing pauses until Gitea takes it,
across agent restarts: posting never delays or fails a run.  A run's final
status supersedes its pending one if that was never delivered, so Gitea
never ends up showing "pending" after the result.

The token is a file in the secrets store that only the agent's user reads
(mode 0600); it is read when a request is made, never logged, and never
reaches a run.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

import trio

from .errors import EfciError
from .model import RunStatus
from .secretfile import read_own
from .state import StateStore
from .triggers import repo_key

log = logging.getLogger(__name__)

TIMEOUT = 10.0
MAX_PAUSE = 300.0  # seconds between two tries of one status, at most
# Run status -> commit status state (Gitea's: pending, success, error, failure, warning).
STATES = {RunStatus.SUCCEEDED: "success", RunStatus.FAILED: "failure",
          RunStatus.TIMED_OUT: "failure", RunStatus.CANCELLED: "error",
          RunStatus.ERROR: "error"}


class GiteaError(EfciError):
    code = "gitea"


def read_token(path: Path) -> str:
    try:
        token = read_own(path).decode("ascii", "replace")
    except OSError as e:  # PermissionError included: it says what is wrong
        why = f"{path}: {e.strerror}" if e.strerror else str(e)
        raise GiteaError(f"the Gitea token cannot be used: {why}") from None
    if any(c.isspace() or not c.isprintable() for c in token):
        raise GiteaError(f"the Gitea token {path} is not one token")
    return token


def repository_on(url: str, hosts: frozenset[str]) -> str | None:
    """"owner/name" of a repository URL served by this Gitea (its host is
    one of ``hosts``), else None: the URL's last two path components, since
    Gitea's URLs end in owner/name(.git), after its sub-path if it has one."""
    key = repo_key(url)
    if key is None or key[0] not in hosts or "/" not in key[1]:
        return None
    return "/".join(key[1].split("/")[-2:])


def _repo_path(repo: str) -> str:
    owner, _, name = repo.partition("/")
    return f"/repos/{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}"


class GiteaAPI:
    def __init__(self, base: str, token_file: Path) -> None:
        self.base = base.rstrip("/")
        self.token_file = token_file

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
        url = urllib.parse.urlsplit(self.base + path)
        conn_class = (http.client.HTTPSConnection if url.scheme == "https"
                      else http.client.HTTPConnection)
        conn = conn_class(url.netloc, timeout=TIMEOUT)
        headers = {"Authorization": f"token {read_token(self.token_file)}",
                   "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, url.path + (f"?{url.query}" if url.query else ""), body=data,
                         headers=headers)
            response = conn.getresponse()
            return response.status, response.read(1 << 20)
        except OSError as e:
            raise GiteaError(f"Gitea at {self.base} did not answer: {e}") from None
        finally:
            conn.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                   expect: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        """(status, JSON answer); GiteaError for a status not in ``expect``."""
        status, answer = await trio.to_thread.run_sync(self._request, method, path, body)
        if status not in expect:
            raise GiteaError(f"Gitea answered {status} to {method} {path}: {_said(answer)}")
        try:
            return status, json.loads(answer) if answer else None
        except ValueError:
            raise GiteaError(f"Gitea's answer to {method} {path} is not JSON") from None

    async def post_status(self, repo: str, sha: str, body: dict[str, Any]) -> None:
        await self.call("POST", f"{_repo_path(repo)}/statuses/{sha}", body, expect=(201,))

    async def has_commit(self, repo: str, sha: str) -> bool:
        """Whether ``repo`` has commit ``sha`` (as far as the token may see)."""
        status, _ = await self.call(
            "GET", f"{_repo_path(repo)}/git/commits/{sha}?stat=false&verification=false"
            "&files=false", expect=(200, 404))
        return status == 200

    async def add_deploy_key(self, repo: str, title: str, public_key: str) -> dict[str, Any]:
        _, key = await self.call("POST", f"{_repo_path(repo)}/keys",
                                 {"title": title, "key": public_key, "read_only": True},
                                 expect=(201,))
        return key if isinstance(key, dict) else {}

    async def deploy_keys(self, repo: str, fingerprint: str) -> list[dict[str, Any]]:
        _, keys = await self.call("GET", f"{_repo_path(repo)}/keys?fingerprint="
                                  + urllib.parse.quote(fingerprint, safe=""))
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    async def check(self, repos: list[str]) -> dict[str, Any]:
        """What ``efci gitea check`` reports: whether the API answers, whose
        token this is, and per repository what the token may do there."""
        report: dict[str, Any] = {"api": self.base, "repositories": {}}
        _, version = await self.call("GET", "/version")
        report["version"] = (version or {}).get("version", "")
        status, user = await self.call("GET", "/user", expect=(200, 401, 403))
        if status == 401:
            raise GiteaError(f"Gitea at {self.base} refuses the token {self.token_file} "
                             f"(401: {_said(json.dumps(user).encode())})")
        report["user"] = user.get("login", "") if status == 200 else None
        for repo in repos:
            status, found = await self.call("GET", _repo_path(repo), expect=(200, 403, 404))
            permissions = found.get("permissions") or {} if status == 200 else {}
            report["repositories"][repo] = {
                "found": status == 200,
                "read": bool(permissions.get("pull")),
                "statuses": bool(permissions.get("push")),  # commit statuses need write
                "deploy_keys": bool(permissions.get("admin")),
            }
        return report


def _said(answer: bytes) -> str:
    """Gitea's own message from an error answer, else its first bytes."""
    try:
        message = json.loads(answer).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else answer[:200].decode("utf-8", "replace")


class StatusSender:
    """The outbox's sender: wakes when a status is added, else when the
    next retry is due."""

    def __init__(self, state: StateStore, api: GiteaAPI | None) -> None:
        self.state = state
        self.api = api
        self._wake = trio.Event()

    async def add(self, run_id: int, repo: str, sha: str, state: str, context: str,
                  target_url: str, description: str) -> None:
        if self.api is None:
            return
        await self.state.call(self.state.add_status, run_id, repo, sha, state, context,
                              target_url, description[:140])
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.api is None:
            return
        while True:
            self._wake = trio.Event()
            for item in await self.state.call(self.state.due_statuses, time.time()):
                await self._send(item)
            pause = await self.state.call(self.state.next_status_at)
            with trio.move_on_after(min(max(pause - time.time(), 0.05), MAX_PAUSE)
                                    if pause else MAX_PAUSE):
                await self._wake.wait()

    async def _send(self, item: dict[str, Any]) -> None:
        assert self.api is not None
        body = {k: item[k] for k in ("state", "context", "target_url", "description")}
        try:
            await self.api.post_status(item["repo"], item["sha"], body)
        except EfciError as e:
            pause = min(2.0 ** item["attempts"], MAX_PAUSE)
            await self.state.call(self.state.status_failed, item["id"], e.message,
                                  time.time() + pause)
            log.warning("run %d: commit status %s for %s not delivered (%s); again in %.0fs",
                        item["run_id"], item["state"], item["sha"][:12], e.message, pause)
        else:
            await self.state.call(self.state.status_delivered, item["id"])
            log.info("run %d: commit status %s delivered for %s", item["run_id"], item["state"],
                     item["sha"][:12])
