"""The task bridge as the kernel sees it: its addresses (pyroute2) and the
per-interface settings the agent insists on (sysctl files)."""

from __future__ import annotations

from pathlib import Path

from pyroute2 import IPRoute

SYSCTL = Path("/proc/sys/net")


def addresses(ifname: str) -> list[str] | None:
    """The interface's addresses as CIDR strings, or None if it does not exist."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=found[0])]


def _setting(ifname: str, family: str, key: str) -> Path:
    return SYSCTL / family / "conf" / ifname / key


def harden(ifname: str) -> None:
    """route_localnet off (127/8 is never routed from the bridge) and IPv6
    off on the bridge (containers get no IPv6 path to the host)."""
    _setting(ifname, "ipv4", "route_localnet").write_text("0\n")
    _setting(ifname, "ipv6", "disable_ipv6").write_text("1\n")


def hardening_problems(ifname: str) -> list[str]:
    found = []
    if _setting(ifname, "ipv4", "route_localnet").read_text().strip() != "0":
        found.append(f"route_localnet is on for {ifname}")
    if _setting(ifname, "ipv6", "disable_ipv6").read_text().strip() != "1":
        found.append(f"IPv6 is on for {ifname}")
    return found
