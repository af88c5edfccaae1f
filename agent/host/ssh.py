"""ssh-keygen and ssh-keyscan, for the deploy keys and pinned host keys."""

from __future__ import annotations

from pathlib import Path

from . import command


async def generate_ed25519(path: Path, comment: str) -> None:
    """A new key pair at ``path`` and ``path.pub``, without a passphrase."""
    await command.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                       "-f", str(path)])


async def fingerprint(public_key: Path) -> str:
    result = await command.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)])
    return result.stdout.decode().split()[1]


async def scan_host_keys(host: str, port: int) -> str:
    """The host's public keys as known_hosts lines (``ssh-keyscan``)."""
    result = await command.run(["ssh-keyscan", "-T", "10", "-p", str(port), "--", host])
    return result.stdout.decode()


async def fingerprints_of(known_hosts_lines: str) -> list[str]:
    """Fingerprints of known_hosts lines, for a person to compare."""
    result = await command.run(["ssh-keygen", "-l", "-E", "sha256", "-f", "-"],
                               stdin=known_hosts_lines.encode())
    return result.stdout.decode().splitlines()
