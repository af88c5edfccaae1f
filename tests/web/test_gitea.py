"""Gitea pushes: a real `git push` to the test git server, whose post-receive
hook sends a signed push webhook as Gitea would, starts the declared task.
And what the webhook endpoint refuses."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import BASE_IMAGE
from tests.integration.gitserver import GitServer, git

from .conftest import Web, free_port

pytestmark = pytest.mark.integration

SECRET = b"s3cret-for-the-tests"

# The hook Gitea would be: for each pushed ref, a signed push webhook.
HOOK = """#!{python}
import hashlib, hmac, json, sys, urllib.request, uuid
for line in sys.stdin:
    before, after, ref = line.split()
    body = json.dumps({{"ref": ref, "before": before, "after": after,
        "repository": {{"full_name": "alice/site", "ssh_url": {ssh_url!r},
                        "clone_url": "http://gitea.invalid/alice/site.git"}},
        "pusher": {{"login": "alice"}}}}).encode()
    request = urllib.request.Request({url!r}, data=body, method="POST", headers={{
        "X-Gitea-Event": "push", "X-Gitea-Delivery": str(uuid.uuid4()),
        "X-Gitea-Signature": hmac.new({secret!r}, body, hashlib.sha256).hexdigest(),
        "Content-Type": "application/json"}})
    print(urllib.request.urlopen(request, timeout=30).read().decode(), file=sys.stderr)
