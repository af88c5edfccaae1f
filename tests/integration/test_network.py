"""Network isolation, tried as an attacker would: from real task containers
against real servers on the host and a stand-in for the outside world.

Only addresses on this machine and a network namespace this test makes are
ever targeted.  The "WAN" is the namespace efci-twan, routed through the
host from 203.0.113.0/24 (a documentation range no real host uses), which
also carries 169.254.169.254 so that only the agent's rule keeps a task
from the "metadata service"."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host import firewall
from agent.host.netif import addresses

from .conftest import BASE_IMAGE, AgentProcess, Setup, task
from .gitserver import GitServer

WAN_NS, HOST_VETH, NS_VETH = "efci-twan", "efci-tw0", "efci-tw1"
WAN, WAN_HOST_SIDE, METADATA = "203.0.113.2", "203.0.113.1", "169.254.169.254"
GATEWAY = "172.30.0.1"

# Each refusal is reported by its errno: the INPUT rule's TCP reset reads
# ECONNREFUSED, an ICMP admin-prohibited EHOSTUNREACH, no route ENETUNREACH.
PROBE = """
import errno, json, socket, struct, sys
targets = json.loads(sys.argv[1])
out = {}
for name, (kind, host, port) in targets.items():
    try:
        if kind == "tcp":
            s = socket.create_connection((host, port), timeout=3)
            s.close()
            out[name] = "open"
        elif kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(name.encode(), (host, port))
            out[name] = "sent"
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            s.settimeout(3)
            s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"ping", (host, 0))
            s.recvfrom(1024)
            out[name] = "open"
    except OSError as e:
        out[name] = "blocked: " + (errno.errorcode.get(e.errno or 0) or str(e))
print("RESULT " + json.dumps(out))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, check=check)


def wait_listening(host: str, port: int, timeout: float = 60) -> None:
    """Until a server answers from the host: a probe of one not up yet would
    be refused by its kernel and pass for a rule's refusal."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Servers:
    """TCP and UDP servers on the host, counting what reaches them."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.udp_received: list[bytes] = []
        self.running = True

    def tcp(self, host: str) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        s.listen(16)
        s.settimeout(0.2)
        self.sockets.append(s)
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return int(s.getsockname()[1])

    def udp(self, host: str) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.settimeout(0.2)
        self.sockets.append(s)
        threading.Thread(target=self._receive, args=(s,), daemon=True).start()
        return int(s.getsockname()[1])

    def _accept(self, s: socket.socket) -> None:
        while self.running:
            try:
                s.accept()[0].close()
            except OSError:
                continue

    def _receive(self, s: socket.socket) -> None:
        while self.running:
            try:
                self.udp_received.append(s.recv(100))
            except OSError:
                continue

    def close(self) -> None:
        self.running = False
        for s in self.sockets:
            s.close()


