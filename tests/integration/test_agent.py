"""The agent end to end: a real daemon, real containers, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import BASE_IMAGE, AgentProcess

HELLO = f"""
tasks:
  hello:
    image: {BASE_IMAGE}
    command:
      - sh
      - -c
      - "echo hello from a task; printf '\\\\033[32mgreen\\\\033[0m\\\\n'; exit 3"
  bytes:
    image: {BASE_IMAGE}
    command: ["printf", "\\\\377\\\\376 not utf-8\\\\000NUL\\\\r\\\\rprogress\\\\r\\\\n"]
  ticker:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "for i in $(seq 1 20); do echo tick $i; sleep 0.1; done"]
  sleeper:
    image: {BASE_IMAGE}
    command: ["sleep", "600"]
  limited:
    image: {BASE_IMAGE}
    command: ["sleep", "600"]
    time_limit: 2s
"""


def wait_for(predicate, timeout: float = 60, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def show(agent: AgentProcess, run: int) -> dict:  # type: ignore[type-arg]
    return json.loads(agent.efci("--json", "show", str(run)).stdout)


def container_status(container: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", "{{.State.Status}}", container],
                          capture_output=True, check=True).stdout.decode().strip()


@pytest.fixture
def hello(agent: AgentProcess) -> AgentProcess:
    agent.declare("hello.yml", HELLO)
    agent.start()
    return agent


def test_run_follow_prints_output_and_exits_like_the_task(hello: AgentProcess) -> None:
    result = hello.efci("run", "--follow", "hello", check=False)
    assert result.returncode == 3
    # The container's own terminal turns LF into CR LF, as any terminal does;
    # our raw host PTY adds nothing (no CR CR LF).
    assert result.stdout == b"hello from a task\r\n\x1b[32mgreen\x1b[0m\r\n"
    assert b"failed, exit status 3" in result.stderr
    run = show(hello, 1)
    assert (run["status"], run["exit_code"], run["task"]) == ("failed", 3, "hello")
    assert (run["requested_uid"], run["image"]) == (0, BASE_IMAGE)
    assert run["image_id"].startswith("sha256:") and run["finished_at"] >= run["started_at"]
    # the container is kept, stopped, as the seed's lifecycle wants
    assert container_status(run["container_id"]) == "exited"


def test_logs_are_byte_exact(hello: AgentProcess) -> None:
    assert hello.efci("run", "--follow", "bytes").returncode == 0
    expected = b"\xff\xfe not utf-8\x00NUL\r\rprogress\r\r\n"  # the tty's ONLCR
    assert hello.efci("logs", "1").stdout == expected
    assert hello.efci("logs", "--raw", "1").stdout == expected


def test_output_that_cannot_be_written_is_said_so(hello: AgentProcess) -> None:
    """efci ends without the interpreter's teardown: what it printed is
    flushed before, and a failure to write is reported, not lost at exit."""
    assert hello.efci("run", "--follow", "bytes").returncode == 0
    logs = [sys.executable, "-m", "agent", "--root", str(hello.root), "logs", "1"]
    with open("/dev/full", "wb") as full:
        result = subprocess.run(logs, stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 74
    assert result.stderr.endswith(b"\nefci: No space left on device\n"), result.stderr
    reader, writer = os.pipe()
    os.close(reader)  # efci logs RUN | head, head gone
    try:
        result = subprocess.run(logs, stdout=writer, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(writer)
    assert result.returncode == 141
    assert b"efci: container" in result.stderr and b"Traceback" not in result.stderr  # nothing more


def test_a_follower_started_mid_run_gets_the_same_bytes_as_a_replay(hello: AgentProcess) -> None:
    run = json.loads(hello.efci("--json", "run", "ticker").stdout)["id"]
    wait_for(lambda: show(hello, run)["log_size"] > 0, what="first output")
    followed = hello.efci("logs", "--follow", str(run)).stdout
    assert show(hello, run)["status"] == "succeeded"
    assert followed == hello.efci("logs", str(run)).stdout
    assert followed == b"".join(b"tick %d\r\n" % i for i in range(1, 21))


def test_time_limit_stops_the_container(hello: AgentProcess) -> None:
    result = hello.efci("run", "--follow", "limited", check=False)
    assert result.returncode == 124
    run = show(hello, 1)
    assert run["status"] == "timed_out" and "time limit of 2s" in run["error"]
    assert container_status(run["container_id"]) == "exited"
    assert b"time limit of 2s reached" in hello.efci("logs", "1").stderr


def test_cancel_stops_the_container_and_records_who(hello: AgentProcess) -> None:
    hello.efci("run", "sleeper")
    wait_for(lambda: show(hello, 1)["status"] == "running" and hello.containers(running=True),
             what="container running")
    result = json.loads(hello.efci("--json", "cancel", "1").stdout)
    assert result["status"] == "cancelled" and result["error"] == "cancelled by uid 0"
    assert hello.containers(running=True) == []
    again = hello.efci("cancel", "1", check=False)
    assert again.returncode == 75 and b"not active (it is cancelled)" in again.stderr


def test_sigterm_cancels_runs_cleanly_and_removes_the_socket(hello: AgentProcess) -> None:
    hello.efci("run", "sleeper")
    wait_for(lambda: hello.containers(running=True), what="container running")
    assert hello.stop(signal.SIGTERM) == 0
    assert hello.containers(running=True) == []
    assert not (hello.root / "run/agent.sock").exists()
    hello.start()
    run = show(hello, 1)
    assert run["status"] == "cancelled" and run["error"] == "the agent is stopping"


def test_recovery_after_the_agent_is_killed(hello: AgentProcess) -> None:
    """A run whose container outlives a killed agent is re-attached to and
    can be cancelled as usual; one whose container ended meanwhile gets its
    real end and its whole output, from docker's copy."""
    hello.efci("run", "sleeper")
    wait_for(lambda: hello.containers(running=True), what="container running")
    hello.stop(signal.SIGKILL)
    assert hello.containers(running=True), "the container outlives a killed agent"
    hello.start()  # stale socket replaced; recovery re-attaches
    run = show(hello, 1)
    assert run["status"] == "running" and hello.containers(running=True)
    assert b"re-attached to container" in hello.efci("logs", "1").stderr
    cancelled = json.loads(hello.efci("--json", "cancel", "1").stdout)
    assert cancelled["status"] == "cancelled" and hello.containers(running=True) == []

    hello.efci("run", "ticker")  # 2 s of ticks
    wait_for(lambda: hello.containers(running=True), what="the ticker running")
    hello.stop(signal.SIGKILL)
    time.sleep(4)  # it ends while no agent runs
    hello.start()
    run = wait_for(lambda: (r := show(hello, 2))["status"] != "running" and r, what="its end")
    assert (run["status"], run["exit_code"]) == ("succeeded", 0), run
    assert hello.efci("logs", "--raw", "2").stdout == b"".join(
        b"tick %d\r\n" % i for i in range(1, 21))


