"""Caches on a real btrfs: a loop-mounted filesystem made by
scripts/make-cache-fs for each test and removed after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BASE_IMAGE, AgentProcess

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
OWNER = "alice"


class CacheAgent:
    def __init__(self, agent: AgentProcess, root: Path) -> None:
        self.agent, self.root = agent, root

    def declare(self, tasks: dict[str, dict[str, Any]], file: str = "tasks.yml") -> None:
        self.agent.declare(file, json.dumps({"owner": OWNER, "tasks": tasks}))
        result = self.agent.efci("reload", check=False)
        assert result.returncode == 0, result.stderr

    def run(self, name: str) -> dict[str, Any]:
        self.agent.efci("run", "--follow", name, check=False, timeout=300)
        run_id = json.loads(self.agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
        return json.loads(self.agent.efci("--json", "show", str(run_id)).stdout)  # type: ignore[no-any-return]

    def output(self, run: dict[str, Any]) -> bytes:
        """What the task printed."""
        return self.agent.efci("logs", "--raw", str(run["id"])).stdout

    def log(self, run: dict[str, Any]) -> bytes:
        """The whole log: the agent's messages (on stderr) and the output."""
        shown = self.agent.efci("logs", str(run["id"]))
        return shown.stderr + shown.stdout

    def ls(self) -> dict[str, dict[str, Any]]:
        listing = json.loads(self.agent.efci("--json", "cache", "ls").stdout)
        return {f"{c['owner']}/{c['name']}": c for c in listing["caches"]}

    def qgroups(self) -> dict[str, tuple[int, int]]:
        """The kernel's figures, read here with btrfs-progs itself."""
        out = subprocess.run(["btrfs", "qgroup", "show", "--sync", "--raw", str(self.root)],
                             capture_output=True, text=True, check=True).stdout
        return {m[1]: (int(m[2]), int(m[3])) for m in
                re.finditer(r"^(\d+/\d+)\s+(\d+)\s+(\d+)", out, re.MULTILINE)}


def cache_task(command: str, *caches: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"image": BASE_IMAGE, "command": ["sh", "-c", command], "caches": list(caches),
            "network": "none", **extra}


@pytest.fixture
def caches(agent: AgentProcess, tmp_path: Path) -> Iterator[CacheAgent]:
    root = tmp_path / "cachefs/caches"
    subprocess.run([str(SCRIPTS / "make-cache-fs"), "1G", str(root)], check=True,
                   capture_output=True)
    try:
        agent.configure(f"paths:\n  caches: {root}\n"
                        "caches:\n  release_grace: 2s\n  default_quota: 256MiB\n")
        agent.start()
        yield CacheAgent(agent, root)
    finally:
        agent.cleanup()
        subprocess.run([str(SCRIPTS / "make-cache-fs"), "--remove", str(root)], check=False,
                       capture_output=True)


