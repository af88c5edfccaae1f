"""agent.yml: where everything lives and how the agent behaves.

One table, :data:`SETTINGS`, names every key with its type, default and
help text; the loader, the defaults and ``efci config example`` are all read
off it, so they cannot drift apart.  Path defaults depend on a
:class:`Layout` (see :mod:`agent.layout`): the system one (/etc, /var/lib,
/srv, /run) or everything under one directory (``--root DIR`` /
``EFCI_ROOT``), which is how tests, the demo and a second agent on one host
run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import names
from .layout import CONFIG_FILE, SOCKET, SYSTEM, directories
from .model import Limits
from .yamlconf import Node, load_file


@dataclass(frozen=True)
class Layout:
    """The default directories (see :mod:`agent.layout`), as paths."""

    etc: Path
    state: Path
    secrets: Path
    run: Path

    @classmethod
    def system(cls) -> Layout:
        return cls(**{name: Path(path) for name, path in SYSTEM.items()})

    @classmethod
    def under(cls, root: Path) -> Layout:
        return cls.from_environment(str(root))

    @classmethod
    def from_environment(cls, root: str | None) -> Layout:
        """``--root`` wins over ``EFCI_ROOT``; neither means the system layout."""
        return cls(**{name: Path(path) for name, path in directories(root).items()})

    @property
    def config_file(self) -> Path:
        return self.etc / CONFIG_FILE

    @property
    def default_socket(self) -> Path:
        return self.run / SOCKET


@dataclass(frozen=True)
class DeployTarget:
    name: str
    path: Path
    allow: tuple[str, ...]  # "owner/task" entries


@dataclass(frozen=True)
class AgentConfig:
    source: str  # the file it came from, or "(defaults)"
    owner: str
    declarations_dir: Path
    state_dir: Path
    log_dir: Path
    secrets_base: Path
    caches_root: Path
    socket_path: Path
    socket_group: str
    socket_mode: int
    socket_max_connections: int
    socket_idle_timeout: int
    docker: str
    base_image: str
    time_limit: int
    stop_grace: int
    max_parallel: int
    log_limit: int
    terminal_size: tuple[int, int]
    max_queued: int
    min_free: int
    drain: int
    memory_limit: int
    pids_limit: int
    cpus_limit: float
    swap_limit: int
    disk_limit: int
    max_memory: int
    max_swap: int
    max_pids: int
    max_cpus: float
    max_disk: int
    network_name: str
    network_bridge: str
    network_subnet: str
    network_blocked: tuple[str, ...]
    network_checkout: str
    network_git_endpoints: tuple[tuple[str, int], ...]
    web_listen: tuple[str, int]
    web_public_url: str
    web_session_lifetime: int
    web_login_lifetime: int
    gitea_webhook_secret: Path
    gitea_api: str
    gitea_token: Path
    gitea_git_hosts: tuple[str, ...]
    caches_enable_quota: bool
    caches_default_quota: int
    caches_release_grace: int
    gc_keep_runs: int
    gc_keep_for: int
    gc_logs_keep: int
    gc_worktrees_unused: int
    gc_images_unused: int
    gc_layers_budget: int
    gc_interval: int
    deploy_targets: dict[str, DeployTarget] = field(default_factory=dict)

    @property
    def default_limits(self) -> Limits:
        return Limits(cpus=self.cpus_limit or None, memory=self.memory_limit,
                      swap=self.swap_limit, pids=self.pids_limit, disk=self.disk_limit)

    @property
    def max_limits(self) -> Limits:
        """What a declaration may ask for at most (cpus: the host's count
        when agent.yml sets no maximum)."""
        return Limits(cpus=self.max_cpus or float(os.cpu_count() or 1), memory=self.max_memory,
                      swap=self.max_swap, pids=self.max_pids, disk=self.max_disk)

    @property
    def web_url(self) -> str:
        """Where browsers reach the page: the public URL, else the listen address."""
        if self.web_public_url:
            return self.web_public_url
        host, port = self.web_listen
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def gitea_hosts(self) -> frozenset[str]:
        """The hosts in repo_urls whose repositories are on the Gitea of ``gitea_api``."""
        if not self.gitea_api:
            return frozenset()
        return frozenset({urllib.parse.urlsplit(self.gitea_api).hostname or "",
                          *self.gitea_git_hosts})


# -- the settings table -------------------------------------------------------

Parser = Callable[[Node], object]


def _path(node: Node) -> Path:
    text = node.string()
    if not text.startswith("/"):
        raise node.error(f"must be an absolute path, not {text!r}")
    return Path(os.path.normpath(text))


def _mode(node: Node) -> int:
    text = node.string()  # "0660": quoted, or YAML 1.1 reads it as octal 432
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise node.error(f"must be an octal mode in quotes such as \"0660\", not {text!r}")
    return int(text, 8)


def _terminal(node: Node) -> tuple[int, int]:
    text = node.raw_scalar()
    cols, _, rows = text.partition("x")
    if not (cols.isdigit() and rows.isdigit() and 10 <= int(cols) <= 1000
            and 5 <= int(rows) <= 1000):
        raise node.error(f"must be COLUMNSxROWS such as 160x50, not {text!r}")
    return int(cols), int(rows)


def _subnet(node: Node) -> str:
    text = node.string()
    try:
        net = ipaddress.ip_network(text)
    except ValueError as e:
        raise node.error(f"must be a network such as 172.30.0.0/24: {e}") from e
    return str(net)


def _subnets(node: Node) -> tuple[str, ...]:
    return tuple(_subnet(n) for n in node.sequence())


def _checkout_network(node: Node) -> str:
    value = node.string()
    if value not in ("host", "bridge"):
        raise node.error(f"must be host or bridge, not {value!r}")
    return value


def _endpoints(node: Node) -> tuple[tuple[str, int], ...]:
    return _endpoints_of(node.sequence())


def _endpoints_of(items: list[Node]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        text = item.string()
        host, _, port = text.rpartition(":")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise item.error(f"must be ADDRESS:PORT with an IP address, not {text!r}") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise item.error(f"must be ADDRESS:PORT, not {text!r}")
        out.append((host, int(port)))
    return tuple(out)


def _bridge(node: Node) -> str:
    return node.string(pattern=re.compile(r"[a-z][a-z0-9_-]{0,14}"),
                       what="an interface name of at most 15 characters")


def _group(node: Node) -> str:
    return node.string(pattern=re.compile(r"[a-z_][a-z0-9_-]{0,31}"), what="a group name")


def _listen(node: Node) -> tuple[str, int]:
    (endpoint,) = _endpoints_of([node])
    return endpoint


def _url(node: Node, *, path: bool = False) -> str:
    """An http(s) URL, or empty; with a path only when ``path``."""
    text = node.string()
    if not text:
        return ""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or (not path and parts.path not in ("", "/")):
        raise node.error(f"must be http(s)://HOST[:PORT]{'/PATH' if path else ''} with no "
                         f"{'query' if path else 'path'}, not {text!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/') if path else ''}"


def _hosts(node: Node) -> tuple[str, ...]:
    return tuple(item.string(pattern=re.compile(r"[a-z0-9]([a-z0-9.-]{0,252}[a-z0-9])?"),
                             what="a host name in lower case")
                 for item in node.sequence())


def _public_url(node: Node) -> str:
    return _url(node)


def _program(node: Node) -> str:
    return node.string(pattern=re.compile(r"[A-Za-z0-9_./-]+"), what="a program name or path")


@dataclass(frozen=True)
class Setting:
    key: str  # "section.key" as written in agent.yml
    attr: str  # AgentConfig attribute
    parse: Parser
    default: Callable[[Layout], object]
    example: str  # the default as written in YAML
    help: str


def _size_or_zero(node: Node) -> int:
    return 0 if node.raw_scalar().strip() == "0" else node.size()


def _cpus(node: Node) -> float:
    """CPUs as docker's --cpus takes them: 2, 0.5, 1.25 (0 where allowed)."""
    text = node.raw_scalar().strip()
    if not re.fullmatch(r"[0-9]{1,4}(\.[0-9]{1,2})?", text):
        raise node.error(f"must be a number of CPUs such as 2 or 0.5, not {text!r}")
    return float(text)