@pytest.fixture
def wan() -> Iterator[None]:
    """The outside world: a namespace routed through the host."""
    sh("ip", "netns", "delete", WAN_NS, check=False)
    sh("ip", "link", "delete", HOST_VETH, check=False)
    try:
        sh("ip", "netns", "add", WAN_NS)
        sh("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NS_VETH)
        sh("ip", "link", "set", NS_VETH, "netns", WAN_NS)
        sh("ip", "addr", "add", f"{WAN_HOST_SIDE}/24", "dev", HOST_VETH)
        sh("ip", "link", "set", HOST_VETH, "up")
        ns = ("ip", "netns", "exec", WAN_NS)
        sh(*ns, "ip", "addr", "add", f"{WAN}/24", "dev", NS_VETH)
        sh(*ns, "ip", "addr", "add", f"{METADATA}/32", "dev", NS_VETH)
        sh(*ns, "ip", "link", "set", NS_VETH, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "route", "add", "default", "via", WAN_HOST_SIDE)
        sh("ip", "route", "add", f"{METADATA}/32", "via", WAN)
        everywhere = "0.0.0.0"  # noqa: S104 - inside the test's namespace
        server = subprocess.Popen([*ns, "python3", "-m", "http.server", "--bind", everywhere,
                                   "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(WAN, 8080)
        yield
    finally:
        if "server" in locals():
            server.terminate()
            server.wait()
        sh("ip", "route", "delete", f"{METADATA}/32", check=False)
        sh("ip", "link", "delete", HOST_VETH, check=False)
        sh("ip", "netns", "delete", WAN_NS, check=False)


def probe(agent: AgentProcess, task: str, targets: dict[str, list[object]],
          network: str = "default") -> dict[str, str]:
    agent.declare(f"{task}.yml", json.dumps({"tasks": {task: {
        "image": BASE_IMAGE, "network": network,
        "command": ["python3", "-c", PROBE, json.dumps(targets)]}}}))
    assert agent.efci("reload").returncode == 0
    result = agent.efci("run", "--follow", task, timeout=300)
    line = [x for x in result.stdout.splitlines() if x.startswith(b"RESULT ")][-1]
    return dict(json.loads(line[7:]))


def assert_gateway_blocked(agent: AgentProcess, task: str) -> None:
    """A server listening on the bridge's gateway is out of a task's reach."""
    servers = Servers()
    try:
        port = servers.tcp(GATEWAY)
        wait_listening(GATEWAY, port)
        result = probe(agent, task, {"tcp gateway": ["tcp", GATEWAY, port]})
        assert result["tcp gateway"] == "blocked: ECONNREFUSED", result
    finally:
        servers.close()


def legacy_rules() -> str:
    return (sh("iptables-legacy-save").stdout + sh("ip6tables-legacy-save").stdout).decode()


def test_the_host_is_unreachable_and_the_world_is_not(agent: AgentProcess, wan: None) -> None:
    agent.start()
    servers = Servers()
    publisher = "efci-test-publisher"
    sh("docker", "rm", "-f", publisher, check=False)
    try:
        host_addresses = sorted({a.split("/")[0] for ifname in ("lo", "docker0", "eth0",
                                                                 "efci0", HOST_VETH)
                                 for a in (addresses(ifname) or []) if ":" not in a})
        assert GATEWAY in host_addresses and "127.0.0.1" in host_addresses
        # In a container 127.0.0.1 is the container's own loopback: the host's
        # 127/8 is only reachable through route_localnet, which stays off.
        host_addresses.remove("127.0.0.1")
        any_port = servers.tcp("0.0.0.0")  # noqa: S104 - every host address, on purpose
        udp_port = servers.udp("0.0.0.0")  # noqa: S104
        targets: dict[str, list[object]] = {}
        for address in host_addresses:
            targets[f"tcp {address}"] = ["tcp", address, any_port]
            targets[f"udp {address}"] = ["udp", address, udp_port]
            targets[f"icmp {address}"] = ["icmp", address, 0]
        targets["tcp gateway-only server"] = ["tcp", GATEWAY, servers.tcp(GATEWAY)]
        sh("docker", "run", "-d", "--name", publisher, "-p", "127.0.0.1:18731:8000",
           "-p", "18732:8000", BASE_IMAGE, "python3", "-m", "http.server", "8000")
        wait_listening("127.0.0.1", 18731)
        for address in host_addresses:
            targets[f"tcp published {address}:18732"] = ["tcp", address, 18732]
        targets["tcp metadata"] = ["tcp", METADATA, 8080]
        targets["icmp metadata"] = ["icmp", METADATA, 0]
        targets["tcp wan"] = ["tcp", WAN, 8080]
        targets["icmp wan"] = ["icmp", WAN, 0]

        result = probe(agent, "attacker", targets)
        reached = {k for k, v in result.items() if v in ("open",)}
        assert reached == {"tcp wan", "icmp wan"}, result
        assert servers.udp_received == []
        # Each server answers the host (waited for above), so a refusal is a
        # rule's: INPUT's TCP reset (ECONNREFUSED) for the host's addresses,
        # FORWARD's admin-prohibited (EHOSTUNREACH) for what is routed on; a
        # published port is either, as Docker rewrites it or its proxy takes it.
        for name, outcome in result.items():
            if name.startswith("tcp published"):
                assert outcome in ("blocked: ECONNREFUSED", "blocked: EHOSTUNREACH"), name
            elif name == "tcp metadata":
                assert outcome == "blocked: EHOSTUNREACH", (name, outcome)
            elif name.startswith("tcp") and name != "tcp wan":
                assert outcome == "blocked: ECONNREFUSED", (name, outcome)

        isolated = probe(agent, "isolated", {"tcp wan": ["tcp", WAN, 8080],
                                             "tcp gateway": ["tcp", GATEWAY, any_port]},
                         network="none")
        assert set(isolated.values()) == {"blocked: ENETUNREACH"}, isolated
    finally:
        servers.close()
        sh("docker", "rm", "-f", publisher, check=False)


def test_a_rule_removed_by_hand_is_restored_and_stop_removes_all(agent: AgentProcess,
                                                                 wan: None) -> None:
    agent.start()
    status = json.loads(agent.efci("--json", "firewall", "status").stdout)
    assert status["problems"] == [] and status["last_probe"]["passed"] is True
    sh("iptables-legacy", "-D", "EFCI-IN-efci0", "-p", "tcp", "-j", "REJECT", "--reject-with",
       "tcp-reset")
    with open("/proc/sys/net/ipv4/conf/efci0/route_localnet", "w") as f:
        f.write("1\n")
    broken = agent.efci("firewall", "status", check=False)
    assert broken.returncode == 1 and b"NOT IN PLACE" in broken.stdout
    assert b"network:      RULES NOT IN PLACE, last probe passed" in agent.efci("status").stdout
    assert_gateway_blocked(agent, "after")
    run = json.loads(agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
    assert b"they were restored before this run" in agent.efci("logs", str(run)).stderr
    assert json.loads(agent.efci("--json", "firewall", "status").stdout)["problems"] == []
    assert "EFCI" in legacy_rules()
    agent.efci("firewall", "remove")
    assert "EFCI" not in legacy_rules()
    assert probe(agent, "again", {"wan": ["tcp", WAN, 8080]})["wan"] == "open"
    assert "EFCI" in legacy_rules()  # put back before that run
    assert agent.stop() == 0
    assert "EFCI" not in legacy_rules()
    assert (sh("cat", "/proc/sys/net/ipv4/conf/efci0/route_localnet").stdout.strip(),
            sh("cat", "/proc/sys/net/ipv6/conf/efci0/disable_ipv6").stdout.strip()) == \
        (b"0", b"1")


def test_two_task_containers_cannot_reach_each_other(agent: AgentProcess) -> None:
    agent.declare("listen.yml", json.dumps({"tasks": {"listener": {
        "image": BASE_IMAGE, "command": ["python3", "-c",
            "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 9000)); "
            "s.listen(); print('ADDR', socket.gethostbyname(socket.gethostname()), "
            "flush=True); time.sleep(60)"]}}}))
    agent.start()
    listener = json.loads(agent.efci("--json", "run", "listener").stdout)["id"]
    deadline = time.monotonic() + 60
    address = None
    while address is None and time.monotonic() < deadline:
        for line in agent.efci("logs", "--raw", str(listener)).stdout.splitlines():
            if line.startswith(b"ADDR "):
                address = line.split()[1].decode()
        time.sleep(0.2)
    assert address and address.startswith("172.30.0.")
    wait_listening(address, 9000)  # the host reaches it: the rule is what refuses a task
    result = probe(agent, "neighbour", {"tcp neighbour": ["tcp", address, 9000]})
    assert result["tcp neighbour"] == "blocked: EHOSTUNREACH", result
    agent.efci("cancel", str(listener))


def test_the_checkout_can_run_on_the_bridge_to_an_allowed_git_endpoint(
        agent: AgentProcess, tmp_path: Path) -> None:
    agent.start()  # makes the bridge, so the git server can listen on its gateway
    agent.stop()
    server = GitServer(tmp_path / "git", address=GATEWAY)
    server.start()
    setup = Setup(agent, server)
    try:
        agent.configure("network:\n  checkout: bridge\n"
                        f"  git_endpoints: [\"{GATEWAY}:{server.port}\"]\n")
        agent.start()
        server.create("lib")
        server.commit("lib", {"a.txt": b"from the bridge\n"}, "a")
        server.authorize(setup.key(), "lib")
        setup.trust()
        setup.declare({"over-bridge": task(
            checkout={"repositories": [setup.entry("lib", "main", mutable=True)]},
            command=["cat", "/src/lib/a.txt"])})
        status, run = setup.run("over-bridge")
        assert status == 0, agent.efci("logs", str(run["id"])).stdout
        assert setup.output(run["id"]) == b"from the bridge\r\n"
        checkout = agent.efci("logs", "--stream", "checkout:lib", str(run["id"])).stdout
        assert GATEWAY.encode() in checkout
        assert_gateway_blocked(agent, "other-port")  # the rest of the host stays closed
    finally:
        server.stop()
        agent.cleanup()
        subprocess.run(["docker", "volume", "rm", "-f", *setup.volumes], capture_output=True)


def test_a_bridge_that_does_not_match_the_config_stops_the_agent(agent: AgentProcess) -> None:
    agent.start()  # the network exists now, as agent.yml's defaults say
    agent.stop()
    agent.configure("network:\n  subnet: 172.30.9.0/24\n")
    result = agent.efci("agent", check=False, timeout=120)
    assert result.returncode == 78
    assert b"docker network efci exists but its subnets are [172.30.0.0/24]" in result.stderr


def run_quietly(agent: AgentProcess) -> str:
    """A trivial run on the bridge; its log says whether rules were restored."""
    agent.declare("q.yml", json.dumps({"tasks": {"q": {"image": BASE_IMAGE,
                                                       "command": ["true"]}}}))
    assert agent.efci("reload").returncode == 0
    assert agent.efci("run", "--follow", "q").returncode == 0
    run = json.loads(agent.efci("--json", "runs", "--limit", "1").stdout)[0]["id"]
    return agent.efci("logs", str(run)).stderr.decode()


def assert_isolated(agent: AgentProcess) -> None:
    status = json.loads(agent.efci("--json", "firewall", "status").stdout)
    assert status["problems"] == [], status
    assert json.loads(agent.efci("--json", "firewall", "probe").stdout)["passed"] is True
    assert "were restored" not in run_quietly(agent)


def test_two_agents_on_one_host_keep_their_own_rules(agent: AgentProcess,
                                                     tmp_path: Path) -> None:
    """Each agent owns its bridge's chains: started, used and stopped in both
    orders, neither disturbs the other, and nothing is left behind."""
    other = AgentProcess(tmp_path / "other")
    other.configure("network:\n  name: efci-b\n  bridge: efcib0\n  subnet: 172.31.250.0/24\n")
    try:
        agent.start()
        other.start()
        for first, second in ((agent, other), (other, agent)):
            assert_isolated(first)
            assert_isolated(second)
            assert first.stop() == 0
            assert "Traceback" not in first.log.read_text()
            gone = "efci0" if first is agent else "efcib0"
            assert f"-{gone}" not in legacy_rules()
            assert_isolated(second)
            first.start()
        assert agent.stop() == 0 and other.stop() == 0
        assert "EFCI-" not in legacy_rules()
        assert "Traceback" not in agent.log.read_text() + other.log.read_text()
    finally:
        other.cleanup()
        firewall.remove(firewall.rule_sets("efcib0", ()))
        sh("docker", "network", "rm", "efci-b", check=False)


def test_a_commit_that_meets_a_concurrent_change_is_applied_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program changes the table between our read and our commit:
    the kernel answers EAGAIN, and the rules must still end up in place."""
    import iptc

    sets = firewall.rule_sets("efcitest0", ())
    conflict = "EFCI-CONFLICT-T"
    original = iptc.Table.commit
    meddled: list[str] = []

    def commit_after_someone_else(table: object) -> None:
        if not meddled:  # the first commit only: another program was quicker
            sh("iptables-legacy", "-N", conflict)
        try:
            original(table)
        except iptc.IPTCError as e:
            meddled.append(str(e))
            raise
        meddled.append("committed")

    monkeypatch.setattr(iptc.Table, "commit", commit_after_someone_else)
    try:
        firewall.install(sets)
        assert "temporarily unavailable" in meddled[0], meddled  # EAGAIN, then a retry
        monkeypatch.undo()
        assert firewall.problems(sets) == []
        assert "EFCI-IN-efcitest0" in legacy_rules()
    finally:
        monkeypatch.undo()
        firewall.remove(sets)
        sh("iptables-legacy", "-X", conflict, check=False)
    assert "efcitest0" not in legacy_rules()
