from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.host import docker
from agent.host.engine import ContainerSpec, Mount, NetworkSpec, OneShot
from agent.model import Limits, Network, Task
from agent.runs import container_spec

CFG = config.defaults(config.Layout.under(Path("/tmp/x")))


def task(**kw: object) -> Task:
    return Task(**{"name": "t", "owner": "o", "source": "f:1", "image": "img:1",  # type: ignore[arg-type]
                   "command": ("echo", "$(hostname)", "; rm -rf /"), **kw})


def test_task_container_is_unprivileged_and_keeps_arguments_whole() -> None:
    argv = docker.create_argv("docker", container_spec(CFG, "abcd", 7, task(env={"A": "x y"})))
    assert argv[:4] == ["docker", "create", "--name", "efci-abcd-7"]
    options = " ".join(argv[: argv.index("img:1")])
    for forbidden in ("--privileged", "--cap-add", "--device", "docker.sock", "host"):
        assert forbidden not in options
    assert argv[argv.index("--security-opt"):][:2] == ["--security-opt", "no-new-privileges"]
    dropped = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-drop"}
    assert dropped == {"NET_RAW", "MKNOD", "SETFCAP"}
    assert argv[-4:] == ["img:1", "echo", "$(hostname)", "; rm -rf /"]
    assert "A=x y" in argv and "TERM=xterm-256color" in argv and "FORCE_COLOR=1" in argv
    assert "--label" in argv and "org.efforting-ci.run=7" in argv


def test_network_policy() -> None:
    none = docker.create_argv("docker", container_spec(CFG, "a", 1, task(network=Network.NONE)))
    assert none[none.index("--network") + 1] == "none"
    for bad in ("host", "container:abc", ""):
        spec = ContainerSpec(name="n", image="i", command=None, network=bad)
        with pytest.raises(ValueError, match="refusing network"):
            docker.create_argv("docker", spec)


def test_image_default_command_is_kept() -> None:
    argv = docker.create_argv("docker", container_spec(CFG, "a", 1, task(command=None)))
    assert argv[-1] == "img:1"


def test_limits_reach_the_container() -> None:
    """agent.yml's defaults, unless the declaration sets its own."""
    argv = docker.create_argv("docker", container_spec(CFG, "a", 1, task()))
    assert argv[argv.index("--memory") + 1] == str(4 << 30)
    assert argv[argv.index("--memory-swap") + 1] == str(4 << 30)  # no swap beyond it
    assert argv[argv.index("--pids-limit") + 1] == "4096"
    assert "--cpus" not in argv
    declared = task(limits=Limits(cpus=1.5, memory=1 << 30, swap=512 << 20, pids=100))
    argv = docker.create_argv("docker", container_spec(CFG, "a", 1, declared))
    assert argv[argv.index("--memory") + 1] == str(1 << 30)
    assert argv[argv.index("--memory-swap") + 1] == str((1 << 30) + (512 << 20))
    assert argv[argv.index("--pids-limit") + 1] == "100"
    assert argv[argv.index("--cpus") + 1] == "1.5"


def test_a_one_shot_container_keeps_only_what_it_is_given() -> None:
    spec = OneShot(name="efci-x-1-checkout-0", image="efci/checkout:1", args=("--url", "u"),
                   network="host", mounts=(Mount("volume", "v", "/worktree", readonly=False),),
                   labels={"instance": "x"}, cap_add=("DAC_OVERRIDE",))
    argv = docker.run_argv("docker", spec, tty=True)
    assert argv[:5] == ["docker", "run", "--rm", "--name", "efci-x-1-checkout-0"]
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--cap-add") + 1] == "DAC_OVERRIDE" and "--tty" in argv
    assert "org.efforting-ci.instance=x" in argv
    assert argv[-3:] == ["efci/checkout:1", "--url", "u"]


def test_builds_and_networks() -> None:
    argv = docker.build_argv("docker", "t:1", Path("/ctx"), dockerfile=None,
                             build_args={"BASE": "b"}, labels={"image": "i"})
    assert argv == ["docker", "build", "--force-rm", "--tag", "t:1", "--file", "-",
                    "--build-arg", "BASE=b",
                    "--label", "org.efforting-ci.image=i", "/ctx"]
    net = docker.network_argv("docker", NetworkSpec("efci", "efci0", "172.30.0.0/24",
                                                    "172.30.0.1"))
    assert "com.docker.network.bridge.enable_icc=false" in net and net[-1] == "efci"