def _const(value: object) -> Callable[[Layout], object]:
    return lambda _layout: value


SETTINGS: tuple[Setting, ...] = (
    Setting("owner", "owner", Node.name, _const("local"), "local",
            "Owner (the seed's CI user) for declarations that do not name one."),
    Setting("paths.declarations", "declarations_dir", _path, lambda lay: lay.etc / "conf.d",
            "{etc}/conf.d", "Image and task declarations: every *.yml file here."),
    Setting("paths.state", "state_dir", _path, lambda lay: lay.state, "{state}",
            "SQLite state and per-run files."),
    Setting("paths.logs", "log_dir", _path, lambda lay: lay.state / "logs", "{state}/logs",
            "Run logs."),
    Setting("paths.secrets", "secrets_base", _path, lambda lay: lay.secrets, "{secrets}",
            "The secrets store (deploy keys under git-ssh/<owner>/)."),
    Setting("paths.caches", "caches_root", _path, lambda lay: lay.state / "caches",
            "{state}/caches", "Root of cache subvolumes (a btrfs filesystem)."),
    Setting("socket.path", "socket_path", _path, lambda lay: lay.default_socket,
            "{run}/agent.sock", "The control socket efci talks to."),
    Setting("socket.group", "socket_group", _group, _const("efci-admin"), "efci-admin",
            "Group that may use the socket (if it exists)."),
    Setting("socket.mode", "socket_mode", _mode, _const(0o660), '"0660"',
            "Permissions of the socket, in quotes."),
    Setting("socket.max_connections", "socket_max_connections",
            lambda n: n.integer(minimum=8, maximum=100000), _const(1000), "1000",
            "Clients connected at once; one more is answered with an error and closed."),
    Setting("socket.idle_timeout", "socket_idle_timeout", Node.duration, _const(120), "2m",
            "A client that sends no request for this long is disconnected (one waiting for "
            "an answer or following a log is not idle)."),
    Setting("docker.program", "docker", _program, _const("docker"), "docker",
            "The docker CLI to run."),
    Setting("docker.base_image", "base_image", Node.image_ref, _const("efci/base:bookworm"),
            "efci/base:bookworm", "Image that built-in images start FROM."),
    Setting("runs.time_limit", "time_limit", Node.duration, _const(3600), "1h",
            "Time limit of a task that sets none."),
    Setting("runs.stop_grace", "stop_grace", Node.duration, _const(10), "10s",
            "Between SIGTERM and SIGKILL when a run is stopped."),
    Setting("runs.max_parallel", "max_parallel",
            lambda n: n.integer(minimum=1, maximum=256), _const(4), "4",
            "Runs executing at once; more wait queued."),
    Setting("runs.max_queued", "max_queued", lambda n: n.integer(minimum=1, maximum=1000000),
            _const(1000), "1000",
            "Runs that may wait for a slot; past it, new runs are refused (exit status 75)."),
    Setting("runs.min_free", "min_free", _size_or_zero, _const(1 << 30), "1GiB",
            "Free space below which queued runs wait (on the state, log, Docker and cache "
            "filesystems; a tenth of one too small for it) until there is this much again; "
            "0: never wait."),
    Setting("runs.drain", "drain", lambda n: n.duration(zero=True), _const(60), "60s",
            "On a graceful stop, how long running runs may go on before they are cancelled "
            "(the service's TimeoutStopSec leaves room for it)."),
    Setting("runs.log_limit", "log_limit", Node.size, _const(1 << 30), "1GiB",
            "Largest log kept per run: past it, its beginning and its end are kept."),
    Setting("runs.terminal_size", "terminal_size", _terminal, _const((160, 50)), "160x50",
            "Terminal size task containers see (columns x rows)."),
    Setting("limits.memory", "memory_limit", Node.size, _const(4 << 30), "4GiB",
            "Memory of a task container that declares none; past it the kernel's OOM killer "
            "stops its processes."),
    Setting("limits.swap", "swap_limit", _size_or_zero, _const(0), "0",
            "Swap a task container may use beyond its memory, if it declares none."),
    Setting("limits.cpus", "cpus_limit", _cpus, _const(0.0), "0",
            "CPUs a task container may use if it declares none (2.5: two and a half); "
            "0: all of the host's."),
    Setting("limits.pids", "pids_limit", lambda n: n.integer(minimum=64, maximum=1 << 22),
            _const(4096), "4096",
            "Processes and threads a task container may have at once (a fork bomb stops "
            "there, not at the host's pid_max)."),
    Setting("limits.disk", "disk_limit", Node.size, _const(10 << 30), "10GiB",
            "Bytes a task may write into its writable layers (the upper layers over its "
            "worktrees and its container's own layer) if it declares no limit; past it the "
            "run is stopped (README: Reliability)."),
    Setting("limits.max_memory", "max_memory", Node.size, _const(16 << 30), "16GiB",
            "The most memory a declaration may give its task."),
    Setting("limits.max_swap", "max_swap", _size_or_zero, _const(4 << 30), "4GiB",
            "The most swap a declaration may give its task."),
    Setting("limits.max_pids", "max_pids", lambda n: n.integer(minimum=64, maximum=1 << 22),
            _const(32768), "32768", "The most processes a declaration may give its task."),
    Setting("limits.max_cpus", "max_cpus", _cpus, _const(0.0), "0",
            "The most CPUs a declaration may give its task; 0: the host's count."),
    Setting("limits.max_disk", "max_disk", Node.size, _const(100 << 30), "100GiB",
            "The most a declaration may let its task write into its writable layers."),
    Setting("network.name", "network_name", Node.name, _const("efci"), "efci",
            "Docker network task containers join."),
    Setting("network.bridge", "network_bridge", _bridge, _const("efci0"), "efci0",
            "Its bridge interface."),
    Setting("network.subnet", "network_subnet", _subnet, _const("172.30.0.0/24"),
            "172.30.0.0/24", "Its IPv4 subnet."),
    Setting("network.blocked", "network_blocked", _subnets, _const(()), "[]",
            "More destinations task containers may not reach (e.g. the host's LAN)."),
    Setting("network.checkout", "network_checkout", _checkout_network, _const("host"), "host",
            "Where the checkout container runs: host (the seed's way: it runs only git and "
            "reaches a Gitea on this host), or bridge (the task bridge, reaching only the "
            "git_endpoints on this host)."),
    Setting("network.git_endpoints", "network_git_endpoints", _endpoints, _const(()), "[]",
            "host:port of git servers on this host that the bridge lets through, "
            "e.g. [172.30.0.1:22]."),
    Setting("web.listen", "web_listen", _listen, _const(("127.0.0.1", 8470)), "127.0.0.1:8470",
            "Where efci web serves the page (ADDRESS:PORT); put a TLS proxy in front of it "
            "for other machines."),
    Setting("web.public_url", "web_public_url", _public_url, _const(""), '""',
            "The page's address as browsers reach it (e.g. https://ci.example.org behind a "
            "proxy); empty: http://LISTEN."),
    Setting("web.session_lifetime", "web_session_lifetime", Node.duration, _const(12 * 3600),
            "12h", "How long a web login lasts."),
    Setting("web.login_lifetime", "web_login_lifetime", Node.duration, _const(600), "10m",
            "How long a one-time login URL from efci web-login stays usable."),
    Setting("gitea.webhook_secret", "gitea_webhook_secret", _path,
            lambda lay: lay.secrets / "web/gitea-webhook-secret",
            "{secrets}/web/gitea-webhook-secret",
            "The Gitea webhooks' secret: a file only the web page's user reads (mode 0600)."),
    Setting("gitea.api", "gitea_api", lambda n: _url(n, path=True), _const(""), '""',
            "Gitea's API, e.g. https://gitea.example.org/api/v1; empty: no commit statuses."),
    Setting("gitea.token", "gitea_token", _path, lambda lay: lay.secrets / "gitea/token",
            "{secrets}/gitea/token",
            "A Gitea token for commit statuses: a file only the agent's user reads (0600)."),
    Setting("gitea.git_hosts", "gitea_git_hosts", _hosts, _const(()), "[]",
            "Other names of this Gitea in repo_url than the API's host (its ssh name, say)."),
    Setting("caches.enable_quota", "caches_enable_quota", Node.boolean, _const(True), "true",
            "Turn btrfs quotas on at paths.caches if they are off (a dedicated filesystem)."),
    Setting("caches.default_quota", "caches_default_quota", Node.size, _const(4 << 30), "4GiB",
            "The quota of a cache whose declaration gives none."),
    Setting("caches.release_grace", "caches_release_grace", Node.duration,
            _const(7 * 86400), "7d",
            "How long a cache no declaration claims any more is kept before it is removed."),
    Setting("gc.keep_runs", "gc_keep_runs", lambda n: n.integer(minimum=1, maximum=100000),
            _const(20), "20", "Runs of each task whose container and layers gc never removes."),
    Setting("gc.keep_for", "gc_keep_for", lambda n: n.duration(zero=True), _const(7 * 86400),
            "7d",
            "Nor those of any run younger than this."),
    Setting("gc.logs_keep", "gc_logs_keep", Node.duration, _const(90 * 86400), "90d",
            "Logs of runs that ended longer ago than this are removed (the record stays)."),
    Setting("gc.worktrees_unused", "gc_worktrees_unused", lambda n: n.duration(zero=True),
            _const(30 * 86400), "30d",
            "Base worktrees no declared task checks out, unused this long, are removed."),
    Setting("gc.images_unused", "gc_images_unused", lambda n: n.duration(zero=True),
            _const(30 * 86400), "30d",
            "Built images of declarations no task uses, unused this long, are removed."),
    Setting("gc.layers_budget", "gc_layers_budget", Node.size, _const(50 << 30), "50GiB",
            "Disk for finished runs' layers and stopped containers; past it, the oldest go."),
    Setting("gc.interval", "gc_interval", lambda n: n.duration(zero=True), _const(3600), "1h",
            "How often the agent applies the policy itself (0: only efci gc)."),
)