def test_a_shared_cache_one_task_fills_is_seen_by_another(caches: CacheAgent) -> None:
    deps = {"name": "deps", "path": "/cache", "shared": True, "quota": "64MiB"}
    caches.declare({
        "fill": cache_task("mkdir -p /cache/reg && head -c 3000000 /dev/urandom > "
                           "/cache/reg/crate && echo filled", deps),
        "use": cache_task("ls /cache/reg && wc -c < /cache/reg/crate", deps)})
    assert caches.run("fill")["status"] == "succeeded"
    run = caches.run("use")
    assert run["status"] == "succeeded" and b"3000000" in caches.output(run)
    listed = caches.ls()["alice/deps"]
    kernel = caches.qgroups()
    assert (listed["referenced"], listed["exclusive"]) == kernel[listed["qgroup"]]
    assert listed["referenced"] >= 3_000_000 and listed["quota"] == 64 << 20
    # Usage split equally between the two tasks that claim it.
    assert listed["apportioned"] == {"fill": listed["referenced"] // 2,
                                     "use": listed["referenced"] // 2}
    text = caches.agent.efci("cache", "ls").stdout.decode()
    assert "alice/deps" in text and "fill, use" in text


def test_a_write_past_the_quota_fails_the_run_and_spares_the_other_cache(
        caches: CacheAgent) -> None:
    small = {"name": "small", "path": "/small", "quota": "16MiB"}
    big = {"name": "big", "path": "/big", "quota": "256MiB"}
    caches.declare({"fill": cache_task(
        "head -c 40000000 /dev/zero > /big/ok && head -c 40000000 /dev/zero > /small/f",
        small, big)})
    run = caches.run("fill")
    assert run["status"] == "failed", run
    assert "cache alice/small is full" in run["error"]
    assert b"Disk quota exceeded" in caches.output(run)
    assert "alice/big" not in run["error"]
    listed = caches.ls()
    assert listed["alice/big"]["referenced"] >= 40_000_000  # the other cache took it all
    assert listed["alice/small"]["referenced"] <= 16 << 20
    # Raising the quota lets the same run through.
    caches.agent.efci("cache", "set-quota", "small", "64MiB", "--owner", OWNER)
    assert caches.run("fill")["status"] == "succeeded"
    too_big = caches.agent.efci("cache", "set-quota", "small", "5GiB", "--owner", OWNER,
                                check=False)
    assert too_big.returncode != 0 and b"more than the caches filesystem holds" in too_big.stderr
    # A full cache can still be removed (btrfs deletes over quota).
    caches.agent.efci("cache", "set-quota", "small", "16MiB", "--owner", OWNER)
    caches.agent.efci("cache", "rm", "small", "--owner", OWNER, "--force")
    assert "alice/small" not in caches.ls()
    # A declared quota larger than the filesystem refuses the run, saying where it is from.
    caches.declare({"fill": cache_task("true", {**small, "quota": "5GiB"})})
    run = caches.run("fill")
    assert run["status"] == "failed" and "more than the caches filesystem holds" in run["error"]
    assert "from the declaration" in run["error"]


def test_releasing_a_private_cache_removes_it(caches: CacheAgent) -> None:
    mine = {"name": "mine", "path": "/cache"}
    caches.declare({"build": cache_task("echo data > /cache/f", mine)})
    assert caches.run("build")["status"] == "succeeded"
    path = Path(caches.ls()["alice/mine"]["path"])
    assert (path / "data/f").read_text() == "data\n"
    refused = caches.agent.efci("cache", "release", "mine", "--project", "build", "--owner",
                                OWNER, check=False)
    assert refused.returncode != 0 and b"still declares cache mine" in refused.stderr
    caches.declare({"build": cache_task("true")})  # the claim is gone from the declaration
    listed = caches.ls()["alice/mine"]
    assert listed["claims"][0]["released_at"] and listed["removal_at"]
    assert "removal after" in caches.agent.efci("cache", "ls").stdout.decode()
    caches.agent.efci("cache", "release", "mine", "--project", "build", "--owner", OWNER)
    assert "alice/mine" not in caches.ls() and not path.exists()
    # The deleted subvolume's qgroup is cleared once btrfs has cleaned it up.
    caches.agent.efci("reload")
    shown = subprocess.run(["btrfs", "qgroup", "show", str(caches.root)], capture_output=True,
                           text=True, check=True).stdout
    assert "<stale>" not in shown


def test_a_released_claim_is_removed_after_its_grace(caches: CacheAgent) -> None:
    caches.declare({"build": cache_task("echo x > /c/f", {"name": "brief", "path": "/c"})})
    assert caches.run("build")["status"] == "succeeded"
    caches.declare({"build": cache_task("true")})
    assert "alice/brief" in caches.ls()  # pending: release_grace is 2s here
    time.sleep(2.5)
    caches.agent.efci("reload")
    assert "alice/brief" not in caches.ls()


def test_a_shared_cache_stays_until_its_last_owner_releases_it(caches: CacheAgent) -> None:
    shared = {"name": "common", "path": "/c", "shared": True}
    caches.declare({"a": cache_task("echo a > /c/a", shared),
                    "b": cache_task("echo b > /c/b", shared)})
    assert caches.run("a")["status"] == caches.run("b")["status"] == "succeeded"
    caches.declare({"b": cache_task("cat /c/a /c/b", shared)})
    out = caches.agent.efci("--json", "cache", "release", "common", "--project", "a",
                            "--owner", OWNER)
    assert json.loads(out.stdout)["still_claimed_by"] == ["b"]
    run = caches.run("b")
    assert run["status"] == "succeeded" and b"a\r\nb" in caches.output(run)
    caches.declare({})
    caches.agent.efci("cache", "release", "common", "--project", "b", "--owner", OWNER)
    assert "alice/common" not in caches.ls()


def test_two_declarations_that_disagree_are_refused(caches: CacheAgent) -> None:
    caches.declare({"a": cache_task("true", {"name": "c", "path": "/c", "shared": True,
                                             "quota": "1GiB"})}, file="a.yml")
    caches.agent.declare("b.yml", json.dumps({"owner": OWNER, "tasks": {"b": cache_task(
        "true", {"name": "c", "path": "/c", "shared": True, "quota": "2GiB"})}}))
    caches.agent.efci("reload", check=False)
    status = json.loads(caches.agent.efci("--json", "status").stdout)
    error = status["declarations"]["errors"][str(caches.agent.conf_d / "b.yml")]
    assert "quota" in error and "a.yml" in error and "b.yml" in error


def test_a_layered_cache_changes_only_when_a_run_is_promoted(caches: CacheAgent) -> None:
    layered = {"name": "tools", "path": "/t", "layered": True}
    caches.declare({
        "seed": cache_task("mkdir -p /t/dir/sub && echo 1 > /t/dir/sub/v && echo old > /t/gone",
                           {**layered, "promote": "on-success"}),
        "change": cache_task("echo poison > /t/new && rm /t/gone && mv /t/dir /t/moved",
                             layered),
        "look": cache_task("find /t | sort", layered)})
    first = caches.run("seed")
    assert first["status"] == "succeeded", caches.output(first)
    assert b"is now its generation 2" in caches.log(first)  # promote: on-success
    changed = caches.run("change")  # mv of a snapshot's directory: a plain rename(2)
    assert changed["status"] == "succeeded", caches.output(changed)
    # Nothing of it in the cache yet: the next run sees generation 2, and
    # sees each directory once (overlayfs on btrfs would show a loop here).
    look = caches.output(caches.run("look"))
    assert look.split() == [b"/t", b"/t/dir", b"/t/dir/sub", b"/t/dir/sub/v", b"/t/gone"]
    cache_dir = Path(caches.ls()["alice/tools"]["path"])
    promoted = json.loads(caches.agent.efci("--json", "cache", "promote", str(changed["id"]),
                                            "tools").stdout)
    assert promoted["generation"] == 3
    look = caches.output(caches.run("look"))
    assert look.split() == [b"/t", b"/t/moved", b"/t/moved/sub", b"/t/moved/sub/v", b"/t/new"]
    # The old generation and the layers taken from it are gone; the last
    # run's own layer stays until efci rm.
    last = json.loads(caches.agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["gen-3", f"run-{last}"]
    stale = caches.agent.efci("cache", "promote", str(first["id"]), "tools", check=False)
    assert stale.returncode != 0
    caches.agent.efci("rm", str(last))
    assert sorted(p.name for p in cache_dir.iterdir()) == ["gen-3"]
    listed = caches.ls()["alice/tools"]
    assert listed["generation"] == 3 and listed["layered"]
    assert (listed["referenced"], listed["exclusive"]) == caches.qgroups()[listed["qgroup"]]


def test_a_subvolume_replaced_behind_the_agents_back_is_refused(caches: CacheAgent) -> None:
    caches.declare({"build": cache_task("echo x > /c/f", {"name": "c", "path": "/c"})})
    assert caches.run("build")["status"] == "succeeded"
    data = Path(caches.ls()["alice/c"]["path"]) / "data"
    subprocess.run(["btrfs", "subvolume", "delete", str(data)], check=True, capture_output=True)
    run = caches.run("build")  # deleted: made again, and the log says so
    assert run["status"] == "succeeded" and b"was missing" in caches.log(run)
    subprocess.run(["btrfs", "subvolume", "delete", str(data)], check=True, capture_output=True)
    os.symlink("/etc", data)
    run = caches.run("build")
    assert run["status"] == "failed" and "not a subvolume the agent made" in run["error"]
    assert not Path("/etc/f").exists()


def test_a_task_with_caches_is_refused_without_a_btrfs(agent: AgentProcess) -> None:
    """The agent runs without a caches filesystem; only tasks with caches
    are refused, saying why.  Tasks without one run as ever."""
    (agent.root / "state/caches").mkdir(parents=True)  # the default place, not a btrfs
    agent.start()
    agent.declare("tasks.yml", json.dumps({"owner": OWNER, "tasks": {
        "cached": cache_task("true", {"name": "c", "path": "/c"}),
        "plain": cache_task("true")}}))
    agent.efci("reload")
    agent.efci("run", "--follow", "plain")
    agent.efci("run", "--follow", "cached", check=False)
    found = json.loads(agent.efci("--json", "runs").stdout)
    by_task = {r["task"]: r for r in found}
    assert by_task["plain"]["status"] == "succeeded"
    assert by_task["cached"]["status"] == "failed"
    error = by_task["cached"]["error"]
    assert "paths.caches" in error and "not btrfs" in error and "make-cache-fs" in error
    status = json.loads(agent.efci("--json", "status").stdout)
    assert "not btrfs" in status["caches"]["problem"]


def test_two_runs_at_once_share_a_plain_cache(caches: CacheAgent) -> None:
    """Both see the same directory; the bookkeeping says both use it."""
    shared = {"name": "both", "path": "/c", "shared": True}
    caches.declare({name: cache_task(f"sleep 2; echo {name} > /c/{name}; ls /c", shared)
                    for name in ("one", "two")})
    ids = [json.loads(caches.agent.efci("--json", "run", name).stdout)["id"]
           for name in ("one", "two")]
    deadline = time.monotonic() + 30
    while caches.ls()["alice/both"]["used_by_runs"] != ids:
        assert time.monotonic() < deadline, caches.ls()
        time.sleep(0.1)
    busy = caches.agent.efci("cache", "rm", "both", "--owner", OWNER, "--force", check=False)
    assert busy.returncode != 0 and b"in use by runs" in busy.stderr
    for run_id in ids:
        while (run := json.loads(caches.agent.efci("--json", "show", str(run_id)).stdout))[
                "status"] in ("queued", "running"):
            time.sleep(0.2)
        assert run["status"] == "succeeded"
    listed = caches.ls()["alice/both"]
    assert listed["used_by_runs"] == [] and listed["last_used_at"]
    assert sorted(p.name for p in (Path(listed["path"]) / "data").iterdir()) == ["one", "two"]


def test_quotas_off_are_refused_unless_the_agent_may_turn_them_on(
        agent: AgentProcess, tmp_path: Path) -> None:
    root = tmp_path / "cachefs/caches"
    subprocess.run([str(SCRIPTS / "make-cache-fs"), "256M", str(root)], check=True,
                   capture_output=True)
    try:
        subprocess.run(["btrfs", "quota", "disable", str(root)], check=True)
        agent.configure(f"paths:\n  caches: {root}\ncaches:\n  enable_quota: false\n")
        agent.start()
        problem = json.loads(agent.efci("--json", "status").stdout)["caches"]["problem"]
        assert "quotas are off" in problem and "btrfs quota enable" in problem
        agent.stop()
        agent.configure(f"paths:\n  caches: {root}\n")  # enable_quota: true, the default
        agent.start()
        assert json.loads(agent.efci("--json", "status").stdout)["caches"]["problem"] is None
        assert subprocess.run(["btrfs", "qgroup", "show", str(root)],
                              capture_output=True).returncode == 0
    finally:
        agent.cleanup()
        subprocess.run([str(SCRIPTS / "make-cache-fs"), "--remove", str(root)], check=False,
                       capture_output=True)


def test_inconsistent_figures_are_said_and_rescanned(caches: CacheAgent) -> None:
    caches.declare({"fill": cache_task("head -c 5000000 /dev/urandom > /c/f",
                                       {"name": "c", "path": "/c"})})
    assert caches.run("fill")["status"] == "succeeded"
    data = Path(caches.ls()["alice/c"]["path"]) / "data"
    # Assigning a subvolume that shares extents to a group without a rescan
    # is what leaves the kernel's figures inconsistent.
    snapshot = caches.root / "elsewhere"
    subprocess.run(["btrfs", "subvolume", "snapshot", str(data), str(snapshot)], check=True,
                   capture_output=True)
    subvolume = subprocess.run(["btrfs", "inspect-internal", "rootid", str(snapshot)],
                               capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["sync"], check=True)
    subprocess.run(["btrfs", "qgroup", "create", "1/999", str(caches.root)], check=True)
    subprocess.run(["btrfs", "qgroup", "assign", "--no-rescan", f"0/{subvolume}", "1/999",
                    str(caches.root)], check=True, capture_output=True)
    shown = caches.agent.efci("cache", "ls")
    assert b"inconsistent" in shown.stderr and b"rescan" in shown.stderr
    deadline = time.monotonic() + 60
    while json.loads(caches.agent.efci("--json", "cache", "ls").stdout)["usage_inconsistent"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    listed = caches.ls()["alice/c"]
    assert (listed["referenced"], listed["exclusive"]) == caches.qgroups()[listed["qgroup"]]
    assert listed["referenced"] >= 5_000_000
