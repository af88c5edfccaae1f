"""The agent's packet filter rules, through python-iptables.

python-iptables drives libiptc, so these rules live in the *legacy* x_tables,
while Debian 12's Docker writes nf_tables.  The kernel evaluates both and a
REJECT in either one wins, so the agent hooks its own chains from the legacy
built-in INPUT and FORWARD chains and never depends on Docker's chains
(a legacy DOCKER-USER chain would never be jumped to).

What the rules achieve, for packets coming in on the task bridge:

* to any address of the host (INPUT: the bridge gateway, docker0, every
  NIC, 127.0.0.0/8 should route_localnet ever be on) -> rejected, but for
  the allow-listed git endpoints;
* to a host address that Docker rewrote to a published container port
  (conntrack state DNAT) -> rejected;
* to link-local and metadata addresses, loopback, other containers on the
  same bridge, and the configured blocked networks -> rejected;
* everything else (the outside world) passes.

IPv6 gets the same (INPUT rejected, link-local and bridge-internal traffic
rejected), and the agent also turns IPv6 off on the bridge.

libxtables keeps global state and a commit fails with EAGAIN when another
program changes the tables at the same moment: everything here runs in one
worker thread at a time, under a lock, and commits are retried.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import iptc

INPUT_CHAIN = "EFCI-INPUT"
FORWARD_CHAIN = "EFCI-FORWARD"
LINK_LOCAL = {4: "169.254.0.0/16", 6: "fe80::/10"}
LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
REJECT_WITH = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}

_lock = threading.Lock()


@dataclass(frozen=True)
class RuleSpec:
    chain: str
    target: str
    in_interface: str | None = None
    out_interface: str | None = None
    destination: str | None = None
    protocol: str | None = None
    matches: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    target_params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class RuleSet:
    """Every rule of one IP version: our chains' contents and the jumps."""

    version: int
    jumps: tuple[RuleSpec, ...]
    chains: dict[str, tuple[RuleSpec, ...]] = field(default_factory=dict)


def rule_sets(bridge: str, blocked: tuple[str, ...],
              allowed: tuple[Endpoint, ...] = ()) -> list[RuleSet]:
    """The rules, as data: pure, so unit tests can read them."""
    sets = []
    for version in (4, 6):
        reject = (("reject_with", REJECT_WITH[version]),)
        tcp_reset = (("reject_with", "tcp-reset"),)
        nets = tuple(n for n in blocked if (":" in n) == (version == 6))
        inbound = [RuleSpec(INPUT_CHAIN, "ACCEPT", destination=e.host, protocol="tcp",
                            matches=(("tcp", (("dport", str(e.port)),)),))
                   for e in allowed if (":" in e.host) == (version == 6)]
        inbound += [
            RuleSpec(INPUT_CHAIN, "ACCEPT",
                     matches=(("conntrack", (("ctstate", "ESTABLISHED,RELATED"),)),)),
            RuleSpec(INPUT_CHAIN, "REJECT", protocol="tcp", target_params=tcp_reset),
            RuleSpec(INPUT_CHAIN, "REJECT", target_params=reject),
        ]
        forward = [
            RuleSpec(FORWARD_CHAIN, "REJECT", matches=(("conntrack", (("ctstate", "DNAT"),)),),
                     target_params=reject),
            RuleSpec(FORWARD_CHAIN, "REJECT", out_interface=bridge, target_params=reject),
            *(RuleSpec(FORWARD_CHAIN, "REJECT", destination=net, target_params=reject)
              for net in (LINK_LOCAL[version], LOOPBACK[version], *nets)),
        ]
        jumps = (RuleSpec("INPUT", INPUT_CHAIN, in_interface=bridge),
                 RuleSpec("FORWARD", FORWARD_CHAIN, in_interface=bridge))
        sets.append(RuleSet(version, jumps, {INPUT_CHAIN: tuple(inbound),
                                             FORWARD_CHAIN: tuple(forward)}))
    return sets


