"""Where an agent's files live by default: the system layout (/etc,
/var/lib, /srv, /run) or everything under one directory (``--root DIR`` /
``EFCI_ROOT``), which is how tests, the demo and a second agent on one host
run.  Plain strings, apart from agent.yml's settings (:mod:`agent.config`
makes its ``Layout`` of these), so that a client command finds the socket
without loading them, or even pathlib."""

from __future__ import annotations

import os

SYSTEM = {"etc": "/etc/efforting-ci", "state": "/var/lib/efforting-ci",
          "secrets": "/srv/ci-secrets", "run": "/run/efforting-ci"}
CONFIG_FILE = "agent.yml"  # in etc
SOCKET = "agent.sock"  # in run, unless agent.yml says otherwise


def directories(root: str | None) -> dict[str, str]:
    """etc, state, secrets and run: under ``root``, or else under
    ``EFCI_ROOT``, or else the system's."""
    root = root or os.environ.get("EFCI_ROOT") or None
    if not root:
        return dict(SYSTEM)
    return {name: os.path.join(os.path.abspath(root), name) for name in SYSTEM}


def socket_path(root: str | None, config_file: str | None = None) -> str:
    """The agent's socket, as agent.yml sets it.  Without the YAML parser
    and the settings table when agent.yml cannot set it (it never says
    "socket", or is absent from its default place): their import is most of
    a short efci command's start-up."""
    where = directories(root)
    try:
        with open(config_file or os.path.join(where["etc"], CONFIG_FILE), "rb") as f:
            if b"socket" not in f.read():
                return os.path.join(where["run"], SOCKET)
    except FileNotFoundError:
        if config_file is None:
            return os.path.join(where["run"], SOCKET)
    except OSError:
        pass  # the full load says why it cannot be read (or that a named one is missing)
    from pathlib import Path

    from .config import Layout, load

    return str(load(Layout.from_environment(root), Path(config_file) if config_file else None)
               .socket_path)