_DEPLOY_HELP = """\
# Host directories tasks may write (bind-mounted at /deploy), and who may:
# deploy_targets:
#   sites:
#     path: /srv/sites.efforting.tech
#     allow: [mikael-lovqvist/rsync-publish]
deploy_targets: {}
"""


def _deploy_targets(node: Node) -> dict[str, DeployTarget]:
    targets: dict[str, DeployTarget] = {}
    for name, item in node.mapping(free=True).items():
        if not names.is_name(name):
            raise item.error(f"{name!r} is not {names.NAME_HELP}")
        fields = item.mapping(required={"path"}, optional={"allow"})
        allow: list[str] = []
        for entry in fields["allow"].sequence() if "allow" in fields else []:
            text = entry.string()
            owner, _, task = text.partition("/")
            if not (names.is_name(owner) and names.is_name(task)):
                raise entry.error(f"must be owner/task, not {text!r}")
            allow.append(text)
        targets[name] = DeployTarget(name, _path(fields["path"]), tuple(allow))
    return targets


def defaults(layout: Layout) -> AgentConfig:
    values = {s.attr: s.default(layout) for s in SETTINGS}
    return AgentConfig(source="(defaults)", **values)  # type: ignore[arg-type]


def load(layout: Layout, path: Path | None = None) -> AgentConfig:
    """agent.yml from ``path`` (or the layout's), validated; defaults for the rest.

    A missing file at the layout's default place is not an error (every key
    has a default); a missing file named explicitly is.
    """
    explicit = path is not None
    path = path or layout.config_file
    if not explicit and not path.exists():
        return defaults(layout)
    root = load_file(path)
    values = {s.attr: s.default(layout) for s in SETTINGS}
    nodes: dict[str, Node] = {}
    if root is not None:
        sections: dict[str, dict[str, Setting]] = {}
        for s in SETTINGS:
            section, _, key = s.key.rpartition(".")
            sections.setdefault(section, {})[key] = s
        top = root.mapping(optional=set(sections[""]) | (sections.keys() - {""})
                           | {"deploy_targets"})
        for key, node in top.items():
            if key == "deploy_targets":
                values["deploy_targets"] = _deploy_targets(node)
            elif key in sections:
                for sub, sub_node in node.mapping(optional=set(sections[key])).items():
                    setting = sections[key][sub]
                    values[setting.attr] = setting.parse(sub_node)
                    nodes[setting.attr] = sub_node
            else:
                setting = sections[""][key]
                values[setting.attr] = setting.parse(node)
    cfg = AgentConfig(source=str(path), **values)  # type: ignore[arg-type]
    _check_limits(cfg, nodes)
    return cfg


