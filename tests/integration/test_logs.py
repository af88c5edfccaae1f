"""The log store end to end: real containers on a TTY, the real agent."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from agent.client import RemoteError
from agent.logformat import Kind
from agent.protocol import decode_records

from .conftest import BASE_IMAGE, AgentProcess
from .test_agent import show, wait_for

GIB = 1 << 30

TASKS = f"""
tasks:
  colours:
    image: {BASE_IMAGE}
    command:
      - sh
      - -c
      - |
        printf '\\033[1;31mred\\033[0m \\033[38;5;208morange\\033[0m\\n'
        for i in 10 50 100; do printf 'progress %3d%%\\r' $i; done
        printf '\\033[2K\\033[1Adone\\n'
        printf 'bad utf-8: \\377\\376\\303\\050 nul:\\000 end\\n'
        sleep 1  # the docker client sizes the container's terminal just after start
        [ -t 1 ] && echo "stdout is a terminal of $(stty size) (rows cols), $COLUMNS x $LINES"
  line100m:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "head -c 104857600 /dev/zero | tr '\\\\0' L; echo"]
  gigabyte:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "head -c {GIB} /dev/zero | tr '\\\\0' a"]
  counting:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "seq 1 {{n}}"]
  counting_wide:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "seq 1 {{n}} | paste -d ' ' - - - - - - - - - -"]
  lines:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "for i in $(seq 1 1000); do echo line $i; done; sleep 1; echo last"]
"""


def declare(agent: AgentProcess, n: int = 3_000_000) -> None:
    agent.configure("runs:\n  log_limit: 4GiB\n")
    agent.declare("logs.yml", TASKS.replace("{n}", str(n)))
    agent.start()


def raw_log(agent: AgentProcess, run: int) -> bytes:
    return agent.efci("logs", "--raw", str(run), timeout=600).stdout


def sha256_of_stream(argv: list[str]) -> tuple[str, int]:
    """Hash a command's stdout as it streams, without holding it in memory."""
    digest, size = hashlib.sha256(), 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    assert proc.returncode == 0, argv
    return digest.hexdigest(), size


