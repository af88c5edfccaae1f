"""The seed's experiment 01, replaced: its config.yml, declared as a task."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from .conftest import OWNER, Setup

EXAMPLES = Path(__file__).parents[2] / "examples/conf.d"


def test_the_rsync_publish_experiment_runs_as_a_task(setup: Setup, tmp_path: Path) -> None:
    s = setup.server
    s.create("websperiments")
    s.commit("websperiments", {"index.html": b"<h1>hi</h1>\n", "old.css": b"p {}\n",
                               "blog/post.md": b"# post\n"}, "site")
    s.authorize(setup.key("websperiments-deploy"), "websperiments")
    setup.trust()
    sites = tmp_path / "sites.efforting.tech"
    sites.mkdir()
    setup.agent.configure(f"deploy_targets:\n  sites:\n    path: {sites}\n"
                          f"    allow: [{OWNER}/rsync-publish]\n")
    setup.agent.stop()
    setup.agent.start()

    # The experiment's own config.yml, with only its values pointed at this machine.
    config = yaml.safe_load((EXAMPLES / "rsync-publish.yml").read_text())
    config["user"] = OWNER
    config["secrets_base"] = str(setup.agent.root / "secrets")
    config["checkout"]["repositories"][0]["repo_url"] = s.url("websperiments")
    config["task"]["deploy_target"] = str(sites)
    conf_d = setup.agent.conf_d
    (conf_d / "rsync-publish.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(EXAMPLES / "images.yml", conf_d)
    shutil.copytree(EXAMPLES / "ci-rsync", conf_d / "ci-rsync")
    assert setup.agent.efci("reload").returncode == 0
    built = subprocess.run(["docker", "image", "ls", "--quiet", "efci/image-ci-rsync"],
                           capture_output=True, check=True).stdout.decode().split()
    if built:  # an earlier run on this machine built it: make this one build it again
        subprocess.run(["docker", "image", "rm", "--force", *built], capture_output=True,
                       check=True)
    setup.entry("websperiments", "main", mutable=True, key="websperiments-deploy")  # cleanup

    status, run = setup.run("rsync-publish")
    assert status == 0, setup.agent.efci("logs", str(run["id"])).stdout
    site = sites / "websperiments"
    assert (site / "index.html").read_bytes() == b"<h1>hi</h1>\n"
    assert (site / "blog/post.md").exists() and (site / "old.css").exists()
    assert b"building image ci-rsync" in setup.agent.efci("logs", str(run["id"])).stderr

    git_rm = s.repos / "websperiments.work" / "old.css"
    git_rm.unlink()
    s.commit("websperiments", {"index.html": b"<h1>hello</h1>\n"}, "drop old.css")
    status, run = setup.run("rsync-publish")
    assert status == 0
    assert (site / "index.html").read_bytes() == b"<h1>hello</h1>\n"
    assert not (site / "old.css").exists()  # --delete honoured
    assert b"building image" not in setup.agent.efci("logs", str(run["id"])).stderr  # reused

    # Where the second run's time went, from the checkout container's own steps
    # to the recorded end, as efci show prints it and its JSON gives it.
    phases = [(p["phase"], p["within"]) for p in run["timings"]]
    for phase in [("queued", None), ("checkout websperiments", None),
                  ("container start", "checkout websperiments"),
                  ("fetch", "checkout websperiments"), ("checkout", "checkout websperiments"),
                  ("mtimes", "checkout websperiments"), ("overlay mounts", None),
                  ("container create", None), ("run", None), ("teardown", None),
                  ("recording the end", None)]:
        assert phase in phases, (phase, phases)
    took = run["finished_at"] - run["created_at"]
    assert sum(p["seconds"] for p in run["timings"] if p["within"] is None) <= took
    shown = setup.agent.efci("show", str(run["id"])).stdout.decode()
    assert re.search(r"\n    fetch +[0-9.]+ ms\n", shown), shown
