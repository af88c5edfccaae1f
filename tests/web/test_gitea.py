"""Gitea pushes: a real `git push` to the test git server, whose post-receive
hook sends a signed push webhook as Gitea would, starts the declared task.
And what the webhook endpoint refuses."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import BASE_IMAGE
from tests.integration.gitserver import GitServer, git

from .conftest import Web
from .fake_gitea import FakeGitea

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


def login(web: Web) -> str:
    """A session cookie, as a browser gets it from a one-time login URL."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("POST", "/login", body=json.dumps({"token": web.token()}),
                 headers={"origin": web.url, "content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.getheader("set-cookie", "").split(";")[0]


def runs(web: Web) -> list[dict[str, Any]]:
    return json.loads(web.agent.efci("--json", "runs").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def site(web: Web, tmp_path: Path) -> Iterator[tuple[Web, GitServer]]:
    """The git server with repository site (main), a task that a push to main
    starts, and the hook that tells the web page of each push."""
    server = GitServer(tmp_path / "git", owner="alice")
    server.start()
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
        write_secret(web)
        hook = server.path("site") / "hooks/post-receive"
        hook.write_text(HOOK.format(python=sys.executable, ssh_url=server.url("site"),
                                    url=f"{web.url}/hooks/gitea", secret=SECRET))
        hook.chmod(0o755)
        yield web, server
    finally:
        server.stop()
        # Every worktree of the repository: this task's, and those a test
        # declares of other revisions (pinned_task).
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                                  f"label=ci.repo_url={server.url('site')}"],
                                 capture_output=True, text=True, check=False).stdout.split()
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
        print(f"{how}: container started after {container_started(r) - t0:+.3f} s, "
              f"final status recorded after {r['finished_at'] - t0:+.3f} s")

    # A branch no task watches starts nothing.
    work = server.repos / "site.work"
    git("checkout", "--quiet", "-b", "feature", cwd=work)
    server.commit("site", {"index.html": b"feature\n"}, "feature", branch="feature")
    time.sleep(2)
    assert len(runs(web)) == 2


def container_started(record: dict[str, Any]) -> float:
    """When the run's container started, as dockerd says (it is kept, stopped)."""
    started = subprocess.run(["docker", "inspect", "--format", "{{.State.StartedAt}}",
                              record["container_id"]], capture_output=True, check=True,
                             text=True).stdout.strip()
    seconds, _, fraction = started.removesuffix("Z").partition(".")
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{fraction}")


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


@pytest.fixture
def gitea_api(site: tuple[Web, GitServer]) -> Iterator[tuple[Web, GitServer, FakeGitea]]:
    """The agent set up with a token and an API: Prism in front of a fake
    Gitea, not yet started (the tests start it, or leave it down)."""
    web, server = site
    fake = FakeGitea(web.agent.root / "prism.log")
    token = web.agent.root / "secrets/gitea/token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("t0ken\n")
    token.chmod(0o600)
    web.agent.stop()
    web.configure(f"gitea:\n  api: {fake.url}\n")
    web.agent.start()
    try:
        yield web, server, fake
    finally:
        fake.stop()
    assert fake.violations() == [], "Prism found requests or answers off the spec"
    assert all(g["auth"] == "token t0ken" for g in fake.got)


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
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    web, server, fake = gitea_api
    fake.start()
    sha = server.commit("site", {"index.html": b"third\n"}, "third")
    record = wait_for_run(web, 1)
    assert record["status"] == "succeeded"
    wait_delivered(web, record["id"], ["pending", "success"])
    assert [(g["path"], g["body"]["state"]) for g in fake.statuses()] == [
        (f"/repos/alice/site/statuses/{sha}", "pending"),
        (f"/repos/alice/site/statuses/{sha}", "success")]
    final = fake.statuses()[-1]["body"]
    assert final["context"] == "efci/alice/site"
    assert final["target_url"] == f"{web.url}/runs/{record['id']}"
    assert final["description"].startswith("succeeded in ")
    assert "commit status:  success on" in web.agent.efci("show", str(record["id"])).stdout.decode()