def _check_limits(cfg: AgentConfig, nodes: dict[str, Node]) -> None:
    """A default past its maximum would refuse every task that declares nothing."""
    for default, maximum, value, most in (
            ("memory_limit", "max_memory", cfg.memory_limit, cfg.max_memory),
            ("swap_limit", "max_swap", cfg.swap_limit, cfg.max_swap),
            ("pids_limit", "max_pids", cfg.pids_limit, cfg.max_pids),
            ("disk_limit", "max_disk", cfg.disk_limit, cfg.max_disk),
            ("cpus_limit", "max_cpus", cfg.cpus_limit, cfg.max_cpus or cfg.cpus_limit)):
        if value > most:
            node = nodes.get(default) or nodes[maximum]
            size = default in ("memory_limit", "swap_limit", "disk_limit")
            shown = [names.format_size(int(v)) if size else f"{v:g}" for v in (value, most)]
            raise node.error(f"the default ({shown[0]}) is more than its maximum "
                             f"({shown[1]}); "
                             f"raise limits.{maximum} or lower the default")


def example(layout: Layout) -> str:
    """A complete, commented agent.yml with every key at its default."""
    subs = {"etc": layout.etc, "state": layout.state, "secrets": layout.secrets,
            "run": layout.run}
    lines = ["# efforting-ci agent configuration (efci-agent.yml(5)).",
             "# Every key is optional; shown here with its default.", ""]
    current = None
    for s in SETTINGS:
        section, _, key = s.key.rpartition(".")
        indent = "  " if section else ""
        if section != current and section:
            lines += ["", f"{section}:"]
        current = section
        lines.append(f"{indent}# {s.help}")
        lines.append(f"{indent}{key}: {s.example.format(**subs)}")
    lines += ["", _DEPLOY_HELP]
    return "\n".join(lines)

