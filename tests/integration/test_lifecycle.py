"""A run's container after it ends: restarted with its state, removed;
progress reported from inside over the progress socket."""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
import time

from agent.host.mounts import mounted_under
from agent.host.pty import set_window_size

from .conftest import BASE_IMAGE, AgentProcess, Setup, task
from .test_worktrees import make_repo, upper_layer

COUNTER = ("n=$(cat /counter 2>/dev/null || echo 0); n=$((n+1)); echo $n > /counter; "
           "echo attempt $n; echo $n >> /src/lib/attempts; cat /src/lib/attempts; exit $n")

REPORT = """
import socket, sys, time
def send(line):
    s = socket.socket(socket.AF_UNIX)
    s.connect('/run/efci/progress.sock')
    s.sendall(line)
    s.close()
send(b'not json\\n' + b'x' * 10000 + b'\\n')
send(b'{"progress": 7}\\n{"progress": "half"}\\n{"evil": 1}\\n')
send(b'{"progress": 0.5, "message": "half way"}\\n')
time.sleep(1)
send(b'{"progress": 0.9}\\n{"progress": 1, "message": "linked \\\\u001b[31m"}\\n')
print('reported')
"""


def test_restart_keeps_container_state_and_upper_layer_then_rm(setup: Setup) -> None:
    make_repo(setup)
    setup.declare({"count": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["sh", "-c", COUNTER])})
    status, run = setup.run("count")
    assert status == 1 and run["attempts"] == 1
    result = setup.agent.efci("restart", "--follow", str(run["id"]), check=False)
    assert result.returncode == 2
    assert result.stdout.endswith(b"attempt 2\r\n1\r\n2\r\n"), result.stdout
    record = json.loads(setup.agent.efci("--json", "show", str(run["id"])).stdout)
    assert (record["attempts"], record["status"], record["exit_code"]) == (2, "failed", 2)
    full = setup.output(run["id"])
    assert b"attempt 1\r\n" in full and b"attempt 2\r\n" in full  # one log, both attempts
    assert mounted_under(setup.agent.root / "state/mounts") == []

    layer = upper_layer(setup, run["id"])
    assert layer.is_dir()
    setup.agent.efci("rm", str(run["id"]))
    assert not layer.parent.parent.exists()  # the run's layers
    assert subprocess.run(["docker", "inspect", run["container_id"]],
                          capture_output=True).returncode != 0
    again = setup.agent.efci("restart", str(run["id"]), check=False)
    assert again.returncode == 75 and b"efci rm removed it" in again.stderr
    assert b"attempt 2" in setup.output(run["id"])  # the log stays


def test_progress_reports_from_inside_the_container(agent: AgentProcess) -> None:
    agent.declare("t.yml", json.dumps({"tasks": {"report": {
        "image": BASE_IMAGE, "network": "none", "command": ["python3", "-c", REPORT]}}}))
    agent.start()
    assert agent.efci("run", "--follow", "report").returncode == 0
    record = json.loads(agent.efci("--json", "show", "1").stdout)
    assert (record["progress"], record["progress_message"]) == (1.0, "linked [31m")
    assert "100% linked" in agent.efci("runs").stdout.decode()
    lines = [json.loads(line) for line in agent.efci("--json", "logs", "1").stdout.splitlines()]
    statuses = [json.loads(base64.b64decode(r["data"])) for r in lines[:-1]
                if r["kind"] == "status"]
    reports = [s for s in statuses if "progress" in s]
    assert {"progress": 0.5, "message": "half way"} in reports
    assert not (agent.root / "state/progress/1").exists()


def shell(setup: Setup, run: int, line: bytes, *args: str) -> tuple[int, bytes]:
    """``efci shell RUN`` on a terminal: type ``line`` at the prompt; its
    exit status and everything the terminal showed."""
    master, slave = os.openpty()
    set_window_size(slave, 100, 30)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "--root", str(setup.agent.root),
                             "shell", str(run), *args], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    typed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not typed and out.endswith(b"# "):  # the shell's prompt: it is listening
            os.write(master, line)
            typed = True
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out


def test_shell_in_a_finished_run_sees_its_state_and_worktree(setup: Setup) -> None:
    make_repo(setup)
    setup.declare({"count": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["sh", "-c", COUNTER])})
    status, run = setup.run("count")
    assert status == 1

    status, out = shell(setup, run["id"], b"echo counter=$(cat /counter); cat /src/lib/attempts; "
                                          b"echo $((6*7)) > /src/lib/from-shell; exit 5\n")
    assert status == 5, out
    assert b"counter=1" in out and b"\r\n1\r\n" in out, out
    assert mounted_under(setup.agent.root / "state/mounts") == []
    assert subprocess.run(["docker", "image", "inspect",
                           f"efci-shell/{setup.agent.instance()}:{run['id']}"],
                          capture_output=True).returncode != 0  # cleaned up
    # what the shell wrote is in the run's upper layer, as a restart would see it
    assert (upper_layer(setup, run["id"]) / "from-shell").read_text() == "42\n"


def test_what_efci_shell_changes_is_what_restart_runs_with(setup: Setup) -> None:
    """The seed's debugging story: a task fails for want of a file outside
    /src; efci shell makes it; efci restart then succeeds.  With --discard,
    the change is thrown away."""
    setup.declare({"needs": task(command=["sh", "-c", "test -f /etc/efci-fixed && echo fixed"])})
    status, run = setup.run("needs")
    assert status == 1
    status, out = shell(setup, run["id"], b"touch /etc/efci-fixed; exit 0\n")
    assert status == 0 and b"is what `efci restart" in out, out
    again = setup.agent.efci("restart", "--follow", str(run["id"]), check=False, timeout=300)
    assert again.returncode == 0 and b"fixed" in again.stdout, again.stderr
    assert b"on the container as efci shell left it" in again.stderr
    record = json.loads(setup.agent.efci("--json", "show", str(run["id"])).stdout)
    assert (record["status"], record["attempts"], record["patched_attempt"]) == (
        "succeeded", 2, 2)

    status, other = setup.run("needs")
    assert status == 1
    status, out = shell(setup, other["id"], b"touch /etc/efci-fixed; exit 0\n", "--discard")
    assert status == 0 and b"thrown away" in out
    again = setup.agent.efci("restart", "--follow", str(other["id"]), check=False, timeout=300)
    assert again.returncode == 1 and b"efci shell left" not in again.stderr
    setup.agent.efci("rm", str(run["id"]))
    assert subprocess.run(["docker", "image", "inspect",
                           f"efci-patched/{setup.agent.instance()}:{run['id']}"],
                          capture_output=True).returncode != 0  # efci rm took it too
