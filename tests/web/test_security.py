"""The page's refusals and its bad-input answers, over plain HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from typing import Any

import psutil
import pytest

from agent.client import RemoteError
from tests.integration.conftest import BASE_IMAGE

from .conftest import Web

pytestmark = pytest.mark.integration


class Http:
    def __init__(self, web: Web) -> None:
        self.web = web
        self.cookie = ""
        self.csrf = ""

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                cookie: bool = True) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.web.port, timeout=60)
        sent = {"host": f"127.0.0.1:{self.web.port}", **(headers or {})}
        if cookie and self.cookie:
            sent["cookie"] = f"efci_session={self.cookie}"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def login(self, token: str | None = None) -> int:
        status, headers, _ = self.request(
            "POST", "/login", body=json.dumps({"token": token or self.web.token()}).encode(),
            headers={"origin": self.web.url, "content-type": "application/json"})
        if status == 200:
            cookie = headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
            self.cookie = cookie.split(";")[0].split("=", 1)[1]
            _, _, page = self.request("GET", "/runs")
            self.csrf = page.split(b'name="csrf" content="')[1].split(b'"')[0].decode()
        return status

    def post(self, path: str, fields: dict[str, Any], *, origin: str | None = "self",
             csrf: str | None = "self") -> tuple[int, dict[str, str], bytes]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if origin is not None:
            headers["origin"] = self.web.url if origin == "self" else origin
        if csrf is not None:
            headers["x-csrf-token"] = self.csrf if csrf == "self" else csrf
        return self.request("POST", path, body=json.dumps(fields).encode(), headers=headers)


@pytest.fixture
def http_(web: Web) -> Http:
    web.agent.declare("tasks.yml", json.dumps({"owner": "alice", "tasks": {
        "hello": {"image": BASE_IMAGE, "command": ["bash", "-c", "printf 'hello\\n'"]}}}))
    web.agent.efci("reload")
    return Http(web)


PAGES = ["/runs", "/tasks", "/keys", "/images", "/api/runs", "/runs/1", "/runs/1/log",
         "/runs/1/raw", "/api/keys"]


def test_every_page_needs_a_session(http_: Http) -> None:
    for path in PAGES:
        status, _, body = http_.request("GET", path)
        assert status == 401, (path, status, body)
        assert b"efci web-login" in body
    http_.cookie = "A" * 43  # well-formed, but no session of the agent's
    for path in PAGES:
        assert http_.request("GET", path)[0] == 401, path
    http_.cookie = "<script>"
    assert http_.request("GET", "/runs")[0] == 401


def test_a_login_url_works_once_and_the_token_is_never_logged(http_: Http) -> None:
    token = http_.web.token()
    assert http_.login(token) == 200
    assert http_.request("GET", "/api/runs")[0] == 200
    other = Http(http_.web)
    assert other.login(token) == 401  # used up
    assert other.login("x" * 43) == 401  # never issued
    logs = (http_.web.agent.log.read_text() + http_.web.log.read_text())
    assert token not in logs and http_.cookie not in logs
    state = (http_.web.agent.root / "state/state.db").read_bytes()
    assert token.encode() not in state and http_.cookie.encode() not in state


def test_an_expired_login_url_is_refused(web: Web, agent_restart: None) -> None:
    http_ = Http(web)
    token = web.token()
    time.sleep(2.5)  # web.login_lifetime is 2s here
    assert http_.login(token) == 401


@pytest.fixture
def agent_restart(web: Web) -> None:
    """The agent again, with logins that expire after two seconds."""
    web.agent.stop()
    web.configure("  login_lifetime: 2s\n")
    web.agent.start()


def test_web_logout_all_ends_every_session(http_: Http) -> None:
    assert http_.login() == 200
    http_.web.agent.efci("web-logout", "--all")
    assert http_.request("GET", "/api/runs")[0] == 401


def test_changes_need_the_page_origin_and_the_csrf_token(http_: Http) -> None:
    assert http_.login() == 200
    assert http_.post("/runs", {"task": "hello"}, origin="https://evil.example")[0] == 403
    assert http_.post("/runs", {"task": "hello"}, origin=None)[0] == 403
    assert http_.post("/runs", {"task": "hello"}, csrf=None)[0] == 403
    assert http_.post("/runs", {"task": "hello"}, csrf="wrong")[0] == 403
    # A cross-site form: no CSRF header, a foreign Origin, form-encoded.
    status, _, _ = http_.request("POST", "/runs", body=b"task=hello&csrf=guess", headers={
        "origin": "https://evil.example", "content-type": "application/x-www-form-urlencoded"})
    assert status == 403
    assert json.loads(http_.web.agent.efci("--json", "runs").stdout) == []  # nothing started
    status, _, body = http_.post("/runs", {"task": "hello"})
    assert status == 200 and json.loads(body)["task"] == "hello"


def test_the_page_acts_only_for_a_live_session(http_: Http) -> None:
    """The agent itself checks the session the page passes on."""
    with http_.web.agent.client() as client, pytest.raises(RemoteError) as refused:
        client.call("run", {"task": "hello", "session": "A" * 43})
    assert refused.value.code == "refused"
    assert json.loads(http_.web.agent.efci("--json", "runs").stdout) == []


def test_a_foreign_host_header_is_refused(http_: Http) -> None:
    """DNS rebinding: another site's name resolving to this address."""
    assert http_.login() == 200
    status, _, _ = http_.request("GET", "/runs", headers={"host": "evil.example:8470"})
    assert status == 421


