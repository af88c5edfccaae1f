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
import logging
import secrets
import socket as stdsocket
import time
from dataclasses import dataclass
from typing import Any

import trio

from .config import AgentConfig
from .errors import ConfigError, RunFailed
from .host import firewall, netif
from .host.engine import Engine, NetworkSpec, OneShot

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
    def __init__(self, cfg: AgentConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine
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
        wanted = NetworkSpec(name=self.cfg.network_name, bridge=self.cfg.network_bridge,
                             subnet=self.cfg.network_subnet, gateway=self.gateway, icc=False,
                             labels={"network": "tasks"})
        found = await self.engine.network(wanted.name)
        if found is None:
            await self.engine.create_network(wanted)
            return
        problems = []
        if found.subnet != wanted.subnet:
            problems.append(f"its subnets are [{found.subnet}], not [{wanted.subnet}]")
        if found.bridge != wanted.bridge:
            problems.append(f"its bridge is not {wanted.bridge}")
        if found.icc:
            problems.append("containers on it can reach each other (enable_icc)")
        if problems:
            raise ConfigError(self.cfg.source, 0, "network",
                              f"docker network {wanted.name} exists but " + "; ".join(problems)
                              + f"; remove it (docker network rm {wanted.name}) or change "
                              "agent.yml")

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
            status, output = await self.engine.run(OneShot(
                name=f"efci-probe-{secrets.token_hex(4)}", image=image,
                args=("python3", "-c", PROBE, self.gateway, str(port)),
                network=self.cfg.network_name))
        detail = output.decode("utf-8", "replace").strip()
        self.last_probe = Probe(time.time(), status == 0, detail)
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
