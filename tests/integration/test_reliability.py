"""Reliability under load and faults: the durable queue, the drain on a
graceful stop, the wait for free space, idle and surplus clients, the
limit on a run's writable layers."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from agent.host.mounts import mounted_under

from .conftest import BASE_IMAGE, AgentProcess, Setup, task
from .test_agent import show, wait_for
from .test_logs import efci_argv
from .test_worktrees import make_repo

TASKS = f"""
tasks:
  sleeper:
    image: {BASE_IMAGE}
    command: ["sleep", "600"]
  short:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "sleep 3; echo short done"]
  quick:
    image: {BASE_IMAGE}
    network: none
    command: ["echo", "quick"]
  second:
    image: {BASE_IMAGE}
    network: none
    command: ["sh", "-c", "sleep 1; echo second"]
"""


def start(agent: AgentProcess, task: str) -> int:
    return int(json.loads(agent.efci("--json", "run", task).stdout)["id"])


def status(agent: AgentProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(agent.efci("--json", "status").stdout)


def test_queued_runs_survive_a_kill_9_and_start_after_it_in_order(agent: AgentProcess) -> None:
    agent.configure("runs: {max_parallel: 1}\n")
    agent.declare("t.yml", TASKS)
    agent.start()
    running = start(agent, "sleeper")
    wait_for(lambda: show(agent, running)["status"] == "running", what="the sleeper")
    queued = [start(agent, "quick") for _ in range(4)]
    listed = {r["id"]: r for r in json.loads(agent.efci("--json", "runs").stdout)}
    assert [listed[r]["queue_position"] for r in queued] == [1, 2, 3, 4]
    assert listed[running]["queue_position"] is None
    assert "queued #2" in agent.efci("runs").stdout.decode()
    cancelled = json.loads(agent.efci("--json", "cancel", str(queued[1])).stdout)
    assert cancelled["status"] == "cancelled" and cancelled["error"] == "cancelled by uid 0"
    assert show(agent, queued[2])["queue_position"] == 2

    agent.stop(signal.SIGKILL)
    agent.start()
    # The sleeper runs on, re-attached, in its slot; the queue waits behind it.
    assert show(agent, running)["status"] == "running"
    assert [show(agent, r)["queue_position"] for r in (queued[0], *queued[2:])] == [1, 2, 3]
    agent.efci("cancel", str(running))
    kept = [queued[0], *queued[2:]]
    wait_for(lambda: all(show(agent, r)["status"] == "succeeded" for r in kept),
             what="the queued runs to run after the restart")
    starts = [show(agent, r)["started_at"] for r in kept]
    assert starts == sorted(starts), "they started in the order they were queued"
    assert show(agent, queued[1])["status"] == "cancelled"
    log = agent.efci("logs", str(queued[0])).stderr.decode()
    assert "still queued: the agent restarted (position 1)" in log and "quick" in \
        agent.efci("logs", str(queued[0])).stdout.decode()


def test_the_queue_refuses_past_its_length(agent: AgentProcess) -> None:
    agent.configure("runs: {max_parallel: 1, max_queued: 2}\n")
    agent.declare("t.yml", TASKS)
    agent.start()
    running = start(agent, "sleeper")
    wait_for(lambda: show(agent, running)["status"] == "running", what="the sleeper")
    start(agent, "quick")
    start(agent, "quick")
    refused = agent.efci("run", "quick", check=False)
    assert refused.returncode == 75, refused.stderr
    assert b"the queue is full: 2 runs wait for one of 1 slots (runs.max_queued" in \
        refused.stderr
    assert len(json.loads(agent.efci("--json", "runs").stdout)) == 3  # no record made


def test_a_hundred_runs_at_once_run_max_parallel_at_a_time(agent: AgentProcess) -> None:
    """100 requests at once: 4 run at a time, the others queue, all succeed,
    and the socket keeps answering meanwhile (its slowest answer printed)."""
    agent.configure("runs: {max_parallel: 4}\n")
    agent.declare("t.yml", TASKS)
    agent.start()
    ids: list[int] = []
    errors: list[BaseException] = []

    def request() -> None:
        try:
            with agent.client() as client:
                ids.append(client.call("run", {"task": "second"})["id"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=request) for _ in range(100)]
    for t in threads:
        t.start()
    at_once, slowest = 0, 0.0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        asked = time.monotonic()
        with agent.client() as client:
            st = client.call("status")
        slowest = max(slowest, time.monotonic() - asked)
        running = set(st["active_runs"]) - set(st["queued_runs"])
        assert len(running) <= 4, st
        at_once = max(at_once, len(running))
        if not st["active_runs"] and not any(t.is_alive() for t in threads):
            break
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(ids) == 100 and at_once == 4
    records = json.loads(agent.efci("--json", "runs", "--limit", "200").stdout)
    assert sorted(r["status"] for r in records) == ["succeeded"] * 100
    print(f"\nslowest efci status answer while 100 runs came and went: {slowest * 1000:.0f} ms")


def test_a_graceful_stop_drains_and_keeps_the_queue(agent: AgentProcess) -> None:
    agent.configure("runs: {max_parallel: 1, drain: 60s}\n")
    agent.declare("t.yml", TASKS)
    agent.start()
    running = start(agent, "short")
    wait_for(lambda: show(agent, running)["status"] == "running", what="the short run")
    waiting = start(agent, "quick")
    assert agent.stop(signal.SIGTERM, drain=True) == 0
    record = show_stopped(agent, running)
    assert record["status"] == "succeeded", record  # it was let finish
    assert show_stopped(agent, waiting)["status"] == "queued"
    agent.start()
    wait_for(lambda: show(agent, waiting)["status"] == "succeeded", what="the queued run")

    agent.stop(signal.SIGTERM, drain=True)
    agent.configure("runs: {drain: 1s}\n")
    agent.start()
    long = start(agent, "sleeper")
    wait_for(lambda: show(agent, long)["status"] == "running", what="the sleeper")
    assert agent.stop(signal.SIGTERM, drain=True) == 0
    record = show_stopped(agent, long)
    assert (record["status"], record["error"]) == (
        "cancelled", "the agent is stopping (runs.drain of 1s ran out)")
    assert agent.containers(running=True) == []


def show_stopped(agent: AgentProcess, run: int) -> dict:  # type: ignore[type-arg]
    """A run's record while no agent runs: straight from the state store."""
    db = sqlite3.connect(agent.root / "state/state.db")
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone())
    finally:
        db.close()