"""


def write_secret(web: Web, secret: bytes = SECRET, mode: int = 0o600) -> Path:
    path = web.agent.root / "secrets/web/gitea-webhook-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(secret + b"\n")
    os.chmod(path, mode)
    return path


def send(web: Web, body: bytes, *, event: str = "push", delivery: str | None = None,
         signature: str | None = "sign", headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, Any]]:
    sent = {"x-gitea-event": event, "x-gitea-delivery": delivery or str(uuid.uuid4()),
            "content-type": "application/json", **(headers or {})}
    if signature == "sign":
        sent["x-gitea-signature"] = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    elif signature is not None:
        sent["x-gitea-signature"] = signature
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=60)
    conn.request("POST", "/hooks/gitea", body=body, headers=sent)
    response = conn.getresponse()
    answer = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, answer


def payload(ref: str = "refs/heads/main", after: str = "b" * 40,
            ssh_url: str = "ssh://git@gitea.invalid/alice/site.git") -> bytes:
    return json.dumps({"ref": ref, "before": "a" * 40, "after": after, "pusher": {"login": "x"},
                       "repository": {"full_name": "alice/site", "ssh_url": ssh_url,
                                      "clone_url": ""}}).encode()


def runs(web: Web) -> list[dict[str, Any]]:
    return json.loads(web.agent.efci("--json", "runs").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def site(web: Web, tmp_path: Path) -> Iterator[tuple[Web, GitServer]]:
    """The git server with repository site (main), a task that a push to main
    starts, and the hook that tells the web page of each push."""
    server = GitServer(tmp_path / "git")
    server.start()
    volumes: list[str] = []
    try:
        agent = web.agent
        server.create("site")
        server.commit("site", {"index.html": b"first\n"}, "first")
        public = json.loads(agent.efci("--json", "key", "create", "deploy", "--owner",
                                       "alice").stdout)["public_key"]
        server.authorize(public, "site")
        keys = agent.root / "hostkey.pub"
        keys.write_text(server.host_key_line)
        agent.efci("key", "trust", server.address, "--port", str(server.port), "--owner",
                   "alice", "--keys", str(keys))
        entry = {"repo_url": server.url("site"), "revision": "main", "mutable": True,
                 "key": "deploy", "submodules": False}
        agent.declare("site.yml", json.dumps({"owner": "alice", "tasks": {"site": {
            "image": BASE_IMAGE, "on": {"push": {"branches": ["main"]}},
            "checkout": {"repositories": [entry]},
            "command": ["cat", "/src/site/index.html"]}}}))
        agent.efci("reload")
        from agent.host.git import worktree_volume_name
        volumes.append(worktree_volume_name("alice", entry))
        write_secret(web)
        hook = server.path("site") / "hooks/post-receive"
        hook.write_text(HOOK.format(python=sys.executable, ssh_url=server.url("site"),
                                    url=f"{web.url}/hooks/gitea", secret=SECRET))
        hook.chmod(0o755)
        yield web, server
    finally:
        server.stop()
        if volumes:
            subprocess.run(["docker", "volume", "rm", "--force", *volumes], capture_output=True,
                           check=False)


def wait_for_run(web: Web, count: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = runs(web)
        if len(found) >= count and found[0]["status"] not in ("queued", "running"):
            return json.loads(web.agent.efci("--json", "show", str(found[0]["id"])).stdout)
        time.sleep(0.2)
    raise AssertionError(f"no finished run {count} in time: {runs(web)}")


def test_a_push_to_main_runs_the_task_on_exactly_that_commit(
        site: tuple[Web, GitServer]) -> None:
    web, server = site
    sha = server.commit("site", {"index.html": b"second\n"}, "second")  # git push, hook fires
    pushed = time.time()  # the post-receive hook ran inside the push
    record = wait_for_run(web, 1)
    assert record["status"] == "succeeded", record
    trigger = record["trigger"]
    assert (trigger["kind"], trigger["ref"], trigger["after"], trigger["pusher"]) == \
        ("push", "refs/heads/main", sha, "alice")
    assert [w["commit_sha"] for w in record["worktrees"]] == [sha]
    output = web.agent.efci("logs", "--raw", str(record["id"])).stdout
    assert b"second" in output
    shown = web.agent.efci("show", str(record["id"])).stdout.decode()
    assert "push of refs/heads/main to alice/site by alice:" in shown and f"..{sha[:12]}" in shown
    # For the closing note: the same task by hand, beside the push.
    asked = time.time()
    web.agent.efci("run", "site")
    by_hand = wait_for_run(web, 2)
    for how, t0, r in (("git push returned", pushed, record), ("efci run asked", asked, by_hand)):
        print(f"{how}: run started after {r['started_at'] - t0:+.3f} s, "
              f"finished (recorded) after {r['finished_at'] - t0:+.3f} s")

    # A branch no task watches starts nothing.
    work = server.repos / "site.work"
    git("checkout", "--quiet", "-b", "feature", cwd=work)
    server.commit("site", {"index.html": b"feature\n"}, "feature", branch="feature")
    time.sleep(2)
    assert len(runs(web)) == 2


@pytest.fixture
def hooked(web: Web) -> Web:
    web.agent.declare("site.yml", json.dumps({"owner": "alice", "tasks": {"site": {
        "image": BASE_IMAGE, "on": {"push": {"branches": ["main"]}},
        "checkout": {"repositories": [{
            "repo_url": "ssh://git@gitea.invalid/alice/site.git", "revision": "main",
            "mutable": True, "key": "deploy"}]},
        "command": ["true"]}}}))
    web.agent.efci("reload")
    write_secret(web)
    return web


def test_the_webhook_refuses_what_it_must(hooked: Web) -> None:
    web = hooked
    body = payload(ssh_url="ssh://git@gitea.invalid/alice/elsewhere.git")  # nothing watches it
    assert send(web, body, signature=None)[0] == 401
    assert send(web, body, signature="0" * 64)[0] == 401
    assert send(web, body, signature=hmac.new(b"other", body, hashlib.sha256).hexdigest())[0] \
        == 401
    status, answer = send(web, body, event="pull_request")
    assert status == 202 and "start nothing" in answer["ignored"]
    assert send(web, b"{not json", signature="sign")[0] == 400
    assert send(web, b"[]")[0] == 400
    for ref in ("refs/heads/a..b", "refs/heads/x\x01y", "refs/notes/x"):
        status, answer = send(web, payload(ref=ref))
        assert status == 400, (ref, answer)
    status, answer = send(web, body)
    assert (status, answer["runs"]) == (202, [])  # an unknown repository starts nothing
    status, answer = send(web, payload(after="0" * 40))
    assert (status, answer["runs"]) == (202, [])  # a branch deletion starts nothing
    assert runs(web) == []


def test_a_replayed_delivery_starts_nothing(hooked: Web) -> None:
    delivery = str(uuid.uuid4())
    status, first = send(hooked, payload(), delivery=delivery)
    assert status == 202 and len(first["runs"]) == 1 and not first["duplicate"]
    status, again = send(hooked, payload(), delivery=delivery)
    assert status == 202 and again == {"duplicate": True, "runs": []}
    assert len(runs(hooked)) == 1


def test_a_huge_body_is_refused_unread(hooked: Web) -> None:
    """100 MB announced: refused from its Content-Length, before any of it is read."""
    conn = http.client.HTTPConnection("127.0.0.1", hooked.port, timeout=30)
    conn.putrequest("POST", "/hooks/gitea")
    conn.putheader("content-length", str(100_000_000))
    conn.putheader("x-gitea-event", "push")
    conn.endheaders()
    conn.send(b"{" + b" " * 65536)
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_a_secret_others_can_read_is_not_used(hooked: Web) -> None:
    write_secret(hooked, mode=0o644)
    status, answer = send(hooked, payload())
    assert status == 503 and "not set up" in answer["error"]
    assert "mode 0600" in hooked.log.read_text()
    assert runs(hooked) == []


def test_a_newer_push_replaces_a_run_still_queued(hooked: Web) -> None:
    web = hooked
    web.agent.stop()
    web.configure("runs:\n  max_parallel: 1\n")
    web.agent.start()
    web.agent.declare("blocker.yml", json.dumps({"owner": "alice", "tasks": {"blocker": {
        "image": BASE_IMAGE, "command": ["sleep", "300"]}}}))
    web.agent.efci("reload")
    blocker = json.loads(web.agent.efci("--json", "run", "blocker").stdout)["id"]
    try:
        _, first = send(web, payload(after="c" * 40))
        (older,) = first["runs"]
        _, second = send(web, payload(after="d" * 40))
        (newer,) = second["runs"]
        assert newer["replaced"] == [older["run"]]
        record = json.loads(web.agent.efci("--json", "show", str(older["run"])).stdout)
        assert record["status"] == "cancelled"
        assert record["error"] == f"replaced by run {newer['run']}, of a newer push of " \
                                  "refs/heads/main"
        assert json.loads(web.agent.efci("--json", "show", str(newer["run"])).stdout)[
            "status"] == "queued"
    finally:
        web.agent.efci("cancel", str(blocker), check=False)


class Recorder:
    """Gitea's API as far as commit statuses go: records each POST."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[dict[str, Any]] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                recorder.got.append({"path": self.path, "auth": self.headers["authorization"],
                                     **body})
                self.send_response(201)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def gitea_api(site: tuple[Web, GitServer]) -> Iterator[tuple[Web, GitServer, Recorder]]:
    web, server = site
    recorder = Recorder(free_port())
    token = web.agent.root / "secrets/gitea/token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("t0ken\n")
    token.chmod(0o600)
    web.agent.stop()
    web.configure(f"gitea:\n  api: http://127.0.0.1:{recorder.port}/api/v1\n")
    web.agent.start()
    try:
        yield web, server, recorder
    finally:
        recorder.stop()