BAD_DECLARATIONS = {
    "malformed YAML": ("tasks:\n  hello: {image: [oops\n", 3,
                       "while parsing a flow sequence at line 2"),
    "alias bomb": ("a: &a [x, x]\nb: &b [*a, *a]\ntasks: {}\n", 1, "anchors and aliases"),
    "duplicate key": (f"tasks:\n  hello: {{image: {BASE_IMAGE}}}\n  hello: {{image: x}}\n", 3,
                      "duplicate key"),
    "YAML 1.1 no": (f"tasks:\n  hello:\n    image: {BASE_IMAGE}\n    command: [echo, no]\n", 4,
                    "quotes"),
    "octal": (f"tasks:\n  hello:\n    image: {BASE_IMAGE}\n    env: {{MODE: 0755}}\n", 4,
              "quotes"),
    "unknown key": (f"tasks:\n  hello:\n    image: {BASE_IMAGE}\n    privileged: true\n", 4,
                    "unknown key"),
    "missing image": ("tasks:\n  hello:\n    image: does-not-exist:1\n", 3, "neither declared"),
    "slash in name": (f"tasks:\n  a/b: {{image: {BASE_IMAGE}}}\n", 2, "task name"),
    "dots in name": (f"tasks:\n  '..': {{image: {BASE_IMAGE}}}\n", 2, "task name"),
    "space in name": (f"tasks:\n  'a b': {{image: {BASE_IMAGE}}}\n", 2, "task name"),
    "shell in name": (f"tasks:\n  '$(touch /tmp/x)': {{image: {BASE_IMAGE}}}\n", 2, "task name"),
}


def test_bad_declarations_are_refused_whole_and_the_last_good_set_stays(
        hello: AgentProcess) -> None:
    assert hello.efci("run", "--follow", "bytes").returncode == 0
    for label, (text, line, words) in BAD_DECLARATIONS.items():
        hello.declare("hello.yml", text)
        result = hello.efci("reload", check=False)
        assert result.returncode == 2, label
        assert f"hello.yml:{line}:".encode() in result.stderr, (label, result.stderr)
        assert words.encode() in result.stderr, (label, result.stderr)
        status = hello.efci("status", check=False)
        assert status.returncode == 2 and b"REFUSED" in status.stdout, label
        tasks = json.loads(hello.efci("--json", "tasks").stdout)
        assert {t["name"] for t in tasks} >= {"hello", "bytes"}, label
    # the agent still runs tasks and nothing stored was lost
    assert hello.efci("run", "--follow", "bytes").returncode == 0
    assert [r["id"] for r in json.loads(hello.efci("--json", "runs").stdout)] == [2, 1]
    hello.declare("hello.yml", HELLO)
    assert hello.efci("reload").returncode == 0
    assert hello.efci("status").returncode == 0


