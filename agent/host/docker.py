"""The engine through the docker CLI: the one place that builds a docker
command line.  Argument builders are pure functions (unit-tested without
Docker); :class:`DockerCLI` runs them through :mod:`agent.host.command`.

Every destroy (stop, remove, remove_image, remove_volumes) is idempotent:
what is already gone is not an error, so teardown and recovery can repeat
them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..errors import CommandFailed, printable
from . import command
from .engine import (
    LABEL_PREFIX,
    ContainerSpec,
    ContainerState,
    Mount,
    NetworkSpec,
    OneShot,
    Output,
    Started,
    Terminal,
)
from .pty import PtyProcess, open_pty_process

# The seed's colour variables: tools each have their own idea of when to colour.
COLOUR_ENV = {"TERM": "xterm-256color", "FORCE_COLOR": "1", "CLICOLOR_FORCE": "1"}

DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "SETFCAP")

# Longest a one-shot container's removal may take once its run is cut short.
CLEANUP_DEADLINE = 30
# Files docker's local log driver rotates a task container's output over.
LOG_FILES = 4


def mount_option(mount: Mount) -> str:
    for value in (mount.source, mount.target):
        if "," in value or "=" in value:
            raise ValueError(f"{value!r} cannot be in a --mount option")
    return f"type={mount.kind},source={mount.source},target={mount.target}" + (
        ",readonly" if mount.readonly else "")


def _labels(labels: dict[str, str]) -> list[str]:
    return [arg for key, value in sorted(labels.items())
            for arg in ("--label", f"{LABEL_PREFIX}{key}={value}")]


def _mounts(mounts: tuple[Mount, ...]) -> list[str]:
    return [arg for mount in mounts for arg in ("--mount", mount_option(mount))]


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
    if spec.memory is not None:  # --memory-swap counts memory and swap together
        argv += ["--memory", str(spec.memory),
                 "--memory-swap", str(spec.memory + (spec.swap or 0))]
    if spec.pids is not None:
        argv += ["--pids-limit", str(spec.pids)]
    if spec.cpus is not None:
        argv += ["--cpus", f"{spec.cpus:g}"]
    if spec.tty:
        argv.append("--tty")
    if spec.tty and spec.log_keep:
        # Output is read through the attached client; docker keeps its own
        # copy only so that an agent that restarts can read what it missed
        # (the local driver is binary-safe; json-file is not).  Rotation is
        # bounded by the run's own log limit.
        part = max(spec.log_keep // LOG_FILES, 1 << 20)
        argv += ["--log-driver", "local", "--log-opt", f"max-size={part}",
                 "--log-opt", f"max-file={LOG_FILES}", "--log-opt", "compress=false"]
    else:
        argv += ["--log-driver", "none"]
    if spec.interactive:
        argv.append("--interactive")
    if spec.entrypoint is not None:
        argv += ["--entrypoint", spec.entrypoint]
    argv += _labels(spec.labels)
    for key, value in {**COLOUR_ENV, **spec.env}.items():
        argv += ["--env", f"{key}={value}"]
    argv += _mounts(spec.mounts)
    argv.append(spec.image)
    if spec.command:
        argv += list(spec.command)
    return argv


def run_container_argv(docker: str, spec: ContainerSpec, cidfile: Path) -> list[str]:
    """``docker run`` of what :func:`create_argv` creates, started at once
    and attached, its id written to ``cidfile``.  No --rm: the container is
    kept.  --sig-proxy=false: a hangup of the client (its agent died) must
    not reach the task, which the next agent re-attaches to."""
    return [docker, "run", "--cidfile", str(cidfile), "--sig-proxy=false",
            *create_argv(docker, spec)[2:]]


def run_argv(docker: str, spec: OneShot, *, tty: bool) -> list[str]:
    """``docker run --rm`` of a one-shot container."""
    argv = [docker, "run", "--rm", "--name", spec.name, "--network", spec.network,
            "--log-driver", "none", "--security-opt", "no-new-privileges"]
    if tty:
        argv.append("--tty")
    for capability in spec.cap_drop:
        argv += ["--cap-drop", capability]
    for capability in spec.cap_add:
        argv += ["--cap-add", capability]
    return [*argv, *_mounts(spec.mounts), *_labels(spec.labels), spec.image, *spec.args]


def build_argv(docker: str, tag: str, context: Path, *, dockerfile: Path | None,
               build_args: dict[str, str], labels: dict[str, str]) -> list[str]:
    """``docker build``; without a ``dockerfile`` it is read from stdin.
    --force-rm: the classic builder otherwise keeps the container of a step
    that failed, one stopped container left on the host per failed build."""
    argv = [docker, "build", "--force-rm", "--tag", tag, "--file",
            str(dockerfile) if dockerfile else "-"]
    for key, value in sorted(build_args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    return [*argv, *_labels(labels), str(context)]


def network_argv(docker: str, spec: NetworkSpec) -> list[str]:
    return [docker, "network", "create", "--driver", "bridge", "--subnet", spec.subnet,
            "--gateway", spec.gateway,
            "--opt", f"com.docker.network.bridge.name={spec.bridge}",
            "--opt", f"com.docker.network.bridge.enable_icc={str(spec.icc).lower()}",
            *_labels(spec.labels), spec.name]


def _normalise_ref(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last or "@" in last else ref + ":latest"


class _Started:
    """``docker run``'s terminal, and the container's id from its cidfile:
    the client creates the file empty when it starts and writes the id
    once dockerd has created the container."""

    def __init__(self, terminal: PtyProcess, cidfile: Path) -> None:
        self._terminal = terminal
        self._cidfile = cidfile
        self._id: str | None = None
        self._created_at: float | None = None
        self.receive_some = terminal.receive_some
        self.send_all = terminal.send_all
        self.resize = terminal.resize
        self.wait = terminal.wait

    @property
    def created_at(self) -> float | None:
        return self._created_at

    def _read(self) -> str | None:
        try:
            with open(self._cidfile, "rb") as f:
                text = f.read().decode("ascii", "replace").strip()
                written = os.fstat(f.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None
        if len(text) != 64:
            return None
        # The file's time is when docker wrote it: on the monotonic clock,
        # without the delay of noticing it.
        self._created_at = time.monotonic() - max(0, time.time_ns() - written) / 1e9
        return text

    async def created(self) -> str | None:
        pause = 0.001
        while self._id is None:
            ended = self._terminal.process.poll() is not None  # before the read: its last word
            self._id = self._read()
            if self._id is None and ended:
                return None
            if self._id is None:
                await trio.sleep(pause)
                pause = min(pause * 2, 0.02)
        return self._id


def _missing(result_stderr: bytes) -> bool:
    return b"No such" in result_stderr or b"no such" in result_stderr


class DockerCLI:
    """The :class:`~agent.host.engine.Engine`, by running ``docker``."""

    def __init__(self, program: str = "docker") -> None:
        self.program = program
        self._store: tuple[Path, str] | None = None  # docker's root and storage driver
        self._tags_read: tuple[tuple[int, int], dict[str, str]] = ((0, 0), {})

    async def _store_of(self) -> tuple[Path, str]:
        """Where dockerd keeps things, asked once: the run path finds its
        volumes and image tags there without a docker process."""
        if self._store is None:
            root, driver = (await self._run("info", "--format", "{{.DockerRootDir}}\n"
                                            "{{.Driver}}")).decode().split("\n")[:2]
            self._store = Path(root.strip()), driver.strip()
        return self._store

    async def _local_volume(self, name: str) -> Path | None:
        """The local driver's directory of the volume, if it is there: found
        without a docker process (the run path asks for several)."""
        path = (await self._store_of())[0] / "volumes" / name / "_data"
        return path if path.is_dir() else None

    async def _run(self, *args: str, stdin: bytes = b"") -> bytes:
        return (await command.run([self.program, *args], stdin=stdin)).stdout

    async def _answers(self, *args: str) -> bool:
        """Whether the command succeeds (an inspect: whether the thing exists)."""
        return (await command.run([self.program, *args], check=False)).returncode == 0

    async def _destroy(self, *args: str) -> None:
        argv = [self.program, *args]
        result = await command.run(argv, check=False)
        if result.returncode != 0 and not _missing(result.stderr):
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)

    async def version(self) -> str:
        return (await self._run("version", "--format", "{{.Server.Version}}")).decode().strip()

    async def root_dir(self) -> Path:
        return (await self._store_of())[0]

    # -- images --

    async def present_images(self, refs: set[str]) -> set[str]:
        if not refs:
            return set()
        have = set((await self._run("image", "ls", "--format",
                                    "{{.Repository}}:{{.Tag}}")).decode().split())
        return {ref for ref in refs if _normalise_ref(ref) in have}

    async def image_exists(self, ref: str) -> bool:
        return await self._answers("image", "inspect", ref)

    async def image_id(self, ref: str) -> str | None:
        """From dockerd's own record of its tags, ``repositories.json`` in its
        image store (the graph drivers' store; not the containerd one, whose
        directory is not there), read again only when it changed: no docker
        process on the run path.  None where there is no such record."""
        root, driver = await self._store_of()
        record = root / "image" / driver / "repositories.json"
        try:
            stat = record.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._tags_read[0]:
                tags = json.loads(record.read_bytes())["Repositories"]
                self._tags_read = ((stat.st_mtime_ns, stat.st_size),
                                   {name: image for repository in tags.values()
                                    for name, image in repository.items()})
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return self._tags_read[1].get(_normalise_ref(ref))

    async def build(self, tag: str, context: Path, *, output: Output,
                    dockerfile: Path | None = None, inline: str | None = None,
                    build_args: dict[str, str] | None = None,
                    labels: dict[str, str] | None = None) -> int:
        argv = build_argv(self.program, tag, context, dockerfile=dockerfile,
                          build_args=build_args or {}, labels=labels or {})
        return await command.stream(argv, output=output,
                                    stdin=inline.encode() if inline is not None else b"")

    async def remove_image(self, ref: str) -> None:
        await self._destroy("image", "rm", "--force", ref)

    async def labelled_images(self, labels: dict[str, str]) -> list[str]:
        filters = [arg for key, value in labels.items() for arg in (
            "--filter", f"label={LABEL_PREFIX}{key}" + (f"={value}" if value else ""))]
        out = await self._run("images", *filters, "--format", "{{.Repository}}:{{.Tag}}")
        return [line for line in out.decode(errors="replace").splitlines()
                if line and "<none>" not in line]

    async def container_sizes(self, names: list[str]) -> dict[str, int]:
        if not names:
            return {}
        result = await command.run([self.program, "container", "inspect", "--size", "--format",
                                    "{{.Name}}\t{{.SizeRw}}", *names], check=False)
        sizes = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            name, _, size = line.partition("\t")
            if size.isdigit():
                sizes[name.lstrip("/")] = int(size)
        return sizes

    async def image_config(self, ref: str) -> tuple[list[str], list[str]]:
        config = json.loads(await self._run("image", "inspect", "--format", "{{json .Config}}",
                                            ref)) or {}
        return list(config.get("Entrypoint") or []), list(config.get("Cmd") or [])

    async def commit(self, container: str, image: str) -> None:
        await self._run("commit", "--pause=false", container, image)

    # -- containers --

    async def create(self, spec: ContainerSpec) -> str:
        return (await command.run(create_argv(self.program, spec))).stdout.decode().strip()

    @asynccontextmanager
    async def attach(self, container: str, *, cols: int, rows: int,
                     interactive: bool = False) -> AsyncIterator[Terminal]:
        argv = [self.program, "start", "--attach", *(["--interactive"] if interactive else []),
                container]
        async with open_pty_process(argv, cols=cols, rows=rows,
                                    interactive=interactive) as terminal:
            yield terminal

    @asynccontextmanager
    async def run_container(self, spec: ContainerSpec, *, cols: int,
                            rows: int) -> AsyncIterator[Started]:
        with tempfile.TemporaryDirectory(prefix="efci-run-") as directory:
            cidfile = Path(directory) / "cid"  # docker refuses one that exists
            async with open_pty_process(run_container_argv(self.program, spec, cidfile),
                                        cols=cols, rows=rows) as terminal:
                yield _Started(terminal, cidfile)

    @asynccontextmanager
    async def run_attached(self, spec: OneShot, *, cols: int,
                           rows: int) -> AsyncIterator[Terminal]:
        ended = False
        try:
            async with open_pty_process(run_argv(self.program, spec, tty=True),
                                        cols=cols, rows=rows) as terminal:
                yield terminal
                ended = terminal.process.returncode is not None
        finally:
            # Killing `docker run` leaves its container: --rm removes it only
            # when it ends by itself.
            if not ended:
                with trio.move_on_after(CLEANUP_DEADLINE) as cleanup:
                    cleanup.shield = True
                    await self.remove(spec.name)

    async def run(self, spec: OneShot) -> tuple[int, bytes]:
        result = await command.run(run_argv(self.program, spec, tty=False), check=False)
        return result.returncode, result.stdout + result.stderr

    async def inspect(self, container: str) -> ContainerState | None:
        argv = [self.program, "container", "inspect", "--format",
                "[{{json .HostConfig.LogConfig.Type}}, {{json .State}}, {{json .Image}}, "
                "{{json .GraphDriver.Data}}, {{json .Id}}]", container]
        result = await command.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return None
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
        log_driver, state, image, layers, container_id = json.loads(result.stdout)
        return ContainerState(state["Status"], int(state["ExitCode"]), image,
                              bool(state.get("OOMKilled")), state.get("StartedAt", ""),
                              log_driver == "local",
                              # overlay2's; other storage drivers name none
                              (layers or {}).get("UpperDir", ""), container_id)

    @asynccontextmanager
    async def kept_output(self, container: str,
                          since: str) -> AsyncIterator[trio.abc.ReceiveStream]:
        # Not --follow: dockerd 20.10's follow of the local driver can end
        # before the last entries (and reads slowly); a finished container's
        # copy, read once, is whole.
        argv = [self.program, "logs", "--since", since, container]
        async with command.spawned(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL) as process:
            assert process.stdout is not None
            yield process.stdout

    async def stop(self, container: str, *, grace: int) -> None:
        await self._destroy("stop", "--time", str(grace), container)

    async def remove(self, container: str) -> None:
        await self._destroy("rm", "--force", "--volumes", container)

    # -- volumes --

    async def volume_exists(self, name: str) -> bool:
        return (await self._local_volume(name) is not None
                or await self._answers("volume", "inspect", name))

    async def create_volume(self, name: str, labels: dict[str, str]) -> None:
        await self._run("volume", "create",
                        *(a for k, v in labels.items() for a in ("--label", f"{k}={v}")), name)

    async def volume_path(self, name: str) -> Path:
        return await self._local_volume(name) or Path((await self._run(
            "volume", "inspect", "--format", "{{.Mountpoint}}", name)).decode().strip())

    async def remove_volumes(self, names: list[str]) -> None:
        if names:
            await self._destroy("volume", "rm", "--force", *names)

    async def labelled(self, kind: str, labels: dict[str, str], key: str) -> dict[str, str]:
        filters = [arg for k, value in labels.items()
                   for arg in ("--filter", f"label={LABEL_PREFIX}{k}={value}")]
        listing, name = ((["ps", "--all"], "{{.Names}}") if kind == "container"
                         else (["volume", "ls"], "{{.Name}}"))
        out = await self._run(*listing, *filters, "--format",
                              name + '\t{{.Label "' + LABEL_PREFIX + key + '"}}')
        found = {}
        for line in out.decode(errors="replace").splitlines():
            item, _, value = line.partition("\t")
            if item:
                found[item] = value
        return found

    # -- networks --

    async def network(self, name: str) -> NetworkSpec | None:
        result = await command.run([self.program, "network", "inspect", name], check=False)
        if result.returncode != 0:
            return None
        info = json.loads(result.stdout)[0]
        config = (info.get("IPAM", {}).get("Config") or [{}])
        options = info.get("Options") or {}
        return NetworkSpec(
            name=name, bridge=options.get("com.docker.network.bridge.name", ""),
            subnet=",".join(c.get("Subnet", "") for c in config),
            gateway=config[0].get("Gateway", ""),
            icc=options.get("com.docker.network.bridge.enable_icc", "true") != "false",
            labels={k.removeprefix(LABEL_PREFIX): v for k, v in (info.get("Labels") or {}).items()
                    if k.startswith(LABEL_PREFIX)})

    async def create_network(self, spec: NetworkSpec) -> None:
        await command.run(network_argv(self.program, spec))


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
