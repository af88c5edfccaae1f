"""Secrets, deploy targets, and tasks that go wrong: clear errors, runs
recorded, nothing left mounted or running."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.host.mounts import mounted_under

from .conftest import BASE_IMAGE, AgentProcess
from .test_checkout import created_containers


def run(agent: AgentProcess, task: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = agent.efci("run", "--follow", task, check=False, timeout=300)
    run_id = json.loads(agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
    return result.returncode, json.loads(agent.efci("--json", "show", str(run_id)).stdout)


def output(agent: AgentProcess, run_id: int) -> bytes:
    return agent.efci("logs", "--raw", "--stream", "task", str(run_id)).stdout


@pytest.fixture
def targets(agent: AgentProcess, tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("site", "docs", "missing", "link")}
    paths["site"].mkdir()
    paths["docs"].mkdir()
    paths["link"].symlink_to(paths["site"])
    agent.configure("deploy_targets:\n" + "".join(
        f"  {name}:\n    path: {path}\n    allow: [local/deployer, local/both, local/bad-{name}]\n"
        for name, path in paths.items()))
    secrets = agent.root / "secrets/tasks/local"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("s3cret\n")
    (agent.root / "secrets/git-ssh/local/private").mkdir(parents=True)
    (agent.root / "secrets/git-ssh/local/private/deploy").write_text("NOT FOR TASKS\n")
    return paths


def test_only_declared_secrets_are_visible_read_only(agent: AgentProcess,
                                                     targets: dict[str, Path]) -> None:
    agent.declare("t.yml", f"""