# -- python-iptables ------------------------------------------------------------------

def _table(version: int) -> Any:
    return iptc.Table(iptc.Table.FILTER) if version == 4 else iptc.Table6(iptc.Table6.FILTER)


def _rule(version: int, spec: RuleSpec) -> Any:
    rule = iptc.Rule() if version == 4 else iptc.Rule6()
    if spec.in_interface:
        rule.in_interface = spec.in_interface
    if spec.out_interface:
        rule.out_interface = spec.out_interface
    if spec.destination:
        rule.dst = spec.destination
    if spec.protocol:
        rule.protocol = spec.protocol
    for name, params in spec.matches:
        match = rule.create_match(name)
        for key, value in params:
            setattr(match, key, value)
    target = rule.create_target(spec.target)
    for key, value in spec.target_params:
        setattr(target, key, value)
    return rule


def _commit(table: Any) -> None:
    for attempt in range(10):
        try:
            table.commit()
            return
        except iptc.IPTCError as e:
            retryable = ("Resource temporarily unavailable" in str(e)
                         or getattr(e, "errno", None) == errno.EAGAIN)
            if not retryable or attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))
            table.refresh()


def _chain_matches(table: Any, version: int, name: str, specs: tuple[RuleSpec, ...]) -> bool:
    if not table.is_chain(name):
        return False
    chain = iptc.Chain(table, name)
    return [r for r in chain.rules] == [_rule(version, s) for s in specs]


def _delete_jumps(table: Any, version: int, jump: RuleSpec) -> None:
    builtin = iptc.Chain(table, jump.chain)
    wanted = _rule(version, jump)
    for existing in [r for r in builtin.rules if r == wanted]:
        builtin.delete_rule(existing)


@contextlib.contextmanager
def _changing(version: int) -> Iterator[Any]:
    """One table, changed in one commit (retried on EAGAIN)."""
    table = _table(version)
    table.autocommit = False
    table.refresh()
    try:
        yield table
        _commit(table)
    finally:
        table.autocommit = True


def install(sets: list[RuleSet]) -> None:
    """Make the rules exactly these; idempotent."""
    with _lock:
        for rs in sets:
            with _changing(rs.version) as table:
                _install_one(table, rs)


def _install_one(table: Any, rs: RuleSet) -> None:
    for name, specs in rs.chains.items():
        chain = iptc.Chain(table, name) if table.is_chain(name) else table.create_chain(name)
        chain.flush()
        for spec in specs:
            chain.append_rule(_rule(rs.version, spec))
    for jump in rs.jumps:
        _delete_jumps(table, rs.version, jump)
        iptc.Chain(table, jump.chain).insert_rule(_rule(rs.version, jump))  # first


def problems(sets: list[RuleSet]) -> list[str]:
    """What differs from the wanted rules (empty when all is in place)."""
    found = []
    with _lock:
        for rs in sets:
            table = _table(rs.version)
            table.refresh()
            for name, specs in rs.chains.items():
                if not _chain_matches(table, rs.version, name, specs):
                    found.append(f"IPv{rs.version} chain {name} is missing or changed")
            for jump in rs.jumps:
                rules = iptc.Chain(table, jump.chain).rules
                if not table.is_chain(jump.target) or not rules \
                        or rules[0] != _rule(rs.version, jump):
                    found.append(f"IPv{rs.version} {jump.chain} does not jump to {jump.target} "
                                 f"first for {jump.in_interface}")
    return found


def remove(sets: list[RuleSet]) -> None:
    """Delete the jumps and our chains; idempotent."""
    with _lock:
        for rs in sets:
            with _changing(rs.version) as table:
                for jump in rs.jumps:
                    if table.is_chain(jump.target):  # no chain, so no jump to it either
                        _delete_jumps(table, rs.version, jump)
                for name in rs.chains:
                    if table.is_chain(name):
                        chain = iptc.Chain(table, name)
                        chain.flush()
                        chain.delete()
