"""The rule set as data: what the bridge's traffic meets, in what order."""

from __future__ import annotations

import ipaddress

from agent.host import firewall as fw


def sets() -> dict[int, fw.RuleSet]:
    return {rs.version: rs for rs in fw.rule_sets(
        "efci0", ("192.168.0.0/16", "fd00::/8"), (fw.Endpoint("172.30.0.1", 2222),))}


def test_our_chains_are_jumped_to_only_for_the_bridge() -> None:
    for rs in sets().values():
        assert {(j.chain, j.target, j.in_interface) for j in rs.jumps} == {
            ("INPUT", "EFCI-IN-efci0", "efci0"), ("FORWARD", "EFCI-FWD-efci0", "efci0")}


def test_everything_to_the_host_is_rejected_after_the_allowed_endpoint() -> None:
    inbound = sets()[4].chains["EFCI-IN-efci0"]
    assert (inbound[0].target, inbound[0].destination, inbound[0].matches) == (
        "ACCEPT", "172.30.0.1", (("tcp", (("dport", "2222"),)),))
    last = inbound[-1]
    assert last.target == "REJECT" and last.destination is None and last.protocol is None
    assert all(r.in_interface is None for r in inbound)  # the jump already chose the bridge


def verdict(chain: tuple[fw.RuleSpec, ...], dst: str, *, proto: str = "tcp",
            out: str = "eth0", ctstate: str = "NEW", dport: int = 80) -> str:
    """What a packet meets in one of our chains: the first matching rule's
    target, or RETURN (on to the rest of the host's rules).  A model of
    iptables' matching for the few match kinds our rules use."""
    for rule in chain:
        if rule.destination and ipaddress.ip_address(dst) not in \
                ipaddress.ip_network(rule.destination):
            continue
        if rule.protocol and rule.protocol != proto:
            continue
        if rule.out_interface and rule.out_interface != out:
            continue
        params = {name: dict(values) for name, values in rule.matches}
        if "conntrack" in params and ctstate not in params["conntrack"]["ctstate"].split(","):
            continue
        if "tcp" in params and str(dport) != params["tcp"]["dport"]:
            continue
        return rule.target
    return "RETURN"


def test_what_forwarded_traffic_from_a_task_meets() -> None:
    v4, v6 = sets()[4].chains["EFCI-FWD-efci0"], sets()[6].chains["EFCI-FWD-efci0"]
    for dst in ("169.254.169.254", "127.0.0.1", "192.168.1.10"):  # metadata, loopback, LAN
        assert verdict(v4, dst) == "REJECT", dst
    for dst in ("fe80::1", "::1", "fd00::5"):
        assert verdict(v6, dst) == "REJECT", dst
    assert verdict(v4, "203.0.113.7") == "RETURN"  # the world
    assert verdict(v4, "203.0.113.7", proto="udp") == "RETURN"
    assert verdict(v4, "172.30.0.9", out="efci0") == "REJECT"  # another task container
    assert verdict(v4, "203.0.113.7", ctstate="DNAT") == "REJECT"  # a port published on the host


def test_what_traffic_to_the_host_meets() -> None:
    inbound = sets()[4].chains["EFCI-IN-efci0"]
    assert verdict(inbound, "172.30.0.1", dport=2222) == "ACCEPT"  # the git endpoint
    assert verdict(inbound, "172.30.0.1", dport=22) == "REJECT"
    assert verdict(inbound, "10.0.0.1", proto="udp") == "REJECT"  # any host address
    assert verdict(inbound, "172.30.0.1", ctstate="ESTABLISHED") == "ACCEPT"  # its replies


def test_no_endpoint_of_the_other_ip_version_leaks_in() -> None:
    assert not any(r.target == "ACCEPT" and r.destination
                   for r in sets()[6].chains["EFCI-IN-efci0"])


def test_each_bridge_has_its_own_chains_within_the_name_limit() -> None:
    assert fw.chain_names("efci0") == ("EFCI-IN-efci0", "EFCI-FWD-efci0")
    assert all(len(name) <= 28 for name in fw.chain_names("a" * 15))
    one, two = fw.rule_sets("efci0", ()), fw.rule_sets("efci1", ())
    assert not set(one[0].chains) & set(two[0].chains)