tasks:
  reader:
    image: {BASE_IMAGE}
    secrets: [token]
    command: ["sh", "-c", "ls /run/secrets; cat /run/secrets/token; echo x > /run/secrets/token;
      grep -rs 'NOT FOR TASKS' / --exclude-dir=proc --exclude-dir=sys; echo end"]
  greedy:
    image: {BASE_IMAGE}
    secrets: [nope]
    command: ["true"]
""")
    agent.start()
    status, record = run(agent, "reader")
    out = output(agent, record["id"])
    assert status == 0, out
    assert out.startswith(b"token\r\ns3cret\r\n") and b"Read-only file system" in out
    assert b"NOT FOR TASKS" not in out and out.endswith(b"end\r\n")
    before = time.time()
    status, record = run(agent, "greedy")
    assert status == 1 and "declares secret 'nope', but there is no" in record["error"]
    assert created_containers(agent, before, time.time()) == []


def test_deploy_targets_need_the_allow_list_and_a_real_directory(
        agent: AgentProcess, targets: dict[str, Path]) -> None:
    tasks = {
        "deployer": {"deploy_target": str(targets["site"]),
                     "command": ["sh", "-c", "echo published > /deploy/index.html"]},
        "both": {"deploy_targets": ["site", "docs"],
                 "command": ["sh", "-c", "echo a > /deploy/site/a && echo b > /deploy/docs/b"]},
        "intruder": {"deploy_targets": ["site"], "command": ["true"]},
        "bad-missing": {"deploy_targets": ["missing"], "command": ["true"]},
        "bad-link": {"deploy_targets": ["link"], "command": ["true"]},
        "unknown": {"deploy_target": "/etc", "command": ["true"]},
    }
    agent.declare("t.yml", json.dumps({"tasks": {
        name: {"image": BASE_IMAGE, **t} for name, t in tasks.items()}}))
    agent.start()
    assert run(agent, "deployer")[0] == 0
    assert (targets["site"] / "index.html").read_text() == "published\n"
    assert run(agent, "both")[0] == 0
    assert (targets["site"] / "a").exists() and (targets["docs"] / "b").exists()
    for name, words in (("intruder", "may not write deploy target site"),
                        ("bad-missing", "is not a directory"),
                        ("bad-link", "through a symlink"),
                        ("unknown", "is not in")):
        before = time.time()
        status, record = run(agent, name)
        assert status == 1 and record["status"] == "failed", name
        assert words in record["error"], (name, record["error"])
        assert created_containers(agent, before, time.time()) == [], name
    assert os.listdir(targets["docs"]) == ["b"]


def failed_build_steps() -> list[str]:
    """Containers of the broken image's failed step, which the classic
    builder keeps unless told not to."""
    return [line for line in subprocess.run(
        ["docker", "ps", "--all", "--no-trunc", "--format", "{{.ID}} {{.Command}}"],
        capture_output=True, text=True, check=True).stdout.splitlines() if "exit 7" in line]


def test_tasks_that_go_wrong_are_recorded_and_leave_nothing_behind(agent: AgentProcess) -> None:
    context = agent.conf_d / "broken"
    context.mkdir(parents=True)
    (context / "Dockerfile").write_text("FROM efci/base:bookworm\nRUN exit 7\n")
    agent.declare("t.yml", f"""
images:
  broken: {{dockerfile: broken/Dockerfile, context: broken}}
tasks:
  no-such-command:
    image: {BASE_IMAGE}
    command: ["/no/such/program"]
  silent-failure:
    image: {BASE_IMAGE}
    command: ["sh", "-c", "exit 3"]
  unbuildable:
    image: broken
    command: ["true"]
""")
    agent.start()
    status, record = run(agent, "no-such-command")
    assert (status, record["status"], record["exit_code"]) == (127, "failed", 127)
    assert b"exec /no/such/program failed: No such file or directory" in output(
        agent, record["id"])
    status, record = run(agent, "silent-failure")
    assert (status, record["status"], record["exit_code"]) == (3, "failed", 3)
    assert output(agent, record["id"]) == b""
    failed_steps = len(failed_build_steps())
    status, record = run(agent, "unbuildable")
    assert status == 1 and "failed to build" in record["error"]
    assert len(failed_build_steps()) == failed_steps  # docker build kept no container of it
    log = agent.efci("logs", "--stream", "image:broken", str(record["id"])).stdout
    assert b"exit 7" in log or b"returned a non-zero code: 7" in log
    assert agent.containers(running=True) == []
    assert mounted_under(agent.root / "state/mounts") == []
    assert len(json.loads(agent.efci("--json", "runs").stdout)) == 3


def test_image_builds_are_runs_and_are_reused(agent: AgentProcess) -> None:
    context = agent.conf_d / "tool"
    context.mkdir(parents=True)
    (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY hello /hello\n")
    (context / "hello").write_text(f"built at {time.time()}\n")  # a tag of its own
    agent.declare("t.yml", """
images:
  tool: {dockerfile: tool/Dockerfile, context: tool}
tasks:
  use-tool: {image: tool, command: [cat, /hello]}
""")
    agent.start()
    (image,) = json.loads(agent.efci("--json", "images").stdout)
    assert image["name"] == "tool" and image["built"] is False
    assert image["used_by"] == ["use-tool"]
    built = agent.efci("image", "build", "--follow", "tool")
    assert built.returncode == 0 and b"Successfully built" in built.stdout
    assert json.loads(agent.efci("--json", "images").stdout)[0]["built"] is True
    assert json.loads(agent.efci("--json", "show", "1").stdout)["task"] == "image:tool"
    status, record = run(agent, "use-tool")
    assert status == 0 and output(agent, record["id"]).startswith(b"built at ")
    assert b"building image" not in agent.efci("logs", str(record["id"])).stderr
    (context / "hello").write_text("changed\n")  # a new hash: built again
    status, record = run(agent, "use-tool")
    assert status == 0 and output(agent, record["id"]) == b"changed\r\n"
    assert b"building image tool" in agent.efci("logs", str(record["id"])).stderr
    subprocess.run(["docker", "image", "rm", "--force", image["tag"],
                    json.loads(agent.efci("--json", "images").stdout)[0]["tag"]],
                   capture_output=True, check=False)
