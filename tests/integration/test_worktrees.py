"""Overlay worktrees: tasks write freely over a base that never changes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

from agent.host.mounts import mounted_under

from .conftest import Setup, task
from .test_agent import show, wait_for

MESS = """
set -e
cd /src/lib
rm README                       # a whiteout over a lower file
echo changed >> src/main.c      # copy-up and edit
echo new > added.txt            # a new file
mkdir -p build && echo obj > build/main.o
mv docs manual                  # a directory rename
rm -r tests                     # a whiteout of a whole directory
ls
"""


def tree_digest(root: Path) -> str:
    """Names, modes, mtimes and contents of everything under root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest.update(f"{path.relative_to(root)} {st.st_mode} {st.st_mtime_ns}\n".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def volume_dir(name: str) -> Path:
    return Path(subprocess.run(["docker", "volume", "inspect", "--format", "{{.Mountpoint}}",
                                name], capture_output=True, check=True).stdout.decode().strip())


def upper_layer(setup: Setup, run: int, stage: int = 0) -> Path:
    """The upper layer of a run's first worktree (of a pipeline's stage),
    in the agent's layers volume."""
    layers = volume_dir(f"efci-{setup.agent.instance()}-layers") / str(run)
    return layers / (f"0-s{stage}" if stage else "0") / "upper"


def make_repo(setup: Setup) -> str:
    s = setup.server
    s.create("lib")
    sha = s.commit("lib", {"README": b"read me\n", "src/main.c": b"int main;\n",
                     "docs/guide.md": b"guide\n", "tests/t1": b"t\n", "tests/t2": b"t\n"},
             "a project")
    s.authorize(setup.key(), "lib")
    setup.trust()
    return sha


def test_a_task_writes_freely_and_the_base_never_changes(setup: Setup) -> None:
    sha = make_repo(setup)  # pinned: no checkout runs between the digests
    setup.declare({
        "mess": task(checkout={"repositories": [setup.entry("lib", sha, mutable=False)]},
                     command=["sh", "-c", MESS]),
        "look": task(checkout={"repositories": [setup.entry("lib", sha, mutable=False)]},
                     command=["sh", "-c", "cd /src/lib && ls && cat src/main.c"]),
    })
    status, first = setup.run("look")
    assert status == 0
    base = volume_dir(first["worktrees"][0]["volume"])
    before = tree_digest(base)

    status, run = setup.run("mess")
    assert status == 0, setup.agent.efci("logs", str(run["id"])).stdout
    listing = setup.output(run["id"]).split()
    assert set(listing) == {b"added.txt", b"build", b"manual", b"src"}
    assert tree_digest(base) == before  # the base worktree is untouched

    upper = upper_layer(setup, run["id"])
    assert (upper / "added.txt").read_bytes() == b"new\n"
    assert (upper / "src/main.c").read_bytes() == b"int main;\nchanged\n"
    readme = os.lstat(upper / "README")  # overlayfs whiteout: a 0/0 character device
    assert (readme.st_mode & 0o170000, readme.st_rdev) == (0o020000, 0)

    status, run = setup.run("look")  # a later run starts from the base again
    out = setup.output(run["id"])
    assert b"README" in out and b"changed" not in out and b"added.txt" not in out
    assert mounted_under(setup.agent.root / "state/mounts") == []


def test_runs_do_not_see_each_others_writes(setup: Setup) -> None:
    make_repo(setup)
    entry = setup.entry("lib", "main", mutable=True)
    setup.declare({
        # Each run writes its own container's name, waits while the other
        # writes, then reads the file back: a shared upper layer would show
        # one run the other's name.
        "writer": task(checkout={"repositories": [entry]},
                       command=["sh", "-c", "echo $HOSTNAME > /src/lib/mine; sleep 3; "
                                "echo wrote $HOSTNAME; echo read $(cat /src/lib/mine)"]),
    })
    first = json.loads(setup.agent.efci("--json", "run", "writer").stdout)["id"]
    second = json.loads(setup.agent.efci("--json", "run", "writer").stdout)["id"]
    names = []
    for run in (first, second):
        wait_for(lambda run=run: show(setup.agent, run)["status"] == "succeeded", timeout=120,
                 what=f"run {run}")
        wrote, read = setup.output(run).split(b"\r\n")[:2]
        assert wrote.startswith(b"wrote ") and read == b"read " + wrote[6:], (wrote, read)
        names.append(wrote)
    assert names[0] != names[1]  # two containers, two names, each read back its own
    assert mounted_under(setup.agent.root / "state/mounts") == []


def test_nothing_stays_mounted_after_the_agent_stops_or_dies(setup: Setup) -> None:
    make_repo(setup)
    setup.declare({"long": task(
        checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
        command=["sleep", "600"])})
    mounts = setup.agent.root / "state/mounts"
    setup.agent.efci("run", "long")
    wait_for(lambda: mounted_under(mounts), timeout=120, what="the overlay mounted")
    assert setup.agent.stop(signal.SIGTERM) == 0
    assert mounted_under(mounts) == []

    setup.agent.start()
    setup.agent.efci("run", "long")
    wait_for(lambda: mounted_under(mounts) and setup.agent.containers(running=True),
             timeout=120, what="the container running over its overlay")
    setup.agent.stop(signal.SIGKILL)
    assert mounted_under(mounts), "a killed agent leaves its mount"
    setup.agent.start()  # recovery unmounts; the container runs on, re-attached
    assert mounted_under(mounts) == []
    assert show(setup.agent, 2)["status"] == "running"
    setup.agent.efci("cancel", "2")
    assert show(setup.agent, 2)["status"] == "cancelled"
    assert mounted_under(mounts) == []
