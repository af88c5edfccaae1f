"""Where an agent's files live by default: the system layout (/etc,
/var/lib, /srv, /run) or everything under one directory (``--root DIR`` /
``EFCI_ROOT``), which is how tests, the demo and a second agent on one host
run.  Apart from agent.yml's settings (agent.config), so that the client
can find the socket without loading them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    etc: Path
    state: Path
    secrets: Path
    run: Path

    @classmethod
    def system(cls) -> Layout:
        return cls(Path("/etc/efforting-ci"), Path("/var/lib/efforting-ci"),
                   Path("/srv/ci-secrets"), Path("/run/efforting-ci"))

    @classmethod
    def under(cls, root: Path) -> Layout:
        root = root.absolute()
        return cls(root / "etc", root / "state", root / "secrets", root / "run")

    @classmethod
    def from_environment(cls, root: str | None) -> Layout:
        """``--root`` wins over ``EFCI_ROOT``; neither means the system layout."""
        root = root or os.environ.get("EFCI_ROOT") or None
        return cls.under(Path(root)) if root else cls.system()

    @property
    def config_file(self) -> Path:
        return self.etc / "agent.yml"

    @property
    def default_socket(self) -> Path:
        return self.run / "agent.sock"

    def socket_path(self, config_file: Path | None = None) -> Path:
        """The agent's socket, as agent.yml sets it.  Without the YAML
        parser and the settings table when agent.yml cannot set it (it
        never says "socket", or is absent from its default place): their
        import is most of a short efci command's start-up."""
        try:
            if "socket" not in (config_file or self.config_file).read_text(errors="replace"):
                return self.default_socket
        except FileNotFoundError:
            if config_file is None:
                return self.default_socket
        except OSError:
            pass  # the full load says why it cannot be read (or that a named one is missing)
        from .config import load

        return load(self, config_file).socket_path
