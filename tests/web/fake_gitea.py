"""Gitea's API as far as the agent uses it, behind a real validating server.

Stoplight Prism (installed by scripts/setup-host from tests/web/prism) runs
as a proxy in front of a small fake.  It checks every request the agent
sends against Gitea's own API description, ../shared/gitea/swagger.v1.json:
a request the description rejects (a wrong path, a missing token, a body of
the wrong shape) is answered 422 or 401 by Prism and never reaches the fake,
and :meth:`FakeGitea.stop` fails the test for anything Prism reported about
a request or an answer.  The fake keeps what the tests assert on: the
statuses, the commits that exist, the deploy keys.

Prism serves the description's paths at its root (it ignores Swagger 2's
basePath), so the agent's gitea.api is the proxy's bare URL here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.seed import shared_file

from .conftest import free_port

PRISM = Path(__file__).parent / "prism/node_modules/.bin/prism"
WHEN = "2026-11-29T00:00:00Z"
REPO = r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"


class FakeGitea:
    def __init__(self, log: Path, *, login: str = "ci-bot") -> None:
        self.port, self._fake_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.login = login
        self.got: list[dict[str, Any]] = []  # every request that passed Prism
        self.commits: set[str] = set()  # shas Gitea has
        self.keys: dict[str, list[dict[str, Any]]] = {}  # repo -> its deploy keys
        self._server: ThreadingHTTPServer | None = None
        self._prism: subprocess.Popen[bytes] | None = None

    # -- what the tests read -----------------------------------------------------

    def requests(self, method: str, pattern: str) -> list[dict[str, Any]]:
        return [g for g in self.got if g["method"] == method and re.fullmatch(pattern, g["path"])]

    def statuses(self) -> list[dict[str, Any]]:
        return self.requests("POST", REPO + "/statuses/[0-9a-f]+")

    # -- the fake behind Prism ---------------------------------------------------

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/version":
            return 200, {"version": "1.27.1"}
        if method == "GET" and path == "/user":
            return 200, {"id": 7, "login": self.login, "full_name": "CI bot",
                         "email": f"{self.login}@gitea.invalid"}
        m = re.fullmatch(REPO + r"(?P<rest>.*)", path)
        if m is None:
            return 404, {"message": "not found", "url": ""}
        repo, rest = f"{m['owner']}/{m['repo']}", m["rest"]
        if method == "GET" and rest == "":
            return 200, {"id": 1, "full_name": repo, "name": m["repo"],
                         "permissions": {"admin": True, "push": True, "pull": True}}
        if method == "POST" and (s := re.fullmatch(r"/statuses/(\w+)", rest)):
            return 201, {"id": len(self.got), "state": body["state"],
                         "context": body.get("context", ""),
                         "target_url": body.get("target_url", ""),
                         "description": body.get("description", ""),
                         "url": f"{self.url}{path}", "created_at": WHEN, "updated_at": WHEN,
                         "creator": {"id": 7, "login": self.login}, "sha": s[1]}
        if method == "GET" and (c := re.fullmatch(r"/git/commits/(\w+)", rest)):
            if c[1] not in self.commits:
                return 404, {"message": f"object does not exist [id: {c[1]}]", "url": ""}
            return 200, {"sha": c[1], "url": f"{self.url}{path}", "created": WHEN,
                         "commit": {"message": "a commit", "tree": {"sha": c[1]}},
                         "parents": []}
        if method == "GET" and rest == "/keys":
            return 200, self.keys.get(repo, [])
        if method == "POST" and rest == "/keys":
            keys = self.keys.setdefault(repo, [])
            if any(k["title"] == body["title"] for k in keys):
                return 422, {"message": "Key title has been used", "url": ""}
            key = {"id": 100 + len(keys), "key": body["key"], "title": body["title"],
                   "read_only": body.get("read_only", False), "created_at": WHEN,
                   "url": f"{self.url}{path}/{100 + len(keys)}",
                   "fingerprint": _fingerprint(body["key"])}
            keys.append(key)
            return 201, key
        return 404, {"message": "not found", "url": ""}

    def _serve(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.got.append({"method": method, "path": url.path, "query": url.query,
                                 "auth": self.headers["authorization"], "body": body})
                status, answer = fake._answer(method, url.path, body)
                if method == "GET" and url.path.endswith("/keys") and url.query:
                    wanted = urllib.parse.parse_qs(url.query).get("fingerprint", [""])[0]
                    answer = [k for k in answer if k["fingerprint"] == wanted]
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.handle_one("GET")

            def do_POST(self) -> None:
                self.handle_one("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self._fake_port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    # -- up and down ----------------------------------------------------------------

    def start(self) -> None:
        """The fake, then Prism in front of it, validating (--errors)."""
        if not PRISM.exists():
            raise AssertionError(f"{PRISM} is missing: scripts/setup-host installs it")
        self._serve()
        with open(self.log, "ab") as out:
            self._prism = subprocess.Popen(
                [str(PRISM), "proxy", str(shared_file("gitea/swagger.v1.json")), f"http://127.0.0.1:{self._fake_port}",
                 "--errors", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"Prism is listening" not in self.log.read_bytes():
            if self._prism.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Prism did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self._prism is not None:
            # Prism writes its verdicts a moment after it answers: let its log
            # settle first, or a violation could go unread.
            deadline, size = time.monotonic() + 10, -1
            while time.monotonic() < deadline and self.log.stat().st_size != size:
                size = self.log.stat().st_size
                time.sleep(0.5)
            self._prism.terminate()
            self._prism.wait(timeout=30)
            self._prism = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def violations(self) -> list[str]:
        """What Prism said against a request or an answer."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if "[CLI]" not in line  # its start-up list of example requests
                and ("✖" in line or "⚠" in line or "violation" in line.lower())]


def _fingerprint(public_key: str) -> str:
    """ssh-keygen's SHA256 fingerprint of an authorized_keys line, as Gitea shows it."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
