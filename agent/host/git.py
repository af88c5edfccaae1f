"""The checkout container: what it is given and how it is started.

Pure functions: the one-shot container for one repository entry, the ssh
host a URL names, and the worktree volume's name and labels (the seed
experiment's rule, byte for byte).  The program inside the
container is ``agent/checkout_image/efci-checkout``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..model import Repository
from ..names import FULL_SHA, is_host
from .engine import Mount, OneShot

CHECKOUT_PROGRAM = "/usr/local/bin/efci-checkout"
HEAD_LINE = re.compile(rb"efci-checkout: HEAD ([0-9a-f]{40,64})")
STEPS_LINE = re.compile(rb"efci-checkout: steps ((?:[a-z]+=[0-9]+\.[0-9]+ ?)+)")


def checkout_steps(output: bytes) -> list[tuple[str, float]]:
    """The checkout program's clock readings (CLOCK_MONOTONIC): its start,
    then the end of each step, in order; none if it printed none."""
    found = STEPS_LINE.findall(output)
    if not found:
        return []
    return [(name, float(at)) for name, _, at in
            (pair.partition("=") for pair in found[-1].decode().split())]


def worktree_volume_name(owner: str, entry: dict[str, object]) -> str:
    """``ci-worktree-`` + 24 hex digits of sha256(owner, NUL, entry as JSON).

    The JSON is what JavaScript's ``JSON.stringify`` gives for the entry with
    its keys sorted: compact, non-ASCII kept as UTF-8 (index.mjs in the seed's
    experiment 01), so volumes the experiment made are found again.
    """
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(owner.encode() + b"\0" + canonical.encode()).hexdigest()
    return f"ci-worktree-{digest[:24]}"


def volume_labels(owner: str, repo: Repository) -> dict[str, str]:
    """The labels the experiment sets on a worktree volume."""
    return {"ci.owner": owner, "ci.repo_url": repo.repo_url, "ci.revision": repo.revision,
            "ci.mutable": "true" if repo.mutable else "false"}


# A user name as ssh takes it: never one that begins with '-' (an option).
_USER = r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?"
_SCP_LIKE = re.compile(_USER + r"(\[[^\]]+\]|[^:/@]+):(?![/:])")
_SSH_URL = re.compile(r"ssh://" + _USER + r"(\[[^\]]+\]|[^:/@]+)(?::(\d{1,5}))?/")


def ssh_host(url: str) -> tuple[str, int] | None:
    """(host, port) of an ssh URL (``ssh://[user@]host[:port]/path`` or
    ``[user@]host:path``), or None if it is not one."""
    m = _SSH_URL.match(url)
    if m:
        host, port = m.group(1).strip("[]"), int(m.group(2) or 22)
    elif (m := _SCP_LIKE.match(url)) and "://" not in url:
        host, port = m.group(1).strip("[]"), 22
    else:
        return None
    return (host, port) if is_host(host) and 0 < port < 65536 else None


def known_hosts_name(host: str, port: int) -> str:
    """How ssh names a host in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def checkout_container(*, name: str, image: str, volume: str, key: Path, known_hosts: Path,
                       network: str, labels: dict[str, str], repo: Repository,
                       unchecked_host_keys: bool) -> OneShot:
    """The checkout container for one repository entry.

    The deploy key and known_hosts are mounted read-only and only here;
    every capability is dropped but DAC_OVERRIDE, which lets the container's
    root read the key the service user owns and write the volume.  Its
    network is the host's by default: it runs only git, never task code.
    """
    args = ["--url", repo.repo_url, "--revision", repo.revision]
    if FULL_SHA.fullmatch(repo.revision):
        args.append("--sha")
    if repo.submodules:
        args.append("--submodules")
    if unchecked_host_keys:
        args.append("--unchecked-host-keys")
    return OneShot(
        name=name, image=image, args=tuple(args), network=network, labels=labels,
        cap_drop=("ALL",), cap_add=("DAC_OVERRIDE",),
        mounts=(Mount("volume", volume, "/worktree", readonly=False),
                Mount("bind", str(key), "/efci/key", readonly=True),
                Mount("bind", str(known_hosts), "/efci/known_hosts", readonly=True)))