def test_runs_wait_queued_while_a_disk_is_nearly_full(agent: AgentProcess) -> None:
    logs = agent.root / "logs"
    logs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "efci-test-space", str(logs)],
                   check=True)
    try:
        agent.configure(f"paths: {{logs: {logs}}}\nruns: {{min_free: 1GiB}}\n")
        agent.declare("t.yml", TASKS)
        agent.start()
        filler = logs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=60"],
                       check=True, capture_output=True)
        run = start(agent, "quick")
        wait_for(lambda: status(agent)["short_of_space"], what="the agent to notice")
        st = status(agent)
        assert f"logs ({logs}) has" in st["short_of_space"][0]
        assert "less than 6.4 MiB (runs.min_free, or a tenth of its filesystem)" in \
            st["short_of_space"][0], st
        time.sleep(2)
        assert show(agent, run)["status"] == "queued"
        assert b"WAITING:      queued runs wait for free space" in agent.efci("status").stdout
        filler.unlink()
        wait_for(lambda: show(agent, run)["status"] == "succeeded", what="the run, with space")
        assert status(agent)["short_of_space"] == []
        log = agent.efci("logs", str(run)).stderr.decode()
        assert "waiting for free space: logs" in log and "there is free space again" in log
    finally:
        agent.cleanup()
        subprocess.run(["umount", "--lazy", str(logs)], check=False)


def test_idle_clients_hold_nothing_and_surplus_ones_are_told(agent: AgentProcess) -> None:
    """500 clients that connect and say nothing: status still answers, they
    are dropped when idle too long, and the agent's memory and descriptors
    come back; past socket.max_connections a client gets an error."""
    agent.configure("socket: {max_connections: 520, idle_timeout: 20s}\n")
    agent.declare("t.yml", TASKS)
    agent.start()
    before = status(agent)
    idle = []
    try:
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(agent.root / "run/agent.sock"))
            idle.append(s)
        during = wait_for(lambda: (st := status(agent))["open_files"] >= before["open_files"]
                          + 500 and st, what="the agent to hold the 500 connections")
        surplus = []
        for _ in range(25):  # 520 allowed: the last few of these are told
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(agent.root / "run/agent.sock"))
            surplus.append(s)
        readable, _, _ = select.select(surplus, [], [], 3)
        told = sum(b"clients connected, its limit (socket.max_connections" in s.recv(65536)
                   for s in readable)
        assert 1 <= told <= 5 and told == len(readable), (told, len(readable))
        for s in surplus:
            s.close()
        assert agent.efci("run", "--follow", "quick").returncode == 0
        for s in idle:  # the idle timeout closes them from the agent's side
            s.settimeout(60)
            assert s.recv(1) == b""
        after = wait_for(lambda: (st := status(agent))["open_files"] <= before["open_files"]
                         + 10 and st, what="the descriptors to come back")
        assert after["memory"] < before["memory"] + (32 << 20), (before, during, after)
        assert "disconnected a client" in agent.log.read_text()
    finally:
        for s in idle:
            s.close()


