"""The docker CLI: pure argument builders and thin async calls.

Every destroy here (stop, remove) is idempotent: a container that is
already gone is not an error, so teardown and recovery can repeat them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CommandFailed, printable
from . import command

# The seed's colour variables: tools each have their own idea of when to colour.
COLOUR_ENV = {"TERM": "xterm-256color", "FORCE_COLOR": "1", "CLICOLOR_FORCE": "1"}

LABEL_PREFIX = "org.efforting-ci."

DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "SETFCAP")


@dataclass(frozen=True)
class Mount:
    kind: str  # "volume" or "bind"
    source: str  # a volume name or a host path
    target: str
    readonly: bool

    def option(self) -> str:
        for value in (self.source, self.target):
            if "," in value or "=" in value:
                raise ValueError(f"{value!r} cannot be in a --mount option")
        return f"type={self.kind},source={self.source},target={self.target}" + (
            ",readonly" if self.readonly else "")


@dataclass(frozen=True)
class ContainerSpec:
    """What a task container is made of; built by the run code, checked here."""

    name: str
    image: str
    command: tuple[str, ...] | None
    network: str  # "none" or a docker network name; never "host"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    tty: bool = False
    interactive: bool = False  # keep stdin open (efci shell)
    entrypoint: str | None = None
    memory: int | None = None  # bytes, swap included
    pids: int | None = None  # processes and threads at once


def create_argv(docker: str, spec: ContainerSpec) -> list[str]:
    """``docker create`` for a task container.

    Task containers never get host networking, privileges, devices or the
    docker socket: nothing here can add them, and the network is refused
    outright.  Dropped from Docker's default capabilities: NET_RAW (no raw
    sockets, no ping floods, no ARP spoofing on the bridge), MKNOD (no
    device nodes, in a deploy target or anywhere) and SETFCAP (no file
    capabilities); no process may gain privileges by setuid.  SETUID and
    SETGID stay: package managers and su inside the image need them, and
    they give nothing outside the container.
    """
    if spec.network in ("host", "") or spec.network.startswith("container:"):
        raise ValueError(f"refusing network {spec.network!r} for a task container")
    # --init: a tiny init as PID 1 forwards SIGTERM to the task and reaps
    # zombies, so stopping a run does not always wait out the grace period.
    argv = [docker, "create", "--name", spec.name, "--init", "--network", spec.network,
            "--security-opt", "no-new-privileges"]
    for capability in DROPPED_CAPABILITIES:
        argv += ["--cap-drop", capability]
    if spec.memory is not None:  # --memory-swap the same: no swap beyond it
        argv += ["--memory", str(spec.memory), "--memory-swap", str(spec.memory)]
    if spec.pids is not None:
        argv += ["--pids-limit", str(spec.pids)]
    if spec.tty:
        # Output is read through the attached client; docker need not keep
        # a second copy in its json-file log.
        argv += ["--tty", "--log-driver", "none"]
    if spec.interactive:
        argv.append("--interactive")
    if spec.entrypoint is not None:
        argv += ["--entrypoint", spec.entrypoint]
    for key, value in sorted(spec.labels.items()):
        argv += ["--label", f"{LABEL_PREFIX}{key}={value}"]
    for key, value in {**COLOUR_ENV, **spec.env}.items():
        argv += ["--env", f"{key}={value}"]
    for mount in spec.mounts:
        argv += ["--mount", mount.option()]
    argv.append(spec.image)
    if spec.command:
        argv += list(spec.command)
    return argv


def start_attached_argv(docker: str, container: str) -> list[str]:
    return [docker, "start", "--attach", container]


async def commit(docker: str, container: str, image: str) -> None:
    """An image of the container's filesystem as it is now."""
    await command.run([docker, "commit", "--pause=false", container, image])


async def remove_image(docker: str, image: str) -> None:
    await command.run([docker, "image", "rm", "--force", image], check=False)


async def server_version(docker: str) -> str:
    """dockerd's version; raises CommandFailed when it does not answer."""
    result = await command.run([docker, "version", "--format", "{{.Server.Version}}"])
    return result.stdout.decode().strip()


