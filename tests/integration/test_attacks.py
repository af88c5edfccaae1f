"""The attacks of the hardening issue, tried against the running agent and
the real dockerd: setuid files and device nodes planted in a deploy target,
request lines that ended the agent, and a fork bomb and a memory hog."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.mounts import is_mounted
from agent.host.privileges import clear_privileges

from .conftest import BASE_IMAGE, AgentProcess
from .test_agent import show, wait_for

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

PLANT = ("cp /bin/cat /deploy/suidcat && chmod 4755 /deploy/suidcat && ls -l /deploy/suidcat; "
         "mknod -m 666 /deploy/disk b 254 0; echo planted; sleep 4")


@pytest.fixture
def site() -> Iterator[Path]:
    """A deploy target any host user can reach, as a web root is."""
    path = Path(tempfile.mkdtemp(prefix="efci-site-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        while is_mounted(path):
            subprocess.run(["umount", "--lazy", str(path)], check=False)
        shutil.rmtree(path)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, check=False, timeout=30)


def test_a_task_cannot_plant_a_setuid_file_or_a_device_on_the_host(
        agent: AgentProcess, site: Path) -> None:
    agent.configure(f"deploy_targets:\n  site:\n    path: {site}\n    allow: [alice/dep]\n")
    agent.declare("t.yml", json.dumps({"owner": "alice", "tasks": {"dep": {
        "image": BASE_IMAGE, "deploy_targets": ["site"], "command": PLANT}}}))
    agent.start()
    run = json.loads(agent.efci("--json", "run", "dep").stdout)["id"]
    wait_for(lambda: b"planted" in agent.efci("logs", "--raw", str(run)).stdout, what="planted")
    planted = site / "suidcat"
    # While the task runs the bit is on disk, but the host path is nosuid,nodev.
    assert planted.stat().st_mode & stat.S_ISUID
    during = as_nobody(str(planted), "/etc/shadow")
    assert during.returncode != 0 and b"Permission denied" in during.stderr, during
    wait_for(lambda: show(agent, run)["status"] != "running", what="the run's end")
    record = show(agent, run)
    assert record["status"] == "succeeded", record
    out = agent.efci("logs", "--raw", str(run)).stdout
    assert b"-rwsr-xr-x" in out and b"Operation not permitted" in out  # mknod: no MKNOD
    assert not (site / "disk").exists()
    assert b"cleared the setuid/setgid bits of suidcat" in agent.efci("logs", str(run)).stderr
    assert not planted.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert agent.stop() == 0
    assert not is_mounted(site), "the guard goes when the agent stops"
    after = as_nobody(str(planted), "/etc/shadow")
    assert after.returncode != 0 and b"Permission denied" in after.stderr, after


def test_the_sweep_removes_device_nodes_and_setgid_bits_without_following_links(
        tmp_path: Path) -> None:
    root = tmp_path / "target"
    (root / "sub").mkdir(parents=True)
    os.mknod(root / "sub/disk", 0o666 | stat.S_IFBLK, os.makedev(254, 0))
    os.mknod(root / "tty", 0o666 | stat.S_IFCHR, os.makedev(5, 0))
    (root / "sgid").write_bytes(b"x")
    (root / "sgid").chmod(0o2755)
    outside = tmp_path / "outside"
    outside.write_bytes(b"y")
    outside.chmod(0o4755)
    (root / "link").symlink_to(outside)
    done = clear_privileges(root)
    assert sorted(done) == ["cleared the setuid/setgid bits of sgid",
                            "removed the device node sub/disk", "removed the device node tty"]
    assert os.listdir(root / "sub") == [] and not (root / "tty").exists()
    assert (root / "sgid").stat().st_mode & 0o7777 == 0o755
    assert outside.stat().st_mode & 0o7777 == 0o4755  # the link was not followed


def exchange(agent: AgentProcess, lines: list[bytes]) -> list[dict]:  # type: ignore[type-arg]
    """Send lines on one connection; every answer the agent gives."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(agent.root / "run/agent.sock"))
        try:
            s.sendall(b"".join(line + b"\n" for line in lines))
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_the_request_lines_that_ended_the_agent_get_errors(agent: AgentProcess) -> None:
    agent.start()
    digits = b'{"id":' + b"7" * 5000 + b',"op":"ping"}'
    brackets = b"[" * 30000 + b"]" * 30000
    replies = exchange(agent, [digits, brackets, b'{"id": 3, "op": "ping"}'])
    assert [r["ok"] for r in replies] == [False, False, True]
    assert "longer than 20 digits" in replies[0]["error"]["message"]
    assert "nested deeper than 32" in replies[1]["error"]["message"]
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.efci("status").returncode == 0


SAFE_REQUESTS = [
    b'{"id": 1, "op": "ping"}', b'{"id": "a", "op": "status"}', b'{"id": 2, "op": "tasks"}',
    b'{"id": 3, "op": "runs", "args": {"limit": 5}}', b'{"id": 4, "op": "show", '
    b'"args": {"run": 1}}', b'{"id": 5, "op": "logs", "args": {"run": 1, "tail": 3}}',
    b'{"id": 6, "op": "images"}', b'{"id": 7, "op": "key_list"}',
    b'{"id": 8, "op": "firewall_status"}',
]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b"1e999", b"-0", b"null", b"true",
          b"\xff", b"\x00", b"\\u0000", b"\\ud800", b"9" * 30, b"NaN", b"\xe2\x80\xae",
          b'"op"', b'"args"', b'"id"', b"[" * 40, b"{\"a\":" * 40]


def mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        choice = rng.random()
        if choice < 0.3 and data:
            data[min(at, len(data) - 1)] = rng.randint(0, 255)
        elif choice < 0.6:
            data[at:at] = rng.choice(TOKENS)
        elif data:
            del data[at:at + rng.randint(1, 8)]
    return bytes(data).replace(b"\n", b" ")


def test_a_fuzz_of_requests_never_ends_the_agent(agent: AgentProcess) -> None:
    """3,000 random and mutated lines, on 30 connections: each gets one
    answer (or the connection is closed for a line too long), none ends
    the agent, and it still answers afterwards."""
    agent.declare("t.yml", f"tasks:\n  hello: {{image: {BASE_IMAGE}, command: [echo, hi]}}\n")
    agent.start()
    assert agent.efci("run", "--follow", "hello").returncode == 0
    rng = random.Random(20261129)  # noqa: S311 - a fuzz seeded to repeat, not a secret
    deadline = time.monotonic() + 240
    for _ in range(30):
        assert time.monotonic() < deadline, "the fuzz took too long"
        lines = []
        for _ in range(100):
            kind = rng.random()
            if kind < 0.6:
                lines.append(mutate(rng, rng.choice(SAFE_REQUESTS)))
            elif kind < 0.8:
                lines.append(bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 200)))
                             .replace(b"\n", b" "))
            else:
                lines.append(b"".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 60))))
        lines = [line for line in lines if line.strip()]
        replies = exchange(agent, lines)
        assert len(replies) == len(lines), (len(replies), len(lines))
        assert all("ok" in r for r in replies)
        assert not any("failed unexpectedly" in json.dumps(r) for r in replies)
        assert agent.proc is not None and agent.proc.poll() is None
    assert json.loads(agent.efci("--json", "status").stdout)["pid"] == agent.proc.pid
    assert "Traceback" not in agent.log.read_text()


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_still_forks(
        agent: AgentProcess) -> None:
    agent.declare("t.yml", f"""
tasks:
  bomb:
    image: {BASE_IMAGE}
    time_limit: 20s
    command: "bomb() {{ bomb | bomb & }}; bomb; sleep 30"
""")
    agent.start()
    run = json.loads(agent.efci("--json", "run", "bomb").stdout)["id"]
    wait_for(lambda: agent.containers(running=True), what="the bomb's container")
    time.sleep(5)  # the bomb has reached its limit by now
    for _ in range(20):  # the host's own programs still start
        assert subprocess.run(["true"], check=False, timeout=30).returncode == 0
    assert agent.efci("status").returncode == 0
    wait_for(lambda: show(agent, run)["status"] != "running", timeout=120, what="its end")
    record = show(agent, run)
    assert record["status"] == "timed_out", record
    assert "limit of 4096 processes (limits.pids in agent.yml)" in record["error"], record


def test_a_memory_hog_is_stopped_at_the_memory_limit_and_the_run_says_so(
        agent: AgentProcess) -> None:
    agent.declare("t.yml", f"""
tasks:
  hog:
    image: {BASE_IMAGE}
    command: [python3, -c, "chunks = []\\nwhile True: chunks.append(b'x' * (256 << 20))"]
""")
    agent.start()
    result = agent.efci("run", "--follow", "hog", check=False, timeout=300)
    record = show(agent, 1)
    assert (result.returncode, record["status"], record["exit_code"]) == (137, "failed", 137)
    assert "OOM killer" in record["error"] and "memory limit of 4GiB" in record["error"]


def test_a_declaration_s_own_limits_bind_and_are_named(agent: AgentProcess) -> None:
    """Limits from the declaration, not agent.yml's defaults: the memory hog
    stops at 64MiB, the fork bomb at 128 processes, each message naming the
    limit, its value and the declaration's line; --cpus reaches docker."""
    agent.declare("t.yml", f"""
tasks:
  hog:
    image: {BASE_IMAGE}
    limits: {{memory: 64MiB, cpus: 0.5}}
    command: [python3, -c, "chunks = []\\nwhile True: chunks.append(b'x' * (16 << 20))"]
  bomb:
    image: {BASE_IMAGE}
    time_limit: 10s
    limits: {{pids: 128}}
    command: "bomb() {{ bomb | bomb & }}; bomb; sleep 30"
""")
    agent.start()
    agent.efci("run", "--follow", "hog", check=False, timeout=300)
    record = show(agent, 1)
    assert (record["status"], record["exit_code"]) == ("failed", 137), record
    conf = agent.conf_d / "t.yml"
    assert re.search(rf"memory limit of 64MiB \(limits.memory in {conf}:\d+\)",
                     record["error"]), record
    nano_cpus = subprocess.run(["docker", "inspect", "--format", "{{.HostConfig.NanoCpus}}",
                                record["container_id"]], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert nano_cpus == "500000000"
    agent.efci("run", "--follow", "bomb", check=False, timeout=300)
    record = show(agent, 2)
    assert re.search(rf"limit of 128 processes \(limits.pids in {conf}:\d+\)",
                     record["error"]), record


def test_a_declaration_past_agent_yml_s_maxima_is_refused(agent: AgentProcess) -> None:
    agent.configure("limits: {memory: 512MiB, max_memory: 1GiB}\n")
    agent.declare("t.yml", f"tasks:\n  big:\n    image: {BASE_IMAGE}\n"
                           "    limits: {memory: 2GiB}\n")
    agent.start()
    st = json.loads(agent.efci("--json", "status").stdout)
    assert any("2GiB is more than this agent allows: at most 1GiB (limits.max_memory in "
               "agent.yml)" in e for e in st["declarations"]["errors"].values()), st
    refused = agent.efci("run", "big", check=False)
    assert refused.returncode != 0 and b"no task 'big'" in refused.stderr
