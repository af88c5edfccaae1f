"""What a name, a revision, an image reference or a duration may look like.

Everything here is pure and strict: these values come from declarations and
the socket and end up in volume names, paths, docker arguments and git
command lines, so anything that is not plainly a name is refused.
"""

from __future__ import annotations

import re

# Task, image, owner, key, secret, cache and deploy-target names: they become
# path components, volume names and container names. No '/', no '..', no
# leading '-' or '.', nothing a shell or docker would read as special.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_HELP = "a name: 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit, without '..'"

# A docker image reference (repository[:tag]) as we accept it from a
# declaration: lower-case path components, optional registry port and tag.
IMAGE_REF = re.compile(
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
)
IMAGE_REF_HELP = "a docker image reference such as efci/base:bookworm"

# A host name or an IPv4 address (IPv6 addresses are checked with ipaddress).
HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def is_name(value: str) -> bool:
    return bool(NAME.fullmatch(value)) and ".." not in value


def is_host(value: str) -> bool:
    if HOST.fullmatch(value) and len(value) <= 253:
        return True
    import ipaddress  # seldom needed; the client starts faster without it

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def ref_format_problem(ref: str) -> str | None:
    """Why ``ref`` is not a ref name that ``git check-ref-format
    --allow-onelevel`` accepts (or that begins with '-'), or None if it is.

    The rules are git's (git-check-ref-format(1)); the integration tests
    check this function against the real git on a list of tricky names.
    """
    if not ref:
        return "is empty"
    if ref.startswith("-"):
        return "begins with '-' (it would be read as an option)"
    if ref == "@":
        return "is '@'"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "has an empty path component"
    if ref.endswith("."):
        return "ends with '.'"
    if ".." in ref:
        return "contains '..'"
    if "@{" in ref:
        return "contains '@{'"
    bad = sorted({c for c in ref if ord(c) < 0x20 or ord(c) == 0x7F or c in " ~^:?*[\\"})
    if bad:
        return "contains " + ", ".join(repr(c) for c in bad)
    for part in ref.split("/"):
        if part.startswith("."):
            return f"has a component starting with '.' ({part!r})"
        if part.endswith(".lock"):
            return f"has a component ending in '.lock' ({part!r})"
    return None


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int | None:
    """Seconds in '90', '90s', '15m', '1h30m', '7d'; None if it is not one."""
    if text.isdigit():
        return int(text)
    m = _DURATION.fullmatch(text)
    if not text or not m:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes in '512', '64K', '100MiB', '1G' (binary units); None if not one."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        return None
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]



def format_size(size: int) -> str:
    """Bytes as the largest binary unit that divides them: 4GiB, 512MiB, 1000B."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def human_size(count: int) -> str:
    """Bytes for a person: 512 B, 3.4 MiB, 12.0 GiB."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
