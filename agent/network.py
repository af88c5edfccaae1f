"""Network isolation: the task bridge, and host-local blocking on it.

The agent owns a Docker bridge network (``network.name``, interface
``network.bridge``, ``network.subnet``, containers on it cannot reach each
other).  At start it is created if missing and checked if present (a
mismatch with agent.yml is a clear error), the bridge is hardened
(route_localnet off, IPv6 off), and the rules of :mod:`agent.host.firewall`
are installed.  Before every run on the bridge the rules are checked; a
missing one is put back and said so in the run's log, and if that fails the
run is refused (fail closed).  A probe from a real container shows the host
is unreachable.  At stop, and by ``efci firewall remove``, the rules go.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket as stdsocket
import time
from dataclasses import dataclass
from typing import Any

import trio

from .config import AgentConfig
from .errors import ConfigError, RunFailed
from .host import command, firewall, netif

log = logging.getLogger(__name__)

# The firewall runs in one worker thread at a time (libxtables is not thread safe).
_limiter = trio.CapacityLimiter(1)


class NetworkRefused(RunFailed):
    code = "network_refused"


@dataclass
class Probe:
    at: float
    passed: bool
    detail: str


PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print("blocked:", e)
    sys.exit(0)
print("REACHED the host")
sys.exit(1)
"""


class TaskNetwork:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        net = ipaddress.ip_network(cfg.network_subnet)
        self.gateway = str(next(net.hosts()))
        self.rules = firewall.rule_sets(cfg.network_bridge, cfg.network_blocked,
                                        tuple(firewall.Endpoint(h, p)
                                              for h, p in cfg.network_git_endpoints))
        self.last_probe: Probe | None = None

    async def _firewall(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=_limiter)

    # -- start and stop ----------------------------------------------------------------

    async def ensure(self) -> None:
        await self._ensure_docker_network()
        addresses = await trio.to_thread.run_sync(netif.addresses, self.cfg.network_bridge)
        want = f"{self.gateway}/{ipaddress.ip_network(self.cfg.network_subnet).prefixlen}"
        if addresses is None or want not in addresses:
            raise ConfigError(self.cfg.source, 0, "network.bridge",
                              f"interface {self.cfg.network_bridge} has {addresses or 'no'} "
                              f"addresses, not {want}")
        netif.harden(self.cfg.network_bridge)
        await self._firewall(firewall.install, self.rules)
        log.info("network %s on %s (%s): rules installed", self.cfg.network_name,
                 self.cfg.network_bridge, self.cfg.network_subnet)

    async def _ensure_docker_network(self) -> None:
        docker, name = self.cfg.docker, self.cfg.network_name
        found = await command.run([docker, "network", "inspect", name], check=False)
        if found.returncode != 0:
            await command.run([
                docker, "network", "create", "--driver", "bridge",
                "--subnet", self.cfg.network_subnet, "--gateway", self.gateway,
                "--opt", f"com.docker.network.bridge.name={self.cfg.network_bridge}",
                "--opt", "com.docker.network.bridge.enable_icc=false",
                "--label", "org.efforting-ci.network=tasks", name])
            return
        info = json.loads(found.stdout)[0]
        subnets = [c.get("Subnet") for c in info.get("IPAM", {}).get("Config") or []]
        options = info.get("Options") or {}
        problems = []
        if subnets != [self.cfg.network_subnet]:
            problems.append(f"its subnets are {subnets}, not [{self.cfg.network_subnet}]")
        if options.get("com.docker.network.bridge.name") != self.cfg.network_bridge:
            problems.append(f"its bridge is not {self.cfg.network_bridge}")
        if options.get("com.docker.network.bridge.enable_icc") != "false":
            problems.append("containers on it can reach each other (enable_icc)")
        if problems:
            raise ConfigError(self.cfg.source, 0, "network",
                              f"docker network {name} exists but " + "; ".join(problems)
                              + f"; remove it (docker network rm {name}) or change agent.yml")

    async def remove(self) -> None:
        left = await self._firewall(firewall.remove, self.rules)
        if left:
            log.warning("network rules removed but for: %s", "; ".join(left))
        else:
            log.info("network rules removed")

    # -- before every run -----------------------------------------------------------------

    async def problems(self) -> list[str]:
        found: list[str] = await self._firewall(firewall.problems, self.rules)
        try:
            found += netif.hardening_problems(self.cfg.network_bridge)
        except OSError:
            found.append(f"interface {self.cfg.network_bridge} is gone")
        return found

    async def check(self) -> list[str]:
        """Fail closed: put back what is missing, or refuse the run.
        Returns what had to be put back."""
        found = await self.problems()
        if not found:
            return []
        log.warning("network rules not in place (%s); restoring", "; ".join(found))
        try:
            await self.ensure()
        except Exception as e:
            raise NetworkRefused(f"the network rules are not in place ({'; '.join(found)}) "
                                 f"and could not be restored ({e}); refusing to run") from e
        still = await self.problems()
        if still:
            raise NetworkRefused(f"the network rules could not be restored: {'; '.join(still)}")
        return found

    # -- proof ------------------------------------------------------------------------

    async def probe(self, image: str) -> Probe:
        """A container on the bridge tries to reach a port the agent listens
        on at the bridge gateway: it must fail."""
        listener = trio.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
        with listener:
            await listener.bind((self.gateway, 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            result = await command.run(
                [self.cfg.docker, "run", "--rm", "--network", self.cfg.network_name,
                 "--cap-drop", "NET_RAW", "--security-opt", "no-new-privileges",
                 "--log-driver", "none", image, "python3", "-c", PROBE, self.gateway, str(port)],
                check=False)
        detail = result.stdout.decode().strip() or result.stderr.decode().strip()
        self.last_probe = Probe(time.time(), result.returncode == 0, detail)
        (log.info if self.last_probe.passed else log.error)(
            "network probe %s: %s", "passed" if self.last_probe.passed else "FAILED", detail)
        return self.last_probe

    async def status(self) -> dict[str, Any]:
        rules = await self._firewall(firewall.listing, self.rules)
        probe = self.last_probe
        return {"network": self.cfg.network_name, "bridge": self.cfg.network_bridge,
                "subnet": self.cfg.network_subnet, "problems": await self.problems(),
                "rules": rules,
                "last_probe": None if probe is None else probe.__dict__}
