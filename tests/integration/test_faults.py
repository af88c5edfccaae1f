"""Faults of the host under a running agent: a state filesystem that fills
up, and dockerd going away in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from .conftest import BASE_IMAGE, AgentProcess
from .test_agent import show, wait_for

REPO = Path(__file__).parents[2]

FLOOD = f"""
tasks:
  flood:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "head -c 50000000 /dev/zero | tr '\\\\0' x; echo; echo done"]
  small:
    image: {BASE_IMAGE}
    command: ["echo", "small"]
"""


def test_a_full_state_disk_ends_the_run_honestly_and_loses_nothing_silently(
        agent: AgentProcess) -> None:
    """A 20 MB state filesystem and a task printing 50 MB: the run ends (not
    stuck running) with an error that says how much of its log was lost and
    why, never a success; the agent stays up and refuses clearly; once
    space is freed the state store takes the run's end, and a restart keeps
    it."""
    state = agent.root / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "efci-test-full", str(state)],
                   check=True)
    try:
        agent.declare("t.yml", FLOOD)
        agent.start()
        result = agent.efci("run", "--follow", "flood", check=False, timeout=300)
        assert result.returncode == 1, result.stderr
        wait_for(lambda: show(agent, 1)["status"] != "running", what="the run's end")
        record = show(agent, 1)
        assert record["status"] == "error", record
        assert "bytes of its log could not be written (No space left on device" in \
            record["error"], record
        assert "the task exited with status 0" in record["error"]
        cancel = agent.efci("cancel", "1", check=False)
        assert cancel.returncode == 75 and b"(it is error)" in cancel.stderr, cancel.stderr
        again = agent.efci("run", "--follow", "small", check=False, timeout=300)
        assert again.returncode != 0 and b"free space" in again.stderr, again.stderr
        assert b"failed unexpectedly" not in again.stderr + again.stdout
        assert b"internal error" not in again.stderr + again.stdout

        db = sqlite3.connect(state / "state.db")  # consistent even while full
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()
        subprocess.run(["mount", "-o", "remount,size=200m", str(state)], check=True)
        wait_for(lambda: "not saved yet" not in (show(agent, 1)["error"] or ""),
                 what="the run's end to be saved")
        assert agent.stop() == 0
        agent.start()
        record = show(agent, 1)
        assert record["status"] == "error" and "could not be written" in record["error"]
        kept = agent.efci("logs", "--raw", "1").stdout
        assert len(kept) > 1_000_000 and kept.strip(b"x") == b"", len(kept)
        assert agent.efci("run", "--follow", "small").returncode == 0
        assert "Traceback" not in agent.log.read_text()
    finally:
        agent.cleanup()
        subprocess.run(["umount", "--lazy", str(state)], check=False)


def restart_dockerd() -> None:
    """Stop dockerd and start it again the way this machine runs it."""
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "docker"], check=True, timeout=120)
        return
    pid = int(subprocess.run(["pidof", "dockerd"], capture_output=True, check=True)
              .stdout.split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run([str(REPO / "scripts/ensure-dockerd")], check=True, timeout=120)


def test_dockerd_going_away_during_a_run_is_said_plainly(agent: AgentProcess) -> None:
    """The run in progress fails with the reason in words; the agent stays
    up, and once dockerd is back runs the next run (on the task bridge, its
    rules checked again first)."""
    agent.declare("t.yml", f"tasks:\n  sleeper: {{image: {BASE_IMAGE}, command: [sleep, '600']}}\n"
                           f"  bridged: {{image: {BASE_IMAGE}, command: [echo, back]}}\n")
    agent.start()
    run = json.loads(agent.efci("--json", "run", "sleeper").stdout)["id"]
    wait_for(lambda: agent.containers(running=True), what="the container")
    try:
        restart_dockerd()
        wait_for(lambda: show(agent, run)["status"] != "running", timeout=120, what="its end")
    finally:
        subprocess.run([str(REPO / "scripts/ensure-dockerd")], check=True, timeout=120)
    record = show(agent, run)
    assert record["status"] == "error", record
    assert record["error"].startswith("dockerd stopped answering during the run"), record
    assert "docker container inspect" not in record["error"]
    assert agent.efci("status").returncode == 0  # the agent itself carried on
    again = agent.efci("run", "--follow", "bridged", check=False, timeout=300)
    assert again.returncode == 0 and again.stdout == b"back\r\n", again.stderr
    assert json.loads(agent.efci("--json", "status").stdout)["network"]["problems"] == []