def test_unknown_task_and_run(hello: AgentProcess) -> None:
    result = hello.efci("run", "nope", check=False)
    assert result.returncode == 66 and b"no task 'nope'" in result.stderr
    assert b"hello" in result.stderr  # it lists what there is
    result = hello.efci("show", "99", check=False)
    assert result.returncode == 66 and b"no run 99" in result.stderr


def raw_exchange(agent: AgentProcess, payload: bytes) -> list[dict]:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(agent.root / "run/agent.sock"))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the agent refused the rest and closed; its answer is readable
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_bad_socket_requests_get_structured_errors(hello: AgentProcess) -> None:
    replies = raw_exchange(hello, b'not json\n{"id": 2, "op": "format-disk"}\n'
                                  b'{"id": 3, "op": "show", "args": {"run": "1"}}\n'
                                  b'{"id": 4, "op": "ping"}\n')
    assert [r["id"] for r in replies] == [None, 2, 3, 4]
    assert replies[0]["error"]["code"] == "bad_request"
    assert "not JSON" in replies[0]["error"]["message"]
    assert "unknown op 'format-disk'" in replies[1]["error"]["message"]
    assert "must be int" in replies[2]["error"]["message"]
    assert replies[3]["ok"] is True

    huge = raw_exchange(hello, b'{"id": 1, "op": "ping", "pad": "' + b"x" * (4 << 20))
    assert len(huge) == 1 and "longer than" in huge[0]["error"]["message"]
    assert hello.efci("status").returncode == 0  # still serving


def test_unreachable_agent_says_where_it_looked(tmp_path: Path) -> None:
    result = subprocess.run(["python3", "-m", "agent", "--root", str(tmp_path), "status"],
                            capture_output=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 69
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "run/agent.sock") in lines[0] and "efci agent" in lines[0]


def test_bad_agent_yml_stops_the_agent_with_file_and_line(agent: AgentProcess) -> None:
    agent.configure("runs:\n  time_limit: forever\n")
    result = agent.efci("agent", check=False)
    assert result.returncode == 78
    assert b"agent.yml:2: runs.time_limit: must be a duration" in result.stderr
    other = agent.root / "other.yml"
    other.write_text("socket:\n  mode: 0660\n")
    result = agent.efci("agent", "--config", str(other), check=False)
    assert result.returncode == 78
    assert b"other.yml:2: socket.mode: must be a string" in result.stderr


def test_socket_permissions_and_peer_credentials(agent: AgentProcess) -> None:
    """Mode 0660 and the admin group decide who may connect; the peer's uid
    (from SO_PEERCRED, not from anything the client says) is recorded."""
    run_dir = Path(tempfile.mkdtemp(prefix="efci-test-", dir="/run"))
    try:
        run_dir.chmod(0o755)
        sock = run_dir / "agent.sock"
        agent.configure(f"socket:\n  path: {sock}\n  group: nogroup\n  mode: \"0660\"\n")
        agent.declare("hello.yml", HELLO)
        agent.start(wait=False)
        wait_for(sock.exists, what="socket")
        assert sock.stat().st_mode & 0o777 == 0o660 and sock.stat().st_gid == 65534

        # The client, where an unprivileged user can read it, run by Debian's python3.
        shutil.copytree(Path(__file__).parents[2] / "agent", run_dir / "lib/agent")

        def efci_as(uid: int, gid: int, *args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                 "/usr/bin/python3", "-m", "agent", "--socket", str(sock), *args],
                capture_output=True, check=False, timeout=120, cwd="/",
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(run_dir / "lib")})

        member = efci_as(65534, 65534, "--json", "run", "--follow", "bytes")
        assert member.returncode == 0, member.stderr
        record = json.loads(agent.efci("--socket", str(sock), "--json", "show", "1").stdout)
        assert (record["requested_uid"], record["requested_gid"]) == (65534, 65534)

        outsider = efci_as(1, 1, "status")
        assert outsider.returncode == 69
        assert b"permission denied on the agent's socket" in outsider.stderr, outsider.stderr
        assert b"of the group nogroup" in outsider.stderr  # the agent runs: say so
        assert b"systemctl start" not in outsider.stderr
    finally:
        agent.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("ref", [
    "main", "feature/x", "-x", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
    "/a", "a/", "a//b", "a.", ".a", "a/.b", "a.lock", "a@{1}", "@", "a\x7fb", "v1.0",
])
def test_ref_rules_agree_with_git(ref: str) -> None:
    from agent.names import ref_format_problem

    git = subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref],
                         capture_output=True, check=False)
    git_ok = git.returncode == 0 and not ref.startswith("-")
    assert (ref_format_problem(ref) is None) == git_ok