def efci_argv(agent: AgentProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent", "--root", str(agent.root), *args]


def test_colour_progress_and_invalid_utf8_pass_unharmed(agent: AgentProcess) -> None:
    declare(agent)
    assert agent.efci("run", "--follow", "colours").returncode == 0
    expected = (b"\x1b[1;31mred\x1b[0m \x1b[38;5;208morange\x1b[0m\r\n"
                b"progress  10%\rprogress  50%\rprogress 100%\r\x1b[2K\x1b[1Adone\r\n"
                b"bad utf-8: \xff\xfe\xc3\x28 nul:\x00 end\r\n"
                b"stdout is a terminal of 50 160 (rows cols), 160 x 50\r\n")
    assert raw_log(agent, 1) == expected


def test_raw_output_is_the_records_output_and_refuses_what_it_cannot_do(
        agent: AgentProcess) -> None:
    """efci logs --raw (the agent's raw output events) against the records
    themselves: whole, of one stream, from a tail; and the requests it
    refuses, each saying why."""
    declare(agent)
    assert agent.efci("run", "--follow", "lines").returncode == 0
    with agent.client() as client:
        records: list[bytes] = []
        client.call("logs", {"run": 1}, on_event=lambda m: records.extend(
            r.payload for r in decode_records(m) if r.kind is Kind.OUTPUT)
            if m["event"] == "records" else None)
        for args, words in (({"raw": True, "until": 0}, "until"),
                            ({"stream": "task"}, "give raw too"),
                            ({"raw": True, "stream": "nothing"}, "has no stream 'nothing'")):
            with pytest.raises(RemoteError, match=words):
                client.call("logs", {"run": 1, **args})
    assert raw_log(agent, 1) == b"".join(records)
    assert agent.efci("logs", "--raw", "--stream", "task", "1").stdout == b"".join(records)
    assert agent.efci("logs", "--raw", "--tail", "2", "1").stdout == b"line 1000\r\nlast\r\n"


def test_a_100_mb_line_goes_through(agent: AgentProcess) -> None:
    declare(agent)
    assert agent.efci("run", "--follow", "line100m", timeout=600).returncode == 0
    digest, size = sha256_of_stream(efci_argv(agent, "logs", "--raw", "1"))
    assert size == 100 * 2**20 + 2
    assert digest == hashlib.sha256(b"L" * (100 * 2**20) + b"\r\n").hexdigest()


def test_a_gigabyte_followed_mid_run_equals_its_replay_in_flat_memory(
        agent: AgentProcess) -> None:
    declare(agent)
    process = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
    rss_before = process.memory_info().rss
    run = json.loads(agent.efci("--json", "run", "gigabyte").stdout)["id"]
    wait_for(lambda: show(agent, run)["log_size"] > 50 << 20, timeout=300, what="50 MB")
    peak = [rss_before]
    sampling = True

    def sample() -> None:
        while sampling:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        followed = sha256_of_stream(efci_argv(agent, "logs", "--follow", "--raw", str(run)))
    finally:
        sampling = False
        sampler.join()
    assert show(agent, run)["status"] == "succeeded"
    replayed = sha256_of_stream(efci_argv(agent, "logs", "--raw", str(run)))
    expected = hashlib.sha256()
    block = b"a" * (1 << 20)
    for _ in range(1024):
        expected.update(block)
    assert followed == replayed == (expected.hexdigest(), GIB)
    assert peak[0] - rss_before < 100 << 20, f"agent grew by {(peak[0] - rss_before) >> 20} MiB"


def follow_hash(agent: AgentProcess, run: int, out: dict[int, str], key: int) -> None:
    digest = hashlib.sha256()

    def on_event(message: dict) -> None:  # type: ignore[type-arg]
        if message["event"] == "records":
            for record in decode_records(message):
                if record.kind is Kind.OUTPUT:
                    digest.update(record.payload)

    with agent.client() as client:
        client.call("logs", {"run": run, "follow": True}, on_event=on_event)
    out[key] = digest.hexdigest()


def test_fifty_followers_get_the_same_bytes(agent: AgentProcess) -> None:
    declare(agent, n=2_000_000)  # about 15 MB of numbers
    run = json.loads(agent.efci("--json", "run", "counting").stdout)["id"]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=follow_hash, args=(agent, run, results, i))
               for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    replay = hashlib.sha256(raw_log(agent, run)).hexdigest()
    expected = hashlib.sha256(b"".join(b"%d\r\n" % i for i in range(1, 2_000_001))).hexdigest()
    assert replay == expected
    assert len(results) == 50 and set(results.values()) == {expected}


def test_a_follower_that_never_reads_does_not_hold_up_the_task(agent: AgentProcess) -> None:
    declare(agent, n=20_000_000)  # about 170 MB
    process = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
    rss_before = process.memory_info().rss
    run = json.loads(agent.efci("--json", "run", "counting").stdout)["id"]
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(str(agent.root / "run/agent.sock"))
        stuck.sendall(json.dumps({"id": 1, "op": "logs",
                                  "args": {"run": run, "follow": True}}).encode() + b"\n")
        wait_for(lambda: show(agent, run)["status"] == "succeeded", timeout=600,
                 what="the run to finish while a follower is stuck")
        assert process.memory_info().rss - rss_before < 100 << 20
    assert agent.efci("status").returncode == 0


