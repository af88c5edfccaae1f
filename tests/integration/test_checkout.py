"""Deploy keys and checkouts against a real sshd serving real repositories."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.host.git import worktree_volume_name

from .conftest import OWNER, AgentProcess, Setup, task
from .gitserver import git

T0 = 1_600_000_000  # commit times, far enough apart to tell mtimes apart


def created_containers(agent: AgentProcess, since: float, until: float) -> list[str]:
    """The containers this agent created in a time span (task and checkout
    containers carry its instance label); whatever else uses dockerd
    meanwhile does not count."""
    out = subprocess.run(["docker", "events", "--since", f"{since:.3f}", "--until",
                          f"{until:.3f}", "--filter", "type=container", "--filter",
                          "event=create", "--filter",
                          f"label=org.efforting-ci.instance={agent.instance()}",
                          "--format", "{{.Actor.Attributes.name}}"],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    return out.split()


def test_key_commands_and_the_private_half_never_shown(setup: Setup) -> None:
    a = setup.agent
    public = setup.key()
    assert public.startswith("ssh-ed25519 ") and public.endswith(f" ci/{OWNER}/deploy")
    secrets = a.root / "secrets/git-ssh" / OWNER
    private = secrets / "private/deploy"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (secrets / "private").stat().st_mode & 0o777 == 0o700
    assert (a.root / "secrets").stat().st_mode & 0o777 == 0o700
    again = a.efci("key", "create", "deploy", "--owner", OWNER, check=False)
    assert again.returncode == 75 and b"already exists" in again.stderr
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")

    listed = a.efci("key", "list").stdout
    shown = a.efci("key", "show", "deploy", "--owner", OWNER).stdout
    assert b"deploy" in listed and public.encode() in shown
    for out in (listed, shown, a.efci("--json", "key", "list").stdout):
        assert b"PRIVATE KEY" not in out

    setup.declare({"uses-it": task(checkout={"repositories": [
        setup.entry("r", "main", mutable=True)]})})
    refused = a.efci("key", "delete", "deploy", "--owner", OWNER, check=False)
    assert refused.returncode == 75 and b"used by task uses-it" in refused.stderr
    assert private.exists()
    a.efci("key", "delete", "deploy", "--owner", OWNER, "--force")
    assert not private.exists() and not (secrets / "public/deploy").exists()
    bad = a.efci("key", "create", "../x", "--owner", OWNER, check=False)
    assert bad.returncode == 64 and b"is not a name" in bad.stderr


def test_clone_over_ssh_into_the_experiments_volume(setup: Setup) -> None:
    s = setup.server
    s.create("site")
    s.commit("site", {"index.html": b"<h1>old</h1>\n", "ünïcödé/日本語.txt": b"unicode\n"},
             "first", when=T0)
    s.commit("site", {"index.html": b"<h1>hello</h1>\n"}, "second", when=T0 + 3600)
    s.authorize(setup.key(), "site")
    setup.trust()
    entry = setup.entry("site", "main", mutable=True)
    setup.declare({"show": task(
        checkout={"repositories": [entry]},
        command=["sh", "-c", "cd /src/site && cat index.html && ls ünïcödé && "
                 "stat -c '%Y %n' index.html ünïcödé/日本語.txt"])})
    status, run = setup.run("show")
    out = setup.output(run["id"])
    assert status == 0, out
    assert b"<h1>hello</h1>" in out and "日本語.txt".encode() in out
    assert f"{T0 + 3600} index.html".encode() in out
    assert f"{T0} ünïcödé/日本語.txt".encode() in out  # mtimes restored from history
    (worktree,) = run["worktrees"]
    assert worktree["volume"] == worktree_volume_name(OWNER, entry) == setup.volumes[0]
    assert worktree["commit_sha"] == git("rev-parse", "HEAD", cwd=s.repos / "site.work")
    labels = json.loads(subprocess.run(
        ["docker", "volume", "inspect", "--format", "{{json .Labels}}", worktree["volume"]],
        capture_output=True, check=True).stdout)
    assert labels == {"ci.owner": OWNER, "ci.repo_url": s.url("site"), "ci.revision": "main",
                      "ci.mutable": "true"}
    messages = setup.agent.efci("logs", str(run["id"])).stderr
    assert b"checking out main of" in messages


def test_immutable_is_reused_and_mutable_is_updated(setup: Setup) -> None:
    s = setup.server
    s.create("lib")
    first = s.commit("lib", {"VERSION": b"1\n"}, "v1")
    s.authorize(setup.key(), "lib")
    setup.trust()
    setup.declare({
        "pinned": task(checkout={"repositories": [setup.entry("lib", first, mutable=False)]},
                       command=["cat", "/src/lib/VERSION"]),
        "tracking": task(checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
                         command=["cat", "/src/lib/VERSION"]),
    })
    assert setup.run("pinned")[0] == 0
    before = time.time()
    status, second_run = setup.run("pinned")
    after = time.time()
    assert status == 0 and second_run["worktrees"][0]["reused"] is True
    created = created_containers(setup.agent, before, after)
    assert created and not [n for n in created if "checkout" in n], created

    status, run = setup.run("tracking")
    assert status == 0 and b"1\r\n" in setup.output(run["id"])
    second = s.commit("lib", {"VERSION": b"2\n"}, "v2")
    status, run = setup.run("tracking")
    assert status == 0 and setup.output(run["id"]).endswith(b"2\r\n")
    assert run["worktrees"][0] == {**run["worktrees"][0], "commit_sha": second, "reused": False}
    status, run = setup.run("pinned")  # the pinned one still shows the old commit
    assert status == 0 and setup.output(run["id"]) == b"1\r\n"


def test_missing_revisions_and_a_wrong_key_fail_clearly(setup: Setup) -> None:
    s = setup.server
    s.create("lib")
    s.commit("lib", {"a": b"a\n"}, "a")
    s.create("other")
    s.commit("other", {"b": b"b\n"}, "b")
    s.authorize(setup.key(), "lib")
    s.authorize(setup.key("other-key"), "other")
    setup.trust()
    setup.declare({
        "no-sha": task(checkout={"repositories": [
            setup.entry("lib", "0" * 40, mutable=False)]}),
        "no-branch": task(checkout={"repositories": [
            setup.entry("lib", "no-such-branch", mutable=True)]}),
        "wrong-key": task(checkout={"repositories": [
            setup.entry("lib", "main", mutable=True, key="other-key")]}),
    })
    for name, words in (("no-sha", b"is not in"), ("no-branch", b"couldn't find remote ref"),
                        ("wrong-key", b"may not run")):
        status, run = setup.run(name)
        assert status == 1 and run["status"] == "failed", name
        assert "checkout of" in run["error"] and run["container_id"] is None, name
        log = setup.agent.efci("logs", "--stream", "checkout:lib", str(run["id"]))
        assert words in log.stdout, (name, log.stdout)
        assert b"failed (exit status" in log.stderr


def test_submodules_use_the_same_key(setup: Setup) -> None:
    s = setup.server
    s.create("inner")
    s.commit("inner", {"inner.txt": b"from the submodule\n"}, "inner")
    work = s.create("outer")
    git("-c", "protocol.file.allow=always", "submodule", "add", "--quiet", "--name", "inner",
        str(s.path("inner")), "inner", cwd=work)
    git("config", "-f", ".gitmodules", "submodule.inner.url", s.url("inner"), cwd=work)
    s.commit("outer", {"outer.txt": b"outer\n"}, "with a submodule")
    s.authorize(setup.key(), "outer", "inner")
    setup.trust()
    setup.declare({"sub": task(checkout={"repositories": [
        setup.entry("outer", "main", mutable=True, submodules=True)]},
        command=["cat", "/src/outer/inner/inner.txt"])})
    status, run = setup.run("sub")
    assert status == 0, setup.agent.efci("logs", str(run["id"])).stdout
    assert setup.output(run["id"]) == b"from the submodule\r\n"


def test_unpinned_hosts_are_refused_unless_the_task_asks(setup: Setup) -> None:
    s = setup.server
    s.create("lib")
    s.commit("lib", {"a": b"a\n"}, "a")
    s.authorize(setup.key(), "lib")
    setup.declare({
        "strict": task(checkout={"repositories": [setup.entry("lib", "main", mutable=True)]}),
        "lax": task(checkout={"repositories": [setup.entry("lib", "main", mutable=True)],
                              "unchecked_host_keys": True}),
    })
    before = time.time()
    status, run = setup.run("strict")
    assert status == 1 and "is not pinned" in run["error"] and "efci key trust" in run["error"]
    assert created_containers(setup.agent, before, time.time()) == []
    status, run = setup.run("lax")
    assert status == 0
    assert b"WARNING: host keys are not checked" in setup.agent.efci("logs", str(run["id"])).stderr
    # a pinned key that does not match is refused by ssh itself
    wrong = setup.agent.root / "wrong.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(setup.agent.root / "wrong")], check=True)
    setup.agent.efci("key", "trust", "127.0.0.1", "--port", str(s.port), "--owner", OWNER,
                     "--keys", str(wrong))
    status, run = setup.run("strict")
    assert status == 1
    assert b"Host key verification failed" in setup.output(run["id"], "checkout:lib")


def test_the_task_never_sees_the_key(setup: Setup) -> None:
    s = setup.server
    s.create("lib")
    s.commit("lib", {"a": b"a\n"}, "a")
    s.authorize(setup.key(), "lib")
    setup.trust()
    setup.declare({"snoop": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["sh", "-c", "ls -la /efci 2>&1; grep -rl 'OPENSSH PRIVATE' /src /root /tmp "
                 "/etc 2>/dev/null; cat /proc/mounts; echo done"])})
    status, run = setup.run("snoop")
    assert status == 0
    out = setup.output(run["id"])
    assert b"No such file or directory" in out and b"secrets" not in out
    private = (setup.agent.root / "secrets/git-ssh" / OWNER / "private/deploy").read_text()
    body = "".join(private.splitlines()[1:-1])
    for segment in (setup.agent.root / "state/logs" / str(run["id"])).glob("*"):
        data = segment.read_bytes()
        assert body[:40].encode() not in data and b"PRIVATE KEY" not in data
    mounts = json.loads(subprocess.run(
        ["docker", "inspect", "--format", "{{json .Mounts}}", run["container_id"]],
        capture_output=True, check=True).stdout)
    assert sorted((m["Type"], m["Destination"], m["RW"]) for m in mounts) == [
        ("bind", "/run/efci", False), ("bind", "/src/lib", True)]  # worktree, progress
    sources = {m["Destination"]: m["Source"] for m in mounts}
    assert sources["/src/lib"] == str(setup.agent.root / "state/mounts" / str(run["id"]) / "lib")


BAD_ENTRIES = {
    "option revision": {"revision": "--upload-pack=touch {marker}", "mutable": True},
    "bad ref": {"revision": "a..b", "mutable": True},
    "ext url": {"repo_url": "ext::sh -c touch% {marker}"},
    "option url": {"repo_url": "--upload-pack=touch {marker}"},
    "file url": {"repo_url": "file:///etc"},
    "key with slash": {"key": "../../x"},
    "name escaping /src": {"name": "../etc"},
}


@pytest.mark.parametrize("label", BAD_ENTRIES)
def test_bad_checkout_entries_are_refused_before_anything_runs(
        setup: Setup, tmp_path: Path, label: str) -> None:
    marker = tmp_path / "pwned"
    entry = {"repo_url": setup.server.url("x"), "revision": "main", "mutable": True,
             "key": "deploy", **{k: v.format(marker=marker) if isinstance(v, str) else v
                                 for k, v in BAD_ENTRIES[label].items()}}
    setup.agent.declare("tasks.yml", json.dumps(
        {"owner": OWNER, "tasks": {"evil": task(checkout={"repositories": [entry]})}}))
    before = time.time()
    reload = setup.agent.efci("reload", check=False)
    assert reload.returncode == 2 and b"tasks.yml:" in reload.stderr
    assert b"checkout.repositories[0]" in reload.stderr, reload.stderr
    refused = setup.agent.efci("run", "evil", check=False)
    assert refused.returncode == 66
    assert created_containers(setup.agent, before, time.time()) == [] and not marker.exists()


def test_trust_by_scanning_pins_the_servers_real_key(setup: Setup) -> None:
    s = setup.server
    s.create("lib")
    s.commit("lib", {"a": b"scanned\n"}, "a")
    s.authorize(setup.key(), "lib")
    out = setup.agent.efci("key", "trust", "127.0.0.1", "--port", str(s.port), "--owner",
                           OWNER).stdout
    assert b"as read by ssh-keyscan just now" in out
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                                  str(s.host_key.with_suffix(".pub"))],
                                 capture_output=True, check=True).stdout.split()[1]
    assert fingerprint in out  # what the admin compares with the server's own
    setup.declare({"cat": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["cat", "/src/lib/a"])})
    status, run = setup.run("cat")
    assert status == 0 and setup.output(run["id"]) == b"scanned\r\n"


def mtimes(root: Path) -> dict[str, int]:
    """Every path's mtime under a worktree but its .git and itself."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")
            if p.relative_to(root).parts[0] != ".git"}


