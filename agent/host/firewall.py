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

Each agent owns only its own chains, named after its bridge
(``EFCI-IN-<bridge>``, ``EFCI-FWD-<bridge>``), and the jumps to them for
its bridge: two agents on one host (each with its own bridge) never touch
each other's rules.  A jump must come before any rule but other agents'
jumps, so they need not fight over the first place.

libxtables keeps global state and a commit fails with EAGAIN when another
program changes the tables at the same moment: everything here runs in one
worker thread at a time, under a lock, and a failed commit is retried from
a fresh look at the table (refresh, apply, commit), since a refresh drops
what was applied to the old handle.
"""

from __future__ import annotations

import errno
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import iptc

CHAIN_PREFIX = "EFCI-"
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


def chain_names(bridge: str) -> tuple[str, str]:
    """This bridge's chains (INPUT's, FORWARD's): at most 24 characters,
    within iptables' 28 for a bridge name of at most 15."""
    return f"{CHAIN_PREFIX}IN-{bridge}", f"{CHAIN_PREFIX}FWD-{bridge}"


def rule_sets(bridge: str, blocked: tuple[str, ...],
              allowed: tuple[Endpoint, ...] = ()) -> list[RuleSet]:
    """The rules, as data: pure, so unit tests can read them."""
    input_chain, forward_chain = chain_names(bridge)
    sets = []
    for version in (4, 6):
        reject = (("reject_with", REJECT_WITH[version]),)
        tcp_reset = (("reject_with", "tcp-reset"),)
        nets = tuple(n for n in blocked if (":" in n) == (version == 6))
        inbound = [RuleSpec(input_chain, "ACCEPT", destination=e.host, protocol="tcp",
                            matches=(("tcp", (("dport", str(e.port)),)),))
                   for e in allowed if (":" in e.host) == (version == 6)]
        inbound += [
            RuleSpec(input_chain, "ACCEPT",
                     matches=(("conntrack", (("ctstate", "ESTABLISHED,RELATED"),)),)),
            RuleSpec(input_chain, "REJECT", protocol="tcp", target_params=tcp_reset),
            RuleSpec(input_chain, "REJECT", target_params=reject),
        ]
        forward = [
            RuleSpec(forward_chain, "REJECT", matches=(("conntrack", (("ctstate", "DNAT"),)),),
                     target_params=reject),
            RuleSpec(forward_chain, "REJECT", out_interface=bridge, target_params=reject),
            *(RuleSpec(forward_chain, "REJECT", destination=net, target_params=reject)
              for net in (LINK_LOCAL[version], LOOPBACK[version], *nets)),
        ]
        jumps = (RuleSpec("INPUT", input_chain, in_interface=bridge),
                 RuleSpec("FORWARD", forward_chain, in_interface=bridge))
        sets.append(RuleSet(version, jumps, {input_chain: tuple(inbound),
                                             forward_chain: tuple(forward)}))
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


def _change(version: int, apply: Callable[[Any], None], *, attempts: int = 10) -> None:
    """Apply changes to one table in one commit.  On EAGAIN (another program
    changed the table since we read it) read it afresh, apply again and
    commit again: a refresh drops whatever the old handle held."""
    table = _table(version)
    table.autocommit = False
    try:
        for attempt in range(attempts):
            table.refresh()
            apply(table)
            try:
                table.commit()
                return
            except iptc.IPTCError as e:
                retryable = ("Resource temporarily unavailable" in str(e)
                             or getattr(e, "errno", None) == errno.EAGAIN)
                if not retryable or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
    finally:
        table.refresh()  # drops anything uncommitted, before autocommit could commit it
        table.autocommit = True


def _chain_matches(table: Any, version: int, name: str, specs: tuple[RuleSpec, ...]) -> bool:
    if not table.is_chain(name):
        return False
    chain = iptc.Chain(table, name)
    return [r for r in chain.rules] == [_rule(version, s) for s in specs]