def test_kill_9_mid_write_loses_and_repeats_no_byte(agent: AgentProcess) -> None:
    """The agent is killed while a task prints at full speed: every byte
    handed to the log before stays; the container prints on; the next agent
    re-attaches, takes what it printed meanwhile from docker's copy, and the
    log ends up with every byte exactly once."""
    n = 10_000_000  # ten to a line: docker's copy holds a line per entry, slow to read back
    declare(agent, n=n)
    run = json.loads(agent.efci("--json", "run", "counting_wide").stdout)["id"]
    wait_for(lambda: show(agent, run)["log_size"] > 20 << 20, timeout=300, what="20 MB")
    with agent.client() as client:
        seen = bytearray()

        def on_event(message: dict) -> None:  # type: ignore[type-arg]
            if message["event"] == "records":
                for record in decode_records(message):
                    if record.kind is Kind.OUTPUT:
                        seen.extend(record.payload)
            if len(seen) > 10 << 20:
                raise StopIteration

        with pytest.raises(StopIteration):
            client.call("logs", {"run": run, "follow": True}, on_event=on_event)
    agent.stop(signal.SIGKILL)
    agent.start()
    wait_for(lambda: show(agent, run)["status"] != "running", timeout=600, what="its end")
    record = show(agent, run)
    assert (record["status"], record["exit_code"]) == ("succeeded", 0), record
    expected = hashlib.sha256()
    for start in range(1, n + 1, 100_000):
        expected.update(b"".join(b"%d %d %d %d %d %d %d %d %d %d\r\n" % tuple(range(i, i + 10))
                                 for i in range(start, start + 100_000, 10)))
    assert sha256_of_stream(efci_argv(agent, "logs", "--raw", str(run)))[0] == \
        expected.hexdigest()
    assert agent.efci("logs", "--raw", "--tail", "1", str(run)).stdout.endswith(
        b" %d\r\n" % n)
    head = subprocess.run(efci_argv(agent, "logs", "--raw", str(run)), capture_output=True,
                          check=True).stdout[:len(seen)]
    assert head == bytes(seen)
    messages = agent.efci("logs", str(run)).stderr
    assert b"re-attached to container" in messages and b"differs" not in messages


def test_tail_since_and_timestamps(agent: AgentProcess) -> None:
    declare(agent)
    assert agent.efci("run", "--follow", "lines").returncode == 0
    assert agent.efci("logs", "--raw", "--tail", "3", "1").stdout == \
        b"line 999\r\nline 1000\r\nlast\r\n"
    stamped = agent.efci("logs", "--raw", "--timestamps", "--tail", "2", "1").stdout
    assert re.fullmatch(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (line 1000|last)\r\n){2}",
                        stamped), stamped
    assert agent.efci("logs", "--raw", "--since", "2099-01-01", "1").stdout == b""
    assert agent.efci("logs", "--raw", "--since", "1h", "1").stdout.startswith(b"line 1\r\n")
    lines = agent.efci("--json", "logs", "--tail", "2", "1").stdout.splitlines()
    records = [r for r in map(json.loads, lines[:-1]) if r["kind"] == "output"]
    assert {r["stream"] for r in records} == {"task"}
    assert b"".join(base64.b64decode(r["data"]) for r in records) == b"line 1000\r\nlast\r\n"
    assert json.loads(lines[-1])["next"] == show(agent, 1)["log_size"]


def test_past_its_limit_a_log_keeps_head_and_tail_and_says_so(agent: AgentProcess) -> None:
    agent.configure("runs:\n  log_limit: 1MiB\n")
    agent.declare("logs.yml", f"""
tasks:
  chatty:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "seq 1 2000000; echo the end"]
""")
    agent.start()
    assert agent.efci("run", "--follow", "chatty", timeout=600).returncode == 0
    segments = list((agent.root / "state/logs/1").glob("*.seg"))
    assert sum(p.stat().st_size for p in segments) < 2 << 20
    result = agent.efci("logs", "1")
    assert result.stdout.startswith(b"1\r\n2\r\n3\r\n") and result.stdout.endswith(b"the end\r\n")
    assert b"bytes of log were dropped before this point" in result.stderr
    assert b"run 1 succeeded, exit status 0" in result.stderr
