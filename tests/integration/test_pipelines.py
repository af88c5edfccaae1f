"""Pipelines: stages in order, each over the layers the ones before it left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import BASE_IMAGE, Setup, task
from .test_lifecycle import shell
from .test_worktrees import make_repo, upper_layer, volume_dir

# Stage one: change the worktree (a new file, a deletion, a whole directory
# made opaque by deleting and remaking it).
BUILD = """
set -e
cd /src/lib
echo built > out.txt
rm README
rm -r tests && mkdir tests && echo fresh > tests/only
"""
# Stage two, in another image: sees all of it.
PUBLISH = """
set -e
test -f /publisher-image
cd /src/lib
cat out.txt
test ! -e README
ls tests
echo published >> out.txt
"""


def pipeline(setup: Setup, sha: str, *stages: dict[str, object]) -> dict[str, object]:
    return task(checkout={"repositories": [setup.entry("lib", sha, mutable=False)]},
                command=["false"], stages=list(stages))


def test_a_later_stage_sees_what_the_earlier_one_left(setup: Setup) -> None:
    sha = make_repo(setup)
    setup.agent.declare("images.yml", json.dumps({"images": {"publisher": {
        "inline": f"FROM {BASE_IMAGE}\nRUN touch /publisher-image\n"}}}))
    setup.declare({"site": pipeline(
        setup, sha,
        {"name": "build", "command": ["sh", "-c", BUILD], "env": {"STAGE": "build"}},
        {"name": "publish", "image": "publisher", "command": ["sh", "-c", PUBLISH]})})
    status, run = setup.run("site")
    log = setup.agent.efci("logs", str(run["id"]))
    assert status == 0, log.stdout + log.stderr
    assert run["status"] == "succeeded"
    out = setup.output(run["id"])
    assert b"built" in out and b"only" in out and b"t1" not in out
    stages = run["stages"]
    assert [(s["name"], s["status"], s["exit_code"]) for s in stages] == [
        ("build", "succeeded", 0), ("publish", "succeeded", 0)]
    # Each stage's container is kept, stopped.
    for stage in stages:
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}",
                                stage["container"]], capture_output=True, text=True, check=True)
        assert state.stdout.strip() == "exited"
    assert b"stage build (1 of 2)" in log.stderr and b"stage publish: succeeded" in log.stderr
    # The layer stack: stage 1's upper holds only what stage 1 did; the base is untouched.
    first, second = upper_layer(setup, run["id"]), upper_layer(setup, run["id"], 1)
    assert (first / "out.txt").read_bytes() == b"built\n"
    assert (second / "out.txt").read_bytes() == b"built\npublished\n"
    assert not (second / "README").exists()  # the whiteout is stage 1's, seen from below
    base = volume_dir(run["worktrees"][0]["volume"])
    assert (base / "README").exists() and not (base / "out.txt").exists()
    shown = setup.agent.efci("show", str(run["id"])).stdout.decode()
    assert "stage:          build: succeeded, exit status 0" in shown


def test_a_failing_stage_stops_the_pipeline_unless_it_may_fail(setup: Setup) -> None:
    sha = make_repo(setup)
    setup.declare({
        "stops": pipeline(setup, sha,
                          {"name": "a", "command": ["sh", "-c", "exit 3"]},
                          {"name": "b", "command": ["sh", "-c", "echo should-not-run"]}),
        "goes-on": pipeline(setup, sha,
                            {"name": "a", "command": ["sh", "-c", "exit 3"],
                             "allow_failure": True},
                            {"name": "b", "command": ["sh", "-c", "echo did-run"]}),
        "slow": pipeline(setup, sha,
                         {"name": "a", "command": ["sleep", "30"], "time_limit": "1s"},
                         {"name": "b", "command": ["true"]})})
    status, run = setup.run("stops")
    assert status != 0 and run["status"] == "failed"
    assert run["error"] == "stage a failed (exit status 3)" and run["exit_code"] == 3
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("a", "failed"),
                                                                 ("b", "skipped")]
    assert run["stages"][1]["container"] is None
    assert b"should-not-run" not in setup.output(run["id"])

    status, run = setup.run("goes-on")
    assert status == 0 and run["status"] == "succeeded"
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("a", "failed"),
                                                                 ("b", "succeeded")]
    assert b"did-run" in setup.output(run["id"])

    status, run = setup.run("slow")
    assert run["status"] == "timed_out" and run["error"].startswith("stage a timed out")
    assert [s["status"] for s in run["stages"]] == ["timed_out", "skipped"]


def test_restart_of_a_stage_starts_its_own_container_again(setup: Setup) -> None:
    """In place: the stage's container keeps what it wrote (outside /src too)."""
    sha = make_repo(setup)
    setup.declare({"p": pipeline(
        setup, sha, {"name": "a", "command": ["true"]},
        {"name": "b", "command": ["sh", "-c", "echo x >> /tmp/n; [ $(wc -l < /tmp/n) -ge 2 ]"]})})
    _, run = setup.run("p")
    assert [s["status"] for s in run["stages"]] == ["succeeded", "failed"]
    whole = setup.agent.efci("restart", str(run["id"]), check=False)
    assert whole.returncode != 0 and b"say which stage's container" in whole.stderr
    again = setup.agent.efci("restart", "--follow", "--stage", "b", str(run["id"]),
                             check=False, timeout=300)
    assert again.returncode == 0, again.stderr
    record = json.loads(setup.agent.efci("--json", "show", str(run["id"])).stdout)
    assert (record["status"], record["attempts"]) == ("succeeded", 2)
    assert [s["status"] for s in record["stages"]] == ["succeeded", "succeeded"]
    assert record["stages"][1]["container"] == run["stages"][1]["container"]


