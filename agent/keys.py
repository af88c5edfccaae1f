"""Deploy keys and pinned host keys in the secrets store (the seed's layout)::

    <secrets_base>/git-ssh/<owner>/public/<name>    the public half, to show
    <secrets_base>/git-ssh/<owner>/private/<name>   0600 in a 0700 directory
    <secrets_base>/git-ssh/<owner>/known_hosts      host keys pinned by efci key trust

The private half never leaves the store: nothing here returns its content;
it is only ever mounted, read-only, into a checkout container.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import names
from .errors import Conflict, NotFound, RequestError, RunFailed
from .host import ssh
from .host.git import known_hosts_name


@dataclass(frozen=True)
class KeyInfo:
    owner: str
    name: str
    public_key: str
    fingerprint: str
    created_at: float


class KeyRefused(RunFailed):
    """A file of the secrets store is not what the agent itself put there."""

    code = "key_refused"


def _is_key_type(word: str) -> bool:
    return word.startswith(("ssh-", "ecdsa-", "sk-"))


def _check_name(value: str, what: str) -> None:
    if not names.is_name(value):
        raise RequestError(f"{what} {value!r} is not {names.NAME_HELP}")


class KeyStore:
    def __init__(self, secrets_base: Path) -> None:
        self.base = secrets_base

    def owner_dir(self, owner: str) -> Path:
        _check_name(owner, "owner")
        return self.base / "git-ssh" / owner

    def private_path(self, owner: str, name: str) -> Path:
        _check_name(name, "key name")
        return self.owner_dir(owner) / "private" / name

    def public_path(self, owner: str, name: str) -> Path:
        _check_name(name, "key name")
        return self.owner_dir(owner) / "public" / name

    def known_hosts(self, owner: str) -> Path:
        """The owner's pinned host keys; created empty so it can be mounted."""
        path = self.owner_dir(owner) / "known_hosts"
        if not path.exists() and not path.is_symlink():
            self._dirs(owner)
            path.touch(mode=0o644)
        return path

    def checked(self, path: Path, *, private: bool) -> Path:
        """``path`` (in the store), if it is a regular file of the agent's
        own user, reached through no symlink, and for a ``private`` key not
        readable by group or others; KeyRefused otherwise.  Docker follows
        symlinks when it bind-mounts, so this is checked before every mount."""
        relative = path.relative_to(self.base)
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.base), relative):
            raise KeyRefused(f"{path} is reached through a symlink; the secrets store holds "
                             "only files efci made (efci key create / efci key trust)")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise KeyRefused(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyRefused(f"{path} belongs to uid {st.st_uid}, not to the agent's user "
                             f"(uid {os.geteuid()}); it was not made by efci")
        if private and st.st_mode & 0o077:
            raise KeyRefused(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a private key "
                             "must be readable by its owner only (0600)")
        return path

    def _read_public(self, path: Path) -> str:
        """A public file of the store (a public key, known_hosts), checked."""
        fd = os.open(self.checked(path, private=False), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            return f.read(1 << 20).strip()

    def _dirs(self, owner: str) -> None:
        # An existing store keeps its mode: the package makes it 0710 so that
        # the web page's user can reach its own web/ directory, and no more.
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner_dir = self.owner_dir(owner)
        (owner_dir / "public").mkdir(mode=0o755, parents=True, exist_ok=True)
        (owner_dir / "private").mkdir(mode=0o700, exist_ok=True)
        os.chmod(owner_dir / "private", 0o700)

    async def create(self, owner: str, name: str) -> KeyInfo:
        """A new ed25519 pair, generated in a private temporary directory on
        the same filesystem and moved into place; never overwrites."""
        private, public = self.private_path(owner, name), self.public_path(owner, name)
        if private.exists() or public.exists():
            raise Conflict(f"key {name!r} of owner {owner!r} already exists; "
                           f"efci key delete {name} --owner {owner} first to replace it")
        self._dirs(owner)
        tmp = Path(tempfile.mkdtemp(prefix=".keygen-", dir=self.base))  # 0700
        try:
            await ssh.generate_ed25519(tmp / "key", f"ci/{owner}/{name}")
            os.chmod(tmp / "key", 0o600)
            # link() refuses to replace an existing file, unlike rename().
            os.link(tmp / "key.pub", public)
            try:
                os.link(tmp / "key", private)
            except BaseException:
                public.unlink()
                raise
        except FileExistsError:
            raise Conflict(f"key {name!r} of owner {owner!r} was created meanwhile") from None
        finally:
            shutil.rmtree(tmp)
        return await self.info(owner, name)

    async def info(self, owner: str, name: str) -> KeyInfo:
        public = self.public_path(owner, name)
        if not public.exists() or not self.private_path(owner, name).exists():
            raise NotFound(f"no key {name!r} of owner {owner!r}; "
                           f"efci key create {name} --owner {owner} makes one")
        return KeyInfo(owner, name, self._read_public(public), await ssh.fingerprint(public),
                       public.lstat().st_mtime)

    async def all(self, owner: str | None = None) -> list[KeyInfo]:
        root = self.base / "git-ssh"
        owners = [owner] if owner else sorted(p.name for p in root.iterdir()) \
            if root.is_dir() else []
        keys = []
        for o in owners:
            public_dir = self.owner_dir(o) / "public"
            if public_dir.is_dir():
                for path in sorted(public_dir.iterdir()):
                    if names.is_name(path.name) and self.private_path(o, path.name).exists():
                        keys.append(await self.info(o, path.name))
        return keys

    def delete(self, owner: str, name: str) -> None:
        private, public = self.private_path(owner, name), self.public_path(owner, name)
        if not private.exists() and not public.exists():
            raise NotFound(f"no key {name!r} of owner {owner!r}")
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)

    async def trust(self, owner: str, host: str, port: int,
                    lines: str | None = None) -> list[str]:
        """Pin ``host``'s keys for ``owner``: the given known_hosts ``lines``
        (pasted from the server: the safe way), or what ssh-keyscan reads now.
        Returns their fingerprints; earlier pins of the host are replaced."""
        label = known_hosts_name(*_checked_host(host, port))
        if lines is None:
            lines = await ssh.scan_host_keys(host, port)
        wanted = []
        for line in lines.splitlines():
            parts = line.split()
            if not parts or line.startswith("#"):
                continue
            if not _is_key_type(parts[0]):  # "host type key": a known_hosts line
                parts = parts[1:]
            if len(parts) < 2 or not _is_key_type(parts[0]):  # "type key [comment]"
                raise RequestError(f"not a host key line: {line[:80]!r}")
            wanted.append(f"{label} {parts[0]} {parts[1]}")
        if not wanted:
            raise NotFound(f"no host keys for {label}")
        path = self.known_hosts(owner)
        kept = [line for line in self._read_public(path).splitlines()
                if line.split(" ", 1)[0] != label]
        tmp = path.with_name(".known_hosts.tmp")
        tmp.write_text("\n".join([*kept, *wanted]) + "\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        return await ssh.fingerprints_of("\n".join(wanted) + "\n")

    async def scan(self, host: str, port: int) -> dict[str, object]:
        """What ssh-keyscan reads from ``host`` now, pinning nothing: shown
        to a person who confirms the fingerprints, then passed to trust."""
        lines = await ssh.scan_host_keys(*_checked_host(host, port))
        return {"keys": lines, "fingerprints": await ssh.fingerprints_of(lines)}

    def is_trusted(self, owner: str, host: str, port: int) -> bool:
        path = self.owner_dir(owner) / "known_hosts"
        label = known_hosts_name(host, port)
        return path.exists() and any(line.split(" ", 1)[0] == label
                                     for line in self._read_public(path).splitlines())


def _checked_host(host: str, port: int) -> tuple[str, int]:
    if not names.is_host(host) or not 0 < port < 65536:
        raise RequestError(f"{host!r} port {port} is not a host name or address and port")
    return host, port