def test_kill_9_during_a_checkout_leaves_one_status_and_a_usable_worktree(
        setup: Setup) -> None:
    """The agent dies while the checkout container clones: the run is
    settled once, with the reason; nothing stays mounted or running; the
    next run of the task checks the worktree out again and succeeds."""
    make_repo(setup)
    setup.server.commit("lib", {"big.bin": os.urandom(96 << 20)}, "a big file")
    setup.declare({"look": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["sh", "-c", "ls -l /src/lib/big.bin | wc -l"])})
    agent = setup.agent
    run = start(agent, "look")
    wait_for(lambda: b"checkout" in agent.efci("logs", str(run)).stderr.lower(),
             what="the checkout to start")
    agent.stop(signal.SIGKILL)
    agent.start()
    record = show(agent, run)
    assert record["status"] == "cancelled", record
    assert record["error"] == "the agent stopped before the run's container ran"
    assert b"cancelled: the agent stopped" in agent.efci("logs", str(run)).stderr
    assert mounted_under(agent.root) == []
    wait_for(lambda: not agent.containers(running=True), what="the checkout container's end")
    status, again = setup.run("look")
    assert (status, again["status"]) == (0, "succeeded"), again
    assert setup.output(again["id"]) == b"1\r\n"


def test_kill_9_around_a_run_s_end_settles_it_once(agent: AgentProcess) -> None:
    """Killed at several points of a short run's end (the container exiting,
    its log closing, teardown): each run ends with exactly one final status
    in its record and its log, never stuck, never a success it cannot vouch
    for, and with its output whole when it succeeded."""
    agent.declare("t.yml", TASKS)
    agent.start()
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5):
        run = start(agent, "second")  # sleeps 1 s, prints, exits
        time.sleep(delay)
        agent.stop(signal.SIGKILL)
        agent.start()
        record = wait_for(lambda r=run: (x := show(agent, r))["status"] not in (
            "queued", "running") and x, what=f"run {run}'s end")
        assert record["status"] in ("succeeded", "error", "cancelled"), record
        log = subprocess.run([*efci_argv(agent), "--json", "logs", str(run)],
                             capture_output=True, check=True).stdout.splitlines()
        finals = [json.loads(base64.b64decode(r["data"]))["status"]
                  for r in map(json.loads, log[:-1]) if r["kind"] == "status"]
        finals = [s for s in finals if s not in ("running", "queued")]
        assert finals == [record["status"]], (delay, finals, record)
        if record["status"] == "succeeded":
            assert agent.efci("logs", "--raw", str(run)).stdout == b"second\r\n"
        assert mounted_under(agent.root) == []


def test_writes_past_the_disk_limit_stop_the_run_and_say_so(setup: Setup) -> None:
    """limits.disk counts what a run writes under /src (its upper layers)
    and elsewhere in its container (docker's writable layer): a task that
    writes past it is stopped, its error naming the limit and where it was
    set; the base worktree and the host keep nothing of it; a task within
    its limit succeeds."""
    make_repo(setup)
    setup.agent.configure("limits: {disk: 48MiB}\n")
    setup.agent.stop()
    setup.agent.start()
    # 4 MiB a step, a quarter second apart, for at most 400 MiB: the
    # watchdog stops it long before, whatever this machine's disk speed.
    fill = ('i=0; while [ $i -lt 100 ]; do head -c 4194304 /dev/zero >> "$1"; '
            'i=$((i+1)); sleep 0.25; done; echo "wrote it all"')
    repo = {"repositories": [setup.entry("lib", "main", mutable=True)]}
    setup.declare({
        "into-src": task(checkout=repo, command=["sh", "-c", fill, "-", "/src/lib/fill"],
                         limits={"disk": "32MiB"}),
        "into-tmp": task(command=["sh", "-c", fill, "-", "/var/tmp/fill"]),
        "within": task(checkout=repo, command=["sh", "-c",
                                               "head -c 16777216 /dev/zero > /src/lib/f; "
                                               "head -c 16777216 /dev/zero > /tmp/f; echo fits"]),
    })
    conf = setup.agent.root / "etc/conf.d/tasks.yml"
    for name, limit, where in [("into-src", "32MiB", rf"{conf}:\d+"),
                               ("into-tmp", "48MiB", "agent.yml")]:
        status, record = setup.run(name)
        assert status != 0 and record["status"] == "failed", record
        assert re.search(r"its writable layers \(its changes under /src and to its container\) "
                         rf"took [0-9.]+ MiB, past its limit of {limit} \(limits.disk in {where}\)",
                         record["error"]), record["error"]
        assert b"wrote it all" not in setup.output(record["id"])
    status, record = setup.run("within")
    assert (status, record["status"]) == (0, "succeeded"), record
    assert setup.output(record["id"]).endswith(b"fits\r\n")
    base = subprocess.run(["docker", "volume", "inspect", "--format", "{{.Mountpoint}}",
                           setup.volumes[0]], capture_output=True, text=True, check=True)
    assert not (Path(base.stdout.strip()) / "fill").exists()  # the base never saw it