def test_retry_from_a_stage_does_not_run_the_ones_before_it(setup: Setup,
                                                            tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.mkdir()
    sha = make_repo(setup)
    setup.agent.stop()
    setup.agent.configure(f"deploy_targets:\n  counter:\n    path: {counter}\n"
                          "    allow: [alice/p]\n")
    setup.agent.start()
    # b fails the first time it runs and succeeds the second: the count is
    # in a deploy target, outside every container and layer.
    setup.declare({"p": {**pipeline(
        setup, sha,
        {"name": "a", "command": ["sh", "-c", "echo a >> /deploy/count; echo built > "
                                                "/src/lib/out.txt"]},
        {"name": "b", "command": ["sh", "-c", "echo b >> /deploy/count; cat /src/lib/out.txt;"
                                              " [ $(grep -c b /deploy/count) -ge 2 ]"]}),
        "deploy_targets": ["counter"]}})
    _, run = setup.run("p")
    assert run["status"] == "failed" and [s["status"] for s in run["stages"]] == [
        "succeeded", "failed"]
    first_a = run["stages"][0]
    missing = setup.agent.efci("retry", str(run["id"]), "--from", "c", check=False)
    assert missing.returncode != 0 and b"no stage 'c'; its stages: a, b" in missing.stderr

    again = setup.agent.efci("retry", str(run["id"]), "--from", "b", "--follow", check=False,
                             timeout=300)
    assert again.returncode == 0, again.stderr
    retried = json.loads(setup.agent.efci("--json", "show", str(run["id"])).stdout)
    assert retried["status"] == "succeeded" and retried["attempts"] == 2
    assert (counter / "count").read_text() == "a\nb\nb\n"  # a ran once
    assert retried["stages"][0] == first_a  # its record and container as they were
    assert b"built" in again.stdout

    setup.agent.efci("rm", str(run["id"]))
    gone = setup.agent.efci("retry", str(run["id"]), "--from", "b", check=False)
    assert gone.returncode != 0 and b"layers were removed" in gone.stderr


def test_retry_refuses_to_skip_a_stage_that_failed(setup: Setup) -> None:
    sha = make_repo(setup)
    setup.declare({"p": pipeline(setup, sha, {"name": "a", "command": ["false"]},
                                 {"name": "b", "command": ["true"]})})
    _, run = setup.run("p")
    refused = setup.agent.efci("retry", str(run["id"]), "--from", "b", check=False)
    assert refused.returncode != 0 and b"stage a of run" in refused.stderr
    assert b"did not succeed (failed); retry from it" in refused.stderr


def docker_has(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name],
                          capture_output=True).returncode == 0


def test_a_shell_in_a_stage_is_what_its_restart_runs_with(setup: Setup) -> None:
    """The debugging story in a pipeline: the shell opens in the failed
    stage's container over the layers the stage before it left; what it
    changes outside /src is what `efci restart --stage` runs with; efci rm
    takes every stage's container and what the shell left."""
    sha = make_repo(setup)
    setup.declare({"p": pipeline(
        setup, sha, {"name": "a", "command": ["sh", "-c", "echo built > /src/lib/out.txt"]},
        {"name": "b", "command": ["sh", "-c", "cat /src/lib/out.txt; test -f /etc/efci-fixed"]})})
    _, run = setup.run("p")
    assert [s["status"] for s in run["stages"]] == ["succeeded", "failed"]
    status, out = shell(setup, run["id"], b"exit 0\n")
    assert status != 0 and b"say which stage's container to open a shell in" in out, out
    status, out = shell(setup, run["id"], b"echo seen=$(cat /src/lib/out.txt); "
                                          b"touch /etc/efci-fixed; exit 0\n", "--stage", "b")
    assert status == 0 and b"seen=built" in out, out
    assert f"efci restart {run['id']} --stage b".encode() in out

    again = setup.agent.efci("restart", "--follow", "--stage", "b", str(run["id"]),
                             check=False, timeout=300)
    assert again.returncode == 0, again.stderr
    assert b"on the container as efci shell left it" in again.stderr
    record = json.loads(setup.agent.efci("--json", "show", str(run["id"])).stdout)
    assert record["status"] == "succeeded"
    assert [(s["status"], s["patched_attempt"]) for s in record["stages"]] == [
        ("succeeded", None), ("succeeded", 2)]
    patched = f"efci-patched/{setup.agent.instance()}:{run['id']}-b"
    assert docker_has("image", patched)

    setup.agent.efci("rm", str(run["id"]))
    assert not any(docker_has("container", s["container"]) for s in run["stages"])
    assert not docker_has("image", patched)
