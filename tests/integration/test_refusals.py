"""What the agent refuses, and how it says so, against the running agent:
declarations that reach outside their directory, values that used to pass
reload and fail at run time, secrets-store files it did not make, and
messages that must not leak or lie."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .conftest import BASE_IMAGE, OWNER, AgentProcess, Setup, task
from .test_checkout import created_containers

HELLO = f"tasks:\n  hello: {{image: {BASE_IMAGE}, command: [echo, hi]}}\n"


def reload(agent: AgentProcess) -> subprocess.CompletedProcess[bytes]:
    return agent.efci("reload", check=False)


def test_a_conf_d_symlink_out_of_the_directory_is_refused_unread(agent: AgentProcess) -> None:
    agent.declare("hello.yml", HELLO)
    (agent.conf_d / "shadow.yml").symlink_to("/etc/shadow")
    (agent.conf_d / "dangling.yml").symlink_to(agent.root / "nowhere.yml")
    (agent.conf_d / "folder.yml").mkdir()
    agent.start()
    result = reload(agent)
    assert result.returncode == 2
    assert b"shadow.yml: a symlink to a file outside" in result.stderr, result.stderr
    assert b"root:" not in result.stderr + result.stdout
    assert b"dangling.yml: a symlink to" in result.stderr and b"does not exist" in result.stderr
    assert b"folder.yml: a directory, not a file; ignored" in result.stderr
    status = agent.efci("status", check=False).stdout
    assert b"warning:" in status and b"root:" not in status
    assert agent.efci("run", "--follow", "hello").returncode == 0


def test_an_image_built_from_outside_through_a_symlink_is_refused(agent: AgentProcess,
                                                                    tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY secret /secret\n")
    (outside / "secret").write_text("from outside\n")
    agent.declare("img.yml", "images:\n  esc: {dockerfile: esc/Dockerfile, context: esc}\n")
    (agent.conf_d / "esc").symlink_to(outside)
    agent.start()
    result = reload(agent)
    assert result.returncode == 2
    assert b"img.yml:2: images.esc.context: must be a path inside" in result.stderr, \
        result.stderr
    assert json.loads(agent.efci("--json", "images").stdout) == []


BAD_AT_RELOAD = {
    "host beginning with -": ("repo_url", {"repo_url": "-oProxyCommand=touch@x:r.git"}),
    "ssh:// host beginning with -": ("repo_url", {"repo_url": "ssh://-oProxyCommand=x/r.git"}),
    "port out of range": ("repo_url", {"repo_url": "ssh://git@example.org:99999/r.git"}),
    "port not a number": ("repo_url", {"repo_url": "ssh://git@example.org:ssh/r.git"}),
    "control character in revision": ("revision", {"revision": "ma\x01in"}),
}


def test_values_that_failed_at_run_time_are_refused_at_reload(agent: AgentProcess) -> None:
    agent.start()
    for label, (field, change) in BAD_AT_RELOAD.items():
        entry = {"repo_url": "git@example.org:r.git", "revision": "main", "mutable": True,
                 "key": "deploy", **change}
        agent.declare("t.yml", json.dumps({"tasks": {"t": task(
            checkout={"repositories": [entry]})}}, ensure_ascii=True))
        result = reload(agent)
        assert result.returncode == 2, label
        assert b"t.yml:1:" in result.stderr, (label, result.stderr)
        assert f"checkout.repositories[0].{field}".encode() in result.stderr or \
            b"U+0001" in result.stderr, (label, result.stderr)
        assert b"internal error" not in result.stderr and b"Error(" not in result.stderr, label
    (agent.conf_d / "t.yml").write_bytes(b"tasks:\n  t:\n    image: x\n    command: [\"a\x01\"]\n")
    result = reload(agent)
    assert result.returncode == 2 and b"t.yml:4: character U+0001" in result.stderr
    agent.declare("t.yml", "images:\n  gone: {dockerfile: nowhere/Dockerfile}\n")
    result = reload(agent)
    assert result.returncode == 2
    assert b"t.yml:2: images.gone.dockerfile: 'nowhere/Dockerfile' is not a file" in \
        result.stderr, result.stderr
    assert agent.efci("images").returncode == 0


def test_escape_sequences_from_a_declaration_never_reach_the_terminal(
        agent: AgentProcess) -> None:
    agent.declare("t.yml", 'tasks:\n  t:\n    image: x\n    "\\e]0;PWNED\\a": 1\n')
    agent.start()
    result = reload(agent)
    assert result.returncode == 2
    for out in (result.stderr, agent.efci("status", check=False).stdout):
        assert b"\x1b" not in out and b"\x07" not in out
        assert b"\\x1b]0;PWNED\\x07" in out, out


def test_a_symlinked_or_loose_deploy_key_is_refused_before_any_container(
        setup: Setup) -> None:
    setup.server.create("site")
    setup.key()
    setup.trust()
    setup.declare({"t": task(checkout={"repositories": [
        setup.entry("site", "main", mutable=True)]})})
    private = setup.agent.root / f"secrets/git-ssh/{OWNER}/private/deploy"
    saved = private.read_bytes()
    private.unlink()
    private.symlink_to("/etc/shadow")
    for words in ("through a symlink", "has mode 0644"):
        before = time.time()
        status, record = setup.run("t")
        assert status == 1 and record["status"] == "failed", record
        assert words in record["error"], record
        assert created_containers(setup.agent, before, time.time()) == []
        private.unlink()
        private.write_bytes(saved)
        private.chmod(0o644)


def test_a_reader_that_stops_early_is_a_quiet_end(agent: AgentProcess) -> None:
    agent.declare("t.yml", f"tasks:\n  many: {{image: {BASE_IMAGE}, command: [seq, '200000']}}\n")
    agent.start()
    assert agent.efci("run", "--follow", "many").returncode == 0
    with subprocess.Popen([sys.executable, "-m", "agent", "--root", str(agent.root), "logs",
                           "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=Path(__file__).parents[2]) as efci:
        assert efci.stdout is not None and efci.stderr is not None
        assert efci.stdout.readline() == b"1\r\n"
        efci.stdout.close()  # as head does after its lines
        assert efci.wait(timeout=60) == 141
        said = efci.stderr.read()  # the log's own messages, and nothing about the pipe
        assert b"efci: run 1 of local/many queued" in said
        assert b"Broken pipe" not in said and b"Traceback" not in said, said