def wait_delivered(web: Web, run: int, states: list[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = json.loads(web.agent.efci("--json", "show", str(run)).stdout)
        live = [s for s in shown["commit_statuses"] if not s["superseded"]]
        if [s["state"] for s in live] == states and all(s["delivered_at"] for s in live):
            return shown  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"statuses of run {run}: {shown['commit_statuses']}")


def test_a_pushed_run_reports_pending_then_success_on_its_commit(
        gitea_api: tuple[Web, GitServer, Recorder]) -> None:
    web, server, recorder = gitea_api
    recorder.start()
    sha = server.commit("site", {"index.html": b"third\n"}, "third")
    record = wait_for_run(web, 1)
    assert record["status"] == "succeeded"
    wait_delivered(web, record["id"], ["pending", "success"])
    assert [(g["path"], g["state"]) for g in recorder.got] == [
        (f"/api/v1/repos/alice/site/statuses/{sha}", "pending"),
        (f"/api/v1/repos/alice/site/statuses/{sha}", "success")]
    final = recorder.got[-1]
    assert final["auth"] == "token t0ken"
    assert final["context"] == "efci/alice/site"
    assert final["target_url"] == f"{web.url}/runs/{record['id']}"
    assert final["description"].startswith("succeeded in ")
    assert "commit status:  success on" in web.agent.efci("show", str(record["id"])).stdout.decode()


def test_statuses_wait_for_an_api_that_is_down(gitea_api: tuple[Web, GitServer, Recorder]) -> None:
    """The run is not delayed; its status is sent when Gitea answers again,
    and the stale pending one is never sent after the result."""
    web, server, recorder = gitea_api
    sha = server.commit("site", {"index.html": b"fourth\n"}, "fourth")
    record = wait_for_run(web, 1)
    assert record["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while not any(s["last_error"] for s in json.loads(
            web.agent.efci("--json", "show", str(record["id"])).stdout)["commit_statuses"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "not delivered yet" in web.agent.efci("show", str(record["id"])).stdout.decode()
    recorder.start()
    wait_delivered(web, record["id"], ["success"])
    # The pending one was superseded while Gitea was away: only the result went.
    assert [(g["state"], g["path"].rsplit("/", 1)[1]) for g in recorder.got] == [("success", sha)]


def test_lists_say_what_started_each_run(site: tuple[Web, GitServer]) -> None:
    web, server = site
    sha = server.commit("site", {"index.html": b"listed\n"}, "listed")
    wait_for_run(web, 1)
    listed = web.agent.efci("runs").stdout.decode()
    assert f"push main {sha[:12]}" in listed
    token = web.token()
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("POST", "/login", body=json.dumps({"token": token}),
                 headers={"origin": web.url, "content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    cookie = response.getheader("set-cookie", "").split(";")[0]
    conn.request("GET", "/runs", headers={"cookie": cookie})
    page = conn.getresponse().read().decode()
    assert f"push main <code>{sha[:12]}</code>" in page
    conn.close()
