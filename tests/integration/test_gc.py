"""efci gc: exactly what the policy says goes, nothing unlabelled is touched,
and runs going on meanwhile are not disturbed."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import BASE_IMAGE, AgentProcess, Setup, task
from .test_worktrees import make_repo, upper_layer, volume_dir

pytestmark = pytest.mark.integration


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)


def exists(kind: str, name: str) -> bool:
    return docker(kind, "inspect", name).returncode == 0


def gc(agent: AgentProcess, *args: str) -> dict[str, Any]:
    return json.loads(agent.efci("--json", "gc", *args).stdout)  # type: ignore[no-any-return]


def show(agent: AgentProcess, run: int) -> dict[str, Any]:
    return json.loads(agent.efci("--json", "show", str(run)).stdout)  # type: ignore[no-any-return]


@pytest.fixture
def unrelated() -> Iterator[dict[str, str]]:
    """A container, a volume and an image nobody told efci about."""
    tag = uuid.uuid4().hex[:8]
    names = {"container": f"not-efci-{tag}", "volume": f"not-efci-{tag}",
             "image": f"not-efci/{tag}:1"}
    docker("volume", "create", names["volume"])
    docker("tag", BASE_IMAGE, names["image"])
    docker("create", "--name", names["container"], "--label", "org.example=1", BASE_IMAGE, "true")
    try:
        yield names
    finally:
        docker("rm", "-f", names["container"])
        docker("volume", "rm", "-f", names["volume"])
        docker("rmi", names["image"])


def test_gc_removes_what_the_policy_says_and_nothing_unlabelled(
        agent: AgentProcess, unrelated: dict[str, str]) -> None:
    agent.configure("gc:\n  keep_runs: 2\n  keep_for: 0s\n  interval: 0\n")
    agent.start()
    agent.declare("t.yml", json.dumps({"owner": "alice", "tasks": {
        "t": task(command=["sh", "-c", "echo hello"])}}))
    agent.efci("reload")
    runs = [json.loads(agent.efci("--json", "run", "--follow", "t").stdout.splitlines()[-1])["id"]
            for _ in range(4)]
    containers = {run: show(agent, run)["container_name"] for run in runs}
    # What a crash leaves: a container and a volume with this agent's labels,
    # of a run the state store does not know.
    instance = agent.instance()
    orphan = f"efci-{instance}-9999"
    docker("create", "--name", orphan, "--label", f"org.efforting-ci.instance={instance}",
           "--label", "org.efforting-ci.run=9999", BASE_IMAGE, "true")
    docker("volume", "create", "--label", f"org.efforting-ci.instance={instance}",
           "--label", "org.efforting-ci.run=9999", f"{orphan}-mut-0")  # an older agent's
    # and the run's layers in the layers volume (the run has no worktree, so
    # the volume is made here as the agent makes it).
    docker("volume", "create", "--label", f"org.efforting-ci.instance={instance}",
           "--label", "org.efforting-ci.layers=1", f"efci-{instance}-layers")
    layers = volume_dir(f"efci-{instance}-layers") / "9999"
    (layers / "0/upper").mkdir(parents=True)
    (layers / "0/upper/built").write_bytes(b"x" * 100_000)

    planned = gc(agent, "--dry-run")
    assert planned["dry_run"]
    assert sorted((r["kind"], r["name"]) for r in planned["removed"]) == sorted([
        ("run", str(runs[0])), ("run", str(runs[1])), ("container", orphan),
        ("volume", f"{orphan}-mut-0"), ("layers", str(layers))])
    assert next(r["bytes"] for r in planned["removed"] if r["kind"] == "layers") >= 100_000
    assert all(exists("container", c) for c in containers.values())  # a dry run
    assert layers.is_dir()

    done = gc(agent)
    assert sorted((r["kind"], r["name"]) for r in done["removed"]) == sorted(
        (r["kind"], r["name"]) for r in planned["removed"])
    for run in runs[:2]:
        record = show(agent, run)
        assert not exists("container", containers[run])
        assert record["removed_at"] and record["removed_why"].startswith("evicted: not among")
        assert b"hello" in agent.efci("logs", "--raw", str(run)).stdout  # the log stays
    for run in runs[2:]:
        assert exists("container", containers[run]) and show(agent, run)["removed_at"] is None
    assert not exists("container", orphan) and not exists("volume", f"{orphan}-mut-0")
    assert not layers.exists() and layers.parent.is_dir()
    for kind in ("container", "volume", "image"):
        assert exists(kind, unrelated[kind]), kind
    assert gc(agent)["removed"] == []  # nothing more to do
    text = agent.efci("gc", "--dry-run").stdout.decode()
    assert "0 removals" in text and "dry run" in text


def test_old_logs_go_and_say_so(agent: AgentProcess) -> None:
    agent.configure("gc:\n  logs_keep: 1s\n  interval: 0\n")
    agent.start()
    agent.declare("t.yml", json.dumps({"tasks": {"t": task(command=["echo", "old"])}}))
    agent.efci("reload")
    run = json.loads(agent.efci("--json", "run", "--follow", "t").stdout.splitlines()[-1])["id"]
    time.sleep(1.5)
    done = gc(agent)
    assert [(r["kind"], r["name"]) for r in done["removed"]] == [("log", f"run {run}")]
    assert done["bytes"] > 0
    gone = agent.efci("logs", str(run), check=False)
    assert gone.returncode != 0 and b"log was removed by gc" in gone.stderr
    assert b"log removed:" in agent.efci("show", str(run)).stdout
    assert show(agent, run)["removed_at"] is None  # the run itself is kept (keep_runs)


def test_gc_while_twenty_runs_come_and_go_breaks_none(agent: AgentProcess) -> None:
    agent.configure("gc:\n  keep_runs: 1\n  keep_for: 0s\n  interval: 0\n")
    agent.start()
    agent.declare("t.yml", json.dumps({"tasks": {"t": task(
        command=["sh", "-c", "sleep 1.5; echo done"])}}))
    agent.efci("reload")
    runs = [json.loads(agent.efci("--json", "run", "t").stdout)["id"] for _ in range(20)]
    deadline = time.monotonic() + 300
    collections = 0
    while time.monotonic() < deadline:
        gc(agent)
        collections += 1
        records = [show(agent, run) for run in runs]
        if all(r["status"] not in ("queued", "running") for r in records):
            break
    assert [r["status"] for r in records] == ["succeeded"] * 20, records
    assert collections >= 2
    assert all(b"done" in agent.efci("logs", "--raw", str(run)).stdout for run in runs)
    gc(agent)
    kept = [run for run in runs if show(agent, run)["removed_at"] is None]
    assert kept == [runs[-1]]


def test_unused_worktrees_go_per_owner(setup: Setup) -> None:
    sha = make_repo(setup)
    setup.agent.stop()
    setup.agent.configure("gc:\n  worktrees_unused: 0s\n  interval: 0\n")
    setup.agent.start()
    setup.declare({"look": task(checkout={"repositories": [
        setup.entry("lib", sha, mutable=False)]}, command=["ls", "/src/lib"])})
    _, run = setup.run("look")
    volume = run["worktrees"][0]["volume"]
    assert gc(setup.agent)["removed"] == []  # a declared task still checks it out
    setup.declare({})
    assert gc(setup.agent)["removed"] == []  # the run's kept layers lie over it
    setup.agent.efci("rm", str(run["id"]))
    assert gc(setup.agent, "--owner", "bob")["removed"] == []  # someone else's
    done = gc(setup.agent, "--owner", "alice")
    assert [(r["kind"], r["name"]) for r in done["removed"]] == [("worktree", volume)]
    assert not exists("volume", volume)


def test_images_no_task_runs_in_go(agent: AgentProcess) -> None:
    agent.configure("gc:\n  images_unused: 0s\n  interval: 0\n")
    agent.start()
    marker = uuid.uuid4().hex
    images = {}
    for name in ("old", "kept"):  # contexts of their own: t.yml changing changes no tag
        context = agent.conf_d / f"ctx-{name}"
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo {marker} > /{name}\n")
        images[name] = {"dockerfile": f"ctx-{name}/Dockerfile", "context": f"ctx-{name}"}
    agent.declare("images.yml", json.dumps({"images": images}))
    agent.declare("t.yml", json.dumps({"tasks": {"t": task(image="old"),
                                                 "u": task(image="kept")}}))
    agent.efci("reload")
    for name in ("t", "u"):
        agent.efci("run", "--follow", name)
    tags = {i["name"]: i["tag"] for i in json.loads(agent.efci("--json", "images").stdout)}
    try:
        assert gc(agent)["removed"] == []  # both still run by a declared task
        agent.declare("t.yml", json.dumps({"tasks": {"u": task(image="kept")}}))
        agent.efci("reload")
        done = gc(agent)
        assert [(r["kind"], r["name"]) for r in done["removed"]] == [("image", tags["old"])]
        assert not exists("image", tags["old"]) and exists("image", tags["kept"])
    finally:
        for tag in tags.values():
            docker("rmi", "-f", tag)


def test_past_the_budget_the_oldest_runs_go(setup: Setup) -> None:
    """The budget counts both of a run's writable layers: its container's
    and its upper layer over /src (400 kB each, 1 MiB allowed)."""
    sha = make_repo(setup)
    setup.agent.stop()
    setup.agent.configure("gc:\n  layers_budget: 1MiB\n  interval: 0\n")  # keep_runs: 20, 7d
    setup.agent.start()
    setup.declare({"t": task(checkout={"repositories": [
        setup.entry("lib", sha, mutable=False)]}, command=["sh", "-c",
        "head -c 400000 /dev/urandom > /var/tmp/blob && "
        "head -c 400000 /dev/urandom > /src/lib/blob"])})
    runs = [setup.run("t")[1]["id"] for _ in range(3)]
    layers = [upper_layer(setup, run) for run in runs]
    assert all((layer / "blob").stat().st_size == 400000 for layer in layers)
    done = gc(setup.agent)
    assert [(r["kind"], r["name"]) for r in done["removed"]] == [("run", str(runs[0])),
                                                                 ("run", str(runs[1]))]
    assert all(r["bytes"] >= 800000 and "gc.layers_budget" in r["why"] for r in done["removed"])
    assert not layers[0].exists() and not layers[1].exists() and layers[2].is_dir()
    assert show(setup.agent, runs[2])["removed_at"] is None  # the newest of the task stays