def test_statuses_wait_for_an_api_that_is_down(
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    """The run is not delayed; its status is sent when Gitea answers again,
    and the stale pending one is never sent after the result."""
    web, server, fake = gitea_api
    sha = server.commit("site", {"index.html": b"fourth\n"}, "fourth")
    record = wait_for_run(web, 1)
    assert record["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while not any(s["last_error"] for s in json.loads(
            web.agent.efci("--json", "show", str(record["id"])).stdout)["commit_statuses"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "not delivered yet" in web.agent.efci("show", str(record["id"])).stdout.decode()
    fake.start()
    wait_delivered(web, record["id"], ["success"])
    # The pending one was superseded while Gitea was away: only the result went.
    assert [(g["body"]["state"], g["path"].rsplit("/", 1)[1]) for g in fake.statuses()] == [
        ("success", sha)]


def test_lists_say_what_started_each_run(site: tuple[Web, GitServer]) -> None:
    web, server = site
    sha = server.commit("site", {"index.html": b"listed\n"}, "listed")
    wait_for_run(web, 1)
    listed = web.agent.efci("runs").stdout.decode()
    assert f"push main {sha[:12]}" in listed
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("GET", "/runs", headers={"cookie": login(web)})
    page = conn.getresponse().read().decode()
    assert f"push main <code>{sha[:12]}</code>" in page
    conn.close()


def test_the_contract_validator_refuses_what_the_spec_does(tmp_path: Path) -> None:
    """Prism itself: a status whose state Gitea does not know, or one sent
    without a token, never reaches the fake, and is reported."""
    fake = FakeGitea(tmp_path / "prism.log")
    fake.start()
    try:
        for headers in ({"authorization": "token t"}, {}):
            conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=30)
            conn.request("POST", f"/repos/alice/site/statuses/{'a' * 40}",
                         body=json.dumps({"state": "bogus", "context": "c"}),
                         headers={"content-type": "application/json", **headers})
            assert conn.getresponse().status in (401, 422)
            conn.close()
    finally:
        fake.stop()
    assert fake.got == [] and len(fake.violations()) == 2


def pinned_task(web: Web, server: GitServer, sha: str) -> None:
    entry = {"repo_url": server.url("site"), "revision": sha, "mutable": False,
             "key": "deploy", "submodules": False}
    web.agent.declare("pinned.yml", json.dumps({"owner": "alice", "tasks": {"pinned": {
        "image": BASE_IMAGE, "checkout": {"repositories": [entry]},
        "command": ["cat", "/src/site/index.html"]}}}))
    web.agent.efci("reload")


def test_a_literal_sha_gitea_lacks_fails_the_run_before_any_container(
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    web, server, fake = gitea_api
    fake.start()
    missing = "c0ffee" * 6 + "c0ff"
    pinned_task(web, server, missing)
    before = set(web.agent.containers())
    run = json.loads(web.agent.efci("--json", "run", "pinned").stdout)["id"]
    record = wait_for_run(web, 1)
    assert record["id"] == run and record["status"] == "failed", record
    assert f"Gitea has no commit {missing} in alice/site" in record["error"]
    assert "pinned.yml" in record["error"]  # where to correct it
    assert record["worktrees"] == [] and set(web.agent.containers()) == before
    assert len(fake.requests("GET", f"/repos/alice/site/git/commits/{missing}")) == 1

    # A commit Gitea has: checked once, before its first checkout only.
    sha = server.commit("site", {"index.html": b"pinned\n"}, "pinned")
    fake.commits.add(sha)
    pinned_task(web, server, sha)
    for count in (2, 3):
        web.agent.efci("run", "pinned")
        record = wait_for_run(web, count)
        assert record["status"] == "succeeded" and b"pinned" in web.agent.efci(
            "logs", "--raw", str(record["id"])).stdout
    assert len(fake.requests("GET", f"/repos/alice/site/git/commits/{sha}")) == 1
    assert fake.requests("GET", "/repos/alice/site/git/commits/.*")[-1]["query"] == \
        "stat=false&verification=false&files=false"


def test_key_register_adds_a_read_only_deploy_key_once(
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    web, _, fake = gitea_api
    fake.start()
    first = json.loads(web.agent.efci("--json", "key", "register", "deploy", "--owner", "alice",
                                      "--repo", "alice/site").stdout)
    assert first["added"] and first["read_only"]
    (posted,) = fake.requests("POST", "/repos/alice/site/keys")
    shown = json.loads(web.agent.efci("--json", "key", "show", "deploy", "--owner",
                                      "alice").stdout)
    assert posted["body"] == {"title": posted["body"]["title"], "key": shown["public_key"],
                              "read_only": True}
    assert [(r["repo"], r["gitea_id"]) for r in shown["registered"]] == \
        [("alice/site", first["gitea_id"])]
    # Again: found by its fingerprint, recorded, not added twice.
    again = web.agent.efci("key", "register", "deploy", "--owner", "alice", "--repo",
                           "alice/site").stdout.decode()
    assert "already was a read-only deploy key of alice/site" in again
    assert len(fake.requests("POST", "/repos/alice/site/keys")) == 1
    assert "a read-only deploy key of alice/site on Gitea" in web.agent.efci(
        "key", "show", "deploy", "--owner", "alice").stdout.decode()
    # The keys page says so too, and registers on another repository.
    session = login(web)
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("GET", "/keys", headers={"cookie": session})
    page = conn.getresponse().read().decode()
    assert "A read-only deploy key on Gitea of <code>alice/site</code>" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    conn.request("POST", "/keys/register", body=urllib.parse.urlencode(
        {"csrf": csrf[1], "name": "deploy", "owner": "alice", "repo": "alice/other"}),
        headers={"cookie": session, "origin": web.url,
                 "content-type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    assert (response.status, response.getheader("location")) == (303, "/keys")
    conn.close()
    assert fake.keys["alice/other"][0]["key"] == shown["public_key"]
    refused = web.agent.efci("key", "register", "deploy", "--owner", "alice", "--repo",
                             "../etc", check=False)
    assert refused.returncode != 0 and b"not OWNER/REPOSITORY" in refused.stderr
    # Deleting the key says where it still is.
    deleted = web.agent.efci("key", "delete", "deploy", "--owner", "alice", "--force")
    assert b"still a deploy key of alice/site" in deleted.stderr


def test_gitea_check_says_what_the_token_may_do(
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    web, _, fake = gitea_api
    fake.start()
    report = json.loads(web.agent.efci("--json", "gitea", "check").stdout)
    assert (report["version"], report["user"]) == ("1.27.1", "ci-bot")
    assert report["repositories"] == {"alice/site": {
        "found": True, "read": True, "statuses": True, "deploy_keys": True}}
    text = web.agent.efci("gitea", "check").stdout.decode()
    assert "the token is ci-bot's" in text and "alice/site" in text
    # A token file others may read is not used, and the check says why.
    (web.agent.root / "secrets/gitea/token").chmod(0o644)
    refused = web.agent.efci("gitea", "check", check=False)
    assert refused.returncode != 0 and b"mode 0600" in refused.stderr
    (web.agent.root / "secrets/gitea/token").chmod(0o600)


def test_a_pushed_run_the_agent_lost_gets_its_final_status(
        gitea_api: tuple[Web, GitServer, FakeGitea]) -> None:
    """kill -9 while a pushed run runs: the next agent re-attaches to it, and
    when it ends (cancelled here) Gitea hears the verdict rather than a
    pending that never ends."""
    web, server, fake = gitea_api
    fake.start()
    site_yml = web.agent.conf_d / "site.yml"
    declared = json.loads(site_yml.read_text())
    declared["tasks"]["site"]["command"] = ["sleep", "600"]
    web.agent.declare("site.yml", json.dumps(declared))
    web.agent.efci("reload")
    sha = server.commit("site", {"index.html": b"lost\n"}, "lost")
    deadline = time.monotonic() + 120
    while not (found := runs(web)) or found[0]["status"] != "running":
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    run = found[0]["id"]
    wait_delivered(web, run, ["pending"])
    while subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}",
                          f"efci-{web.agent.instance()}-{run}"], capture_output=True,
                         text=True).stdout.strip() != "true":  # the task's, past its checkout
        assert time.monotonic() < deadline
        time.sleep(0.2)
    web.agent.stop(signal.SIGKILL)
    web.agent.start()  # the run is re-attached to, and ends when cancelled
    web.agent.efci("cancel", str(run))
    shown = wait_delivered(web, run, ["pending", "error"])
    assert shown["status"] == "cancelled"
    assert [(g["body"]["state"], g["path"].rsplit("/", 1)[1]) for g in fake.statuses()] == [
        ("pending", sha), ("error", sha)]