def _delete_jumps(table: Any, jump: RuleSpec) -> None:
    """Every rule of the built-in chain that jumps to our chain (the one we
    put there, and any copy a crash or a hand left)."""
    builtin = iptc.Chain(table, jump.chain)
    for existing in [r for r in builtin.rules if r.target.name == jump.target]:
        builtin.delete_rule(existing)


def _jump_in_place(table: Any, version: int, jump: RuleSpec) -> bool:
    """Our jump is there, after nothing but other agents' jumps."""
    wanted = _rule(version, jump)
    for rule in iptc.Chain(table, jump.chain).rules:
        if rule == wanted:
            return True
        theirs = rule.target.name.startswith(CHAIN_PREFIX) and rule.in_interface \
            and rule.in_interface != jump.in_interface
        if not theirs:
            return False
    return False


def install(sets: list[RuleSet]) -> None:
    """Make the rules exactly these; idempotent."""
    with _lock:
        for rs in sets:
            _change(rs.version, functools.partial(_install_one, rs=rs))


def _install_one(table: Any, rs: RuleSet) -> None:
    for name, specs in rs.chains.items():
        chain = iptc.Chain(table, name) if table.is_chain(name) else table.create_chain(name)
        chain.flush()
        for spec in specs:
            chain.append_rule(_rule(rs.version, spec))
    for jump in rs.jumps:
        _delete_jumps(table, jump)
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
                if not table.is_chain(jump.target) or \
                        not _jump_in_place(table, rs.version, jump):
                    found.append(f"IPv{rs.version} {jump.chain} does not jump to {jump.target} "
                                 f"first for {jump.in_interface}")
    return found


def listing(sets: list[RuleSet]) -> dict[str, list[str]]:
    """Our chains and jumps as they are now, one line per rule, for people."""
    out: dict[str, list[str]] = {}
    with _lock:
        for rs in sets:
            table = _table(rs.version)
            table.refresh()
            for jump in rs.jumps:
                rules = [r for r in iptc.Chain(table, jump.chain).rules
                         if r.target.name == jump.target]
                out[f"IPv{rs.version} {jump.chain}"] = [_describe(r) for r in rules] or ["(none)"]
            for name in rs.chains:
                out[f"IPv{rs.version} {name}"] = (
                    [_describe(r) for r in iptc.Chain(table, name).rules]
                    if table.is_chain(name) else ["(no such chain)"])
    return out


def _describe(rule: Any) -> str:
    parts = []
    for flag, value in (("-i", rule.in_interface), ("-o", rule.out_interface),
                        ("-p", rule.protocol if rule.protocol != "ip" else None),
                        ("-d", None if rule.dst.startswith(("0.0.0.0/", "::/")) else rule.dst)):
        if value:
            parts.append(f"{flag} {value}")
    for match in rule.matches:
        params = " ".join(f"--{k} {v}" for k, v in match.get_all_parameters().items()
                          for v in v)
        parts.append(f"-m {match.name} {params}".rstrip())
    target = rule.target
    params = " ".join(f"--{k} {v}" for k, v in target.get_all_parameters().items() for v in v)
    parts.append(f"-j {target.name} {params}".rstrip())
    return " ".join(parts)


def remove(sets: list[RuleSet]) -> list[str]:
    """Delete the jumps and our chains; idempotent.  Returns what could not
    be removed (a chain someone else's rule still jumps to), never raises
    for that: stopping the agent must not fail on it."""
    left: list[str] = []
    with _lock:
        for rs in sets:
            kept: list[str] = []

            def remove_one(table: Any, rs: RuleSet = rs, kept: list[str] = kept) -> None:
                kept.clear()  # a retry starts over
                for jump in rs.jumps:
                    _delete_jumps(table, jump)
                for name in rs.chains:
                    if table.is_chain(name):
                        iptc.Chain(table, name).flush()
                        if _referenced(table, name):
                            kept.append(f"IPv{rs.version} chain {name} (another rule jumps "
                                        "to it; it was emptied)")
                        else:
                            table.delete_chain(name)

            _change(rs.version, remove_one)
            left += kept
    return left


def _referenced(table: Any, name: str) -> bool:
    return any(r.target.name == name for chain in table.chains for r in chain.rules)