async def root_dir(docker: str) -> Path:
    """Where dockerd keeps images, containers and volumes."""
    result = await command.run([docker, "info", "--format", "{{.DockerRootDir}}"])
    return Path(result.stdout.decode().strip())


def _normalise_ref(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last or "@" in last else ref + ":latest"


async def present_images(docker: str, refs: set[str]) -> set[str]:
    """Which of ``refs`` exist locally (one ``docker image ls``)."""
    if not refs:
        return set()
    result = await command.run([docker, "image", "ls", "--format",
                                "{{.Repository}}:{{.Tag}}"])
    have = set(result.stdout.decode().split())
    return {ref for ref in refs if _normalise_ref(ref) in have}


async def create(docker: str, spec: ContainerSpec) -> str:
    result = await command.run(create_argv(docker, spec))
    return result.stdout.decode().strip()


@dataclass(frozen=True)
class ContainerState:
    status: str  # created, running, exited, ...
    exit_code: int
    image_id: str
    oom_killed: bool  # the kernel's OOM killer stopped a process in it


async def inspect(docker: str, container: str) -> ContainerState | None:
    """The container's state, or None if there is no such container."""
    result = await command.run(
        [docker, "container", "inspect", "--format", "{{json .State}} {{json .Image}}",
         container], check=False)
    if result.returncode != 0:
        if b"No such" in result.stderr or b"no such" in result.stderr:
            return None
        raise CommandFailed(result.args, result.returncode, result.stdout, result.stderr)
    state_json, image_json = result.stdout.decode().rsplit(" ", 1)
    state = json.loads(state_json)
    return ContainerState(state["Status"], int(state["ExitCode"]), json.loads(image_json),
                          bool(state.get("OOMKilled")))


async def volume_exists(docker: str, volume: str) -> bool:
    result = await command.run([docker, "volume", "inspect", volume], check=False)
    return result.returncode == 0


async def create_volume(docker: str, volume: str, labels: dict[str, str]) -> None:
    argv = [docker, "volume", "create"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    await command.run([*argv, volume])


async def volume_path(docker: str, volume: str) -> Path:
    """The host directory holding a local volume's data."""
    result = await command.run([docker, "volume", "inspect", "--format", "{{.Mountpoint}}",
                                volume])
    return Path(result.stdout.decode().strip())


async def remove_volumes(docker: str, labels: dict[str, str]) -> None:
    """Remove the volumes that carry all these labels; idempotent."""
    filters = [arg for key, value in labels.items()
               for arg in ("--filter", f"label={LABEL_PREFIX}{key}={value}")]
    result = await command.run([docker, "volume", "ls", "--quiet", *filters])
    names = result.stdout.decode().split()
    if names:
        await command.run([docker, "volume", "rm", "--force", *names])


async def stop(docker: str, container: str, *, grace: int) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; idempotent."""
    await _ignoring_missing([docker, "stop", "--time", str(grace), container])


async def remove(docker: str, container: str) -> None:
    """Remove the container (and its anonymous volumes); idempotent."""
    await _ignoring_missing([docker, "rm", "--force", "--volumes", container])


async def _ignoring_missing(argv: list[str]) -> None:
    result = await command.run(argv, check=False)
    if result.returncode != 0 and b"No such container" not in result.stderr:
        raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)


# What the docker CLI says when the engine is not there (stopped, restarting).
_UNREACHABLE = ("Cannot connect to the Docker daemon", "Is the docker daemon running",
                "error during connect", "docker.sock: connect")


def explain(e: CommandFailed) -> str:
    """A docker failure in words for a run's record: dockerd going away is
    said plainly; anything else names the docker command and what it said."""
    said = printable(e.stderr_text.splitlines()[-1] if e.stderr_text else "")
    if any(words in e.stderr_text for words in _UNREACHABLE):
        return (f"dockerd stopped answering during the run ({said}); "
                "the run's container may be gone with it: see docker ps -a")
    words = [Path(e.argv[0]).name] if e.argv else ["a program"]
    for arg in e.argv[1:3]:  # the command, up to its first option: docker container inspect
        if arg.startswith("-"):
            break
        words.append(arg)
    return f"{' '.join(words)} failed with exit status {e.returncode}" + (
        f": {said}" if said else "")