def test_no_private_key_is_ever_served(http_: Http) -> None:
    assert http_.login() == 200
    assert http_.post("/keys", {"name": "deploy", "owner": "alice"})[0] == 200
    for path in ["/keys", "/api/keys"]:
        page = http_.request("GET", path)[2]
        assert b"ssh-ed25519" in page and b"PRIVATE KEY" not in page


def finished_run(http_: Http) -> int:
    run = json.loads(http_.post("/runs", {"task": "hello"})[2])["id"]
    deadline = time.monotonic() + 60
    while json.loads(http_.request("GET", f"/api/runs/{run}")[2])["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return int(run)


def test_bad_input_gets_a_clear_http_error(http_: Http) -> None:
    assert http_.login() == 200
    run = finished_run(http_)
    raw = http_.web.agent.efci("logs", "--raw", str(run)).stdout
    first = next(m for m in frames(http_.request("GET", f"/runs/{run}/log")[2])
                 if m.get("event") == "records")["records"][0][0]
    cases = {
        "/runs/abc": 400, "/api/runs/99999": 404, "/runs/99999/log": 404,
        "/runs/abc/log": 400, f"/runs/{run}/log?position={first + 3}": 400,
        f"/runs/{run}/log?position=x": 400, "/runs/" + "9" * 40: 400,
        "/runs?" + "a" * 5000: 414,
    }
    for path, wanted in cases.items():
        status, _, body = http_.request("GET", path, headers={"accept": "application/json"})
        assert status == wanted, (path, status, body[:200])
        assert json.loads(body)["error"], path
    # Ranges: exact bytes inside, 416 beyond the end.
    status, headers, body = http_.request("GET", f"/runs/{run}/raw", headers={"range": "bytes=1-3"})
    assert (status, body, headers["content-range"]) == (206, raw[1:4], f"bytes 1-3/{len(raw)}")
    status, headers, _ = http_.request("GET", f"/runs/{run}/raw",
                                       headers={"range": f"bytes={len(raw) + 10}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(raw)}"
    assert http_.request("GET", f"/runs/{run}/raw", headers={"range": "bytes=0-1,3-4"})[0] == 416


def frames(data: bytes) -> list[dict[str, Any]]:
    out, at = [], 0
    while at + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, at)
        header = json.loads(data[at + 4:at + 4 + n])
        at += 4 + n + header.get("size", 0)
        out.append(header)
    return out


def test_the_log_stream_resumes_from_next_without_loss_or_repeat(http_: Http) -> None:
    assert http_.login() == 200
    run = finished_run(http_)
    _, _, whole = http_.request("GET", f"/runs/{run}/log")
    messages = frames(whole)
    records = [r for m in messages if m.get("event") == "records" for r in m["records"]]
    assert messages[-1]["ok"] and records
    middle = records[len(records) // 2][0]
    _, _, rest = http_.request("GET", f"/runs/{run}/log?position={middle}")
    again = [r for m in frames(rest) if m.get("event") == "records" for r in m["records"]]
    assert again == [r for r in records if r[0] >= middle]


def test_slow_and_vanishing_viewers_leave_the_agent_unaffected(http_: Http) -> None:
    """50 viewers follow a running log and never read; 20 more hang up
    mid-stream.  The agent's memory stays flat and it keeps answering."""
    agent = http_.web.agent
    agent.declare("tasks.yml", json.dumps({"owner": "alice", "tasks": {"chatty": {
        "image": BASE_IMAGE, "command": ["bash", "-c",
                                         "for i in $(seq 1 200); do head -c 100000 /dev/urandom"
                                         " | base64; sleep 0.05; done"]}}}))
    agent.efci("reload")
    assert http_.login() == 200
    run = json.loads(http_.post("/runs", {"task": "chatty"})[2])["id"]
    time.sleep(2)
    pid = json.loads(agent.efci("--json", "status").stdout)["pid"]
    before = psutil.Process(pid).memory_info().rss
    request = (f"GET /runs/{run}/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1:{http_.web.port}\r\n"
               f"Cookie: efci_session={http_.cookie}\r\n\r\n").encode()
    slow = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", http_.web.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(request)
        slow.append(s)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", http_.web.port)) as s:
            s.sendall(request)
            s.recv(1000)
    try:
        time.sleep(8)
        started = time.monotonic()
        status = json.loads(agent.efci("--json", "status").stdout)
        answered = time.monotonic() - started
        after = psutil.Process(pid).memory_info().rss
        print(f"agent RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB with 50 stalled "
              f"viewers; status answered in {answered * 1000:.0f} ms")
        assert status["pid"] == pid
        assert after - before < 30 * 2**20
    finally:
        for s in slow:
            s.close()
    agent.efci("cancel", str(run))
