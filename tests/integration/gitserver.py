"""A real git server for the tests: OpenSSH's sshd on 127.0.0.1, serving bare
repositories through git-shell, each authorized key limited by a forced
command to reading the repositories it was given (like a read-only deploy
key in Gitea)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

GITSERVE = """\
import os, shlex, sys
allowed = sys.argv[1:]
command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
parts = shlex.split(command)
if len(parts) != 2 or parts[0] != "git-upload-pack" or parts[1] not in allowed:
    print(f"gitserve: this key may not run {command!r}", file=sys.stderr)
    sys.exit(1)
os.execv("/usr/bin/git-shell", ["git-shell", "-c", command])
"""

GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False,
                            env={**os.environ, **GIT_ENV, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stderr.decode()}")
    return result.stdout.decode().strip()


class GitServer:
    def __init__(self, root: Path, address: str = "127.0.0.1", owner: str = "repos") -> None:
        """Repositories live in ROOT/OWNER, so that URLs end in OWNER/NAME.git
        as Gitea's do."""
        self.root = root
        self.address = address
        self.port = free_port(address)
        self.sshd_dir = root / "sshd"
        self.repos = root / owner
        self.sshd_dir.mkdir(parents=True)
        self.repos.mkdir()
        self.host_key = self.sshd_dir / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
                       check=True)
        (self.sshd_dir / "gitserve.py").write_text(GITSERVE)
        self.authorized = self.sshd_dir / "authorized_keys"
        self.authorized.write_text("")
        (self.sshd_dir / "sshd_config").write_text(f"""
Port {self.port}
ListenAddress {address}
HostKey {self.host_key}
PidFile {self.sshd_dir}/sshd.pid
AuthorizedKeysFile {self.authorized}
AllowUsers root
PermitRootLogin forced-commands-only
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        with open(self.sshd_dir / "sshd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.sshd_dir / "sshd_config")],
                stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("sshd did not start: " + (self.sshd_dir / "sshd.log").read_text())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    @property
    def host_key_line(self) -> str:
        """The host key as the server's admin would hand it over."""
        return (self.host_key.with_suffix(".pub")).read_text()

    def authorize(self, public_key: str, *repos: str) -> None:
        paths = " ".join(str(self.path(r)) for r in repos)
        with open(self.authorized, "a") as f:
            f.write(f'command="{sys.executable} {self.sshd_dir}/gitserve.py {paths}",restrict '
                    f"{public_key.strip()}\n")

    def path(self, repo: str) -> Path:
        return self.repos / f"{repo}.git"

    def url(self, repo: str) -> str:
        return f"ssh://root@{self.address}:{self.port}{self.path(repo)}"

    def create(self, repo: str) -> Path:
        """A bare repository and a work clone (``<repo>.work``) to commit from."""
        git("init", "--quiet", "--bare", "--initial-branch=main", str(self.path(repo)))
        work = self.repos / f"{repo}.work"
        git("init", "--quiet", "--initial-branch=main", str(work))
        git("remote", "add", "origin", str(self.path(repo)), cwd=work)
        return work

    def commit(self, repo: str, files: dict[str, bytes], message: str, *,
               when: int | None = None, branch: str = "main") -> str:
        """Commit ``files`` (path -> content) and push; returns the sha."""
        work = self.repos / f"{repo}.work"
        for name, content in files.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        git("add", "--all", cwd=work)
        stamp = {} if when is None else {"GIT_AUTHOR_DATE": f"@{when} +0000",
                                         "GIT_COMMITTER_DATE": f"@{when} +0000"}
        git("commit", "--quiet", "-m", message, cwd=work, env=stamp)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
        return git("rev-parse", "HEAD", cwd=work)