def test_an_update_rewrites_only_what_changed_and_has_a_first_checkout_s_mtimes(
        setup: Setup) -> None:
    """A mutable update rewrites only the files that changed (the index
    knows the restored times: an unchanged file keeps its inode), and the
    worktree then has exactly the mtimes a first checkout of that commit
    gets, directories included."""
    s = setup.server
    s.create("lib")
    work = s.repos / "lib.work"
    s.commit("lib", {f"d{i % 5}/f{i}.c": b"%d\n" % i for i in range(40)}, "first", when=T0)
    s.commit("lib", {"d1/f1.c": b"one\n", "odd/a*b[1].txt": b"pattern chars\n",
                     ":colon": b"c\n", "gone/soon.txt": b"x\n"}, "second", when=T0 + 100)
    s.authorize(setup.key(), "lib")
    setup.trust()
    track = setup.entry("lib", "main", mutable=True)
    setup.declare({"track": task(checkout={"repositories": [track]})})
    assert setup.run("track")[0] == 0
    kept = volume_dir(setup.volumes[0]) / "d0/f0.c"
    inode = kept.stat().st_ino
    (work / "gone/soon.txt").unlink()  # a deletion empties a directory
    (work / "d2/f7.c").rename(work / "d3/moved.c")  # a rename
    s.commit("lib", {"odd/a*b[1].txt": b"changed\n"}, "third", when=T0 + 200)
    s.commit("lib", {"d0/new.c": b"new\n", ":colon": b"c2\n"}, "fourth", when=T0 + 300)
    assert setup.run("track")[0] == 0
    assert kept.stat().st_ino == inode  # not rewritten
    fresh = setup.entry("lib", "main", mutable=True, name="fresh")
    setup.declare({"track": task(checkout={"repositories": [track]}),
                   "fresh": task(checkout={"repositories": [fresh]})})
    assert setup.run("fresh")[0] == 0
    updated, whole = (mtimes(volume_dir(v)) for v in setup.volumes)
    assert updated == whole
    assert whole["d1/f1.c"] == (T0 + 100) * 10**9 and whole["d0/f0.c"] == T0 * 10**9
    assert whole["odd/a*b[1].txt"] == (T0 + 200) * 10**9 and "gone" not in whole
    # Once more with nothing new: the times are those restored last time,
    # kept, not restored again.
    status, again = setup.run("track")
    assert status == 0 and b"mtimes kept" in setup.output(again["id"], "checkout:lib")
    assert mtimes(volume_dir(setup.volumes[0])) == whole


def volume_dir(name: str) -> Path:
    return Path(subprocess.run(["docker", "volume", "inspect", "--format", "{{.Mountpoint}}",
                                name], capture_output=True, check=True).stdout.decode().strip())
