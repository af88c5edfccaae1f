"""Build, lint, install, run as the service would, drive, purge."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.gitserver import GitServer

TREE = Path(__file__).parents[2]
UNIT = Path("/lib/systemd/system/efforting-ci.service")
WEB_UNIT = Path("/lib/systemd/system/efforting-ci-web.service")
TESTER = "efci-tester"


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(list(argv), capture_output=True, check=False, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {result.returncode}\n"
                             f"{result.stdout.decode()}{result.stderr.decode()}")
    return result


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    """The .deb, built with dpkg-buildpackage from a clean copy of the tree."""
    work = Path(tempfile.mkdtemp(prefix="efci-deb."))
    try:
        files = sh("git", "ls-files", "-z", cwd=TREE).stdout.decode().split("\0")
        src = work / "efforting-ci"
        for name in filter(None, files):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TREE / name, src / name)
        sh("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src)
        (found,) = work.glob("efforting-ci_*_all.deb")
        yield found
    finally:
        shutil.rmtree(work)


def test_lintian_is_clean(deb: Path) -> None:
    result = sh("lintian", "--pedantic", "--fail-on", "error,warning", str(deb), check=False)
    print(result.stdout.decode())
    assert result.returncode == 0, result.stdout.decode()
    print(f"package size: {deb.stat().st_size} bytes")


def test_the_man_pages_render_without_warnings() -> None:
    for page in (TREE / "man").iterdir():
        result = sh("man", "--warnings", "-l", "-Tutf8", str(page),
                    env={**os.environ, "MANWIDTH": "80"})
        assert result.stderr == b"", (page, result.stderr)


def unit_capabilities() -> str:
    caps = re.search(r"^AmbientCapabilities=(.*)$", UNIT.read_text(), re.M)
    assert caps
    return ",".join("+" + c.lower().removeprefix("cap_") for c in caps.group(1).split())


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[None]:
    sh("apt-get", "install", "-y", "-q", str(deb), env={**os.environ,
                                                        "DEBIAN_FRONTEND": "noninteractive"})
    if sh("id", TESTER, check=False).returncode != 0:
        sh("useradd", "--system", "--no-create-home", "--gid", "efci-admin", TESTER)
    yield
    sh("userdel", TESTER, check=False)


def test_the_units_verify(installed: None) -> None:
    for unit in (UNIT, WEB_UNIT):
        result = sh("systemd-analyze", "verify", str(unit), check=False)
        assert result.returncode == 0, result.stderr.decode()
        assert unit.name.encode() not in result.stderr, result.stderr.decode()
    # The web page's sandbox, as systemd rates it (lower is better).
    rated = sh("systemd-analyze", "security", "--offline=yes", str(WEB_UNIT), check=False)
    print(rated.stdout.decode().strip().splitlines()[-1])
    assert b"CapabilityBoundingSet=" in WEB_UNIT.read_bytes()


def efci_as_admin(*args: str, check: bool = True,
                  input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return sh("setpriv", f"--reuid={TESTER}", "--regid=efci-admin", "--init-groups",
              "/usr/bin/efci", *args, check=check, cwd="/", input=input)


def test_the_service_runs_as_efci_and_serves_a_real_run(installed: None,
                                                         tmp_path: Path) -> None:
    assert (sh("stat", "-c", "%U %G %a", "/srv/ci-secrets").stdout.decode().split()
            == ["efci", "efci-web", "710"])
    assert (sh("stat", "-c", "%U %a", "/srv/ci-secrets/web").stdout.decode().split()
            == ["efci-web", "700"])
    assert (sh("stat", "-c", "%U %a", "/srv/ci-secrets/gitea").stdout.decode().split()
            == ["efci", "700"])
    sh("install", "-d", "-o", "efci", "-g", "efci", "-m", "0755", "/run/efforting-ci")
    caps = unit_capabilities()
    server = GitServer(tmp_path / "git")
    server.start()
    server.create("site")
    server.commit("site", {"index.html": b"<p>hi</p>\n"}, "site")
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            ["setpriv", "--reuid=efci", "--regid=efci", "--init-groups", f"--inh-caps={caps}",
             f"--ambient-caps={caps}", "--no-new-privs", "/usr/bin/efci", "agent"],
            stderr=log, cwd="/")
    try:
        deadline = time.monotonic() + 60
        while efci_as_admin("status", check=False).returncode != 0:
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.2)
        public = json.loads(efci_as_admin("--json", "key", "create", "deploy").stdout)
        server.authorize(public["public_key"], "site")
        efci_as_admin("key", "trust", "127.0.0.1", "--port", str(server.port), "--keys", "-",
                      input=server.host_key_line.encode())
        Path("/etc/efforting-ci/conf.d/site.yml").write_text(json.dumps({"tasks": {"site": {
            "image": "efci/base:bookworm",
            "checkout": {"repositories": [{"repo_url": server.url("site"), "revision": "main",
                                           "mutable": True, "key": "deploy"}]},
            "command": ["sh", "-c", "cat /src/site/index.html && echo built > /src/site/out "
                        "&& cat /src/site/out && id -u"]}}}))
        efci_as_admin("reload")
        result = efci_as_admin("run", "--follow", "site", check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.endswith(b"<p>hi</p>\r\nbuilt\r\n0\r\n"), result.stdout
        record = json.loads(efci_as_admin("--json", "show", "1").stdout)
        assert record["requested_uid"] == int(sh("id", "-u", TESTER).stdout)
        # setpriv execs the agent in place: this is the agent's own process
        assert psutil.Process(agent.pid).uids().real == int(sh("id", "-u", "efci").stdout)
        assert "EFCI" in sh("iptables-legacy-save").stdout.decode()
        check_the_web_page_as_efci_web(tmp_path)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=90)
        server.stop()
        Path("/etc/efforting-ci/conf.d/site.yml").unlink(missing_ok=True)
        db = sqlite3.connect("/var/lib/efforting-ci/state.db")
        try:  # the run's layers volume carries the agent's instance
            instance = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()[0]
        finally:
            db.close()
        for label in ("ci.owner=local", f"org.efforting-ci.instance={instance}"):
            volumes = sh("docker", "volume", "ls", "-q", "--filter", f"label={label}").stdout
            if volumes.split():
                sh("docker", "volume", "rm", "-f", *volumes.decode().split(), check=False)
        containers = sh("docker", "ps", "-aq", "--filter",
                        "label=org.efforting-ci.task=local/site").stdout.decode().split()
        if containers:
            sh("docker", "rm", "-f", *containers, check=False)
    assert "EFCI" not in sh("iptables-legacy-save").stdout.decode()
    assert not Path("/run/efforting-ci/agent.sock").exists()


def check_the_web_page_as_efci_web(tmp_path: Path) -> None:
    """efci web as its unit runs it: user efci-web, no capabilities at all."""
    with open(tmp_path / "web.log", "wb") as log:
        web = subprocess.Popen(
            ["setpriv", "--reuid=efci-web", "--regid=efci-web", "--init-groups",
             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "/usr/bin/efci", "web"],
            stderr=log, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not json.loads(efci_as_admin("--json", "status").stdout)["web"]:
            assert web.poll() is None, (tmp_path / "web.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()
            time.sleep(0.2)
        assert psutil.Process(web.pid).uids().real == int(sh("id", "-u", "efci-web").stdout)
        assert "CapEff:\t0000000000000000" in Path(f"/proc/{web.pid}/status").read_text()
        url = efci_as_admin("web-login").stdout.decode().strip()
        origin, _, token = url.partition("/login#")
        conn = http.client.HTTPConnection("127.0.0.1", 8470, timeout=30)
        conn.request("POST", "/login", body=json.dumps({"token": token}),
                     headers={"origin": origin, "content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        cookie = response.getheader("set-cookie", "").split(";")[0]
        conn.request("GET", "/runs", headers={"cookie": cookie})
        page = conn.getresponse().read().decode()
        csrf = page.split('name="csrf" content="')[1].split('"')[0]
        # A run started on the page is recorded as the logged-in person's.
        conn.request("POST", "/api/runs", body=json.dumps({"task": "site"}), headers={
            "cookie": cookie, "origin": origin, "x-csrf-token": csrf,
            "content-type": "application/json"})
        started = json.loads(conn.getresponse().read())
        assert started["requested_uid"] == int(sh("id", "-u", TESTER).stdout)
        assert started["requested_pid"] == web.pid
        conn.request("GET", "/api/runs", headers={"cookie": cookie})
        runs = json.loads(conn.getresponse().read())
        assert [r["task"] for r in runs] == ["site", "site"]
        # The webhooks' secret: efci-web reads it through the 0710 store, after
        # the agent made a deploy key there.
        secret = Path("/srv/ci-secrets/web/gitea-webhook-secret")
        secret.write_bytes(b"hook-secret\n")
        sh("chown", "efci-web:efci-web", str(secret))
        secret.chmod(0o600)
        assert sh("stat", "-c", "%a", "/srv/ci-secrets").stdout.decode().strip() == "710"
        body = b'{"zen": "ping"}'
        conn.request("POST", "/hooks/gitea", body=body, headers={
            "x-gitea-event": "ping", "x-gitea-delivery": "d-1",
            "x-gitea-signature": hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()})
        hooked = conn.getresponse()
        assert hooked.status == 202, hooked.read()
        hooked.read()
        conn.close()
    finally:
        web.terminate()
        web.wait(timeout=30)


def test_purge_leaves_only_what_it_should(installed: None) -> None:
    sh("apt-get", "purge", "-y", "-q", "efforting-ci",
       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    for gone in ("/usr/bin/efci", "/usr/share/efforting-ci", "/var/lib/efforting-ci",
                 "/etc/efforting-ci", str(UNIT), str(WEB_UNIT)):
        assert not Path(gone).exists(), gone
    assert Path("/srv/ci-secrets").is_dir()  # deploy keys are never purged silently
    assert sh("id", "efci", check=False).returncode == 0  # users stay, as Debian does
    shutil.rmtree("/srv/ci-secrets")
