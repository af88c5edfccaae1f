"""The rule set as data: what the bridge's traffic meets, in what order."""

from __future__ import annotations

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


def test_forwarded_traffic_rules() -> None:
    v4, v6 = sets()[4].chains["EFCI-FWD-efci0"], sets()[6].chains["EFCI-FWD-efci0"]
    assert [r.destination for r in v4 if r.destination] == [
        "169.254.0.0/16", "127.0.0.0/8", "192.168.0.0/16"]
    assert [r.destination for r in v6 if r.destination] == ["fe80::/10", "::1/128", "fd00::/8"]
    assert any(m == ("conntrack", (("ctstate", "DNAT"),)) for r in v4 for m in r.matches)
    assert any(r.out_interface == "efci0" for r in v4)  # containers cannot reach each other
    assert all(r.target == "REJECT" for r in v4 + v6)


def test_no_endpoint_of_the_other_ip_version_leaks_in() -> None:
    assert not any(r.target == "ACCEPT" and r.destination
                   for r in sets()[6].chains["EFCI-IN-efci0"])


def test_each_bridge_has_its_own_chains_within_the_name_limit() -> None:
    assert fw.chain_names("efci0") == ("EFCI-IN-efci0", "EFCI-FWD-efci0")
    assert all(len(name) <= 28 for name in fw.chain_names("a" * 15))
    one, two = fw.rule_sets("efci0", ()), fw.rule_sets("efci1", ())
    assert not set(one[0].chains) & set(two[0].chains)
