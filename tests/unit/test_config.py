from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent import config
from agent.errors import ConfigError
from agent.layout import socket_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yml"
    path.write_text(text)
    return path


def test_root_moves_every_default_path(tmp_path: Path) -> None:
    cfg = config.defaults(config.Layout.under(tmp_path))
    for attr in ("declarations_dir", "state_dir", "log_dir", "secrets_base", "caches_root",
                 "socket_path"):
        assert tmp_path in getattr(cfg, attr).parents, attr


def test_system_layout_matches_the_design() -> None:
    cfg = config.defaults(config.Layout.system())
    assert cfg.socket_path == Path("/run/efforting-ci/agent.sock")
    assert cfg.secrets_base == Path("/srv/ci-secrets")
    assert cfg.state_dir == Path("/var/lib/efforting-ci")
    assert cfg.declarations_dir == Path("/etc/efforting-ci/conf.d")


def test_efci_root_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EFCI_ROOT", str(tmp_path))
    assert config.Layout.from_environment(None).etc == tmp_path / "etc"
    assert config.Layout.from_environment("/x").etc == Path("/x/etc")


def test_example_is_complete_and_loads_to_the_defaults(tmp_path: Path) -> None:
    layout = config.Layout.under(tmp_path)
    text = config.example(layout)
    documented = set()
    for section, body in yaml.safe_load(text).items():
        if isinstance(body, dict) and section != "deploy_targets":
            documented |= {f"{section}.{key}" for key in body}
        else:
            documented.add(section)
    assert documented == {  # what efci-agent.yml(5) documents, every key written out
        "owner", "deploy_targets",
        "paths.declarations", "paths.state", "paths.logs", "paths.secrets", "paths.caches",
        "socket.path", "socket.group", "socket.mode", "socket.max_connections",
        "socket.idle_timeout", "docker.program", "docker.base_image",
        "runs.time_limit", "runs.stop_grace", "runs.max_parallel", "runs.max_queued",
        "runs.min_free", "runs.drain", "runs.log_limit", "runs.terminal_size",
        "limits.memory", "limits.swap", "limits.cpus", "limits.pids", "limits.max_memory",
        "limits.max_swap", "limits.max_pids", "limits.max_cpus", "limits.disk",
        "limits.max_disk", "network.name",
        "network.bridge", "network.subnet", "network.blocked", "network.checkout",
        "network.git_endpoints", "web.listen", "web.public_url", "web.session_lifetime",
        "web.login_lifetime", "gitea.webhook_secret", "gitea.api", "gitea.token",
        "gitea.git_hosts", "caches.enable_quota", "caches.default_quota",
        "caches.release_grace", "gc.keep_runs", "gc.keep_for", "gc.logs_keep",
        "gc.worktrees_unused", "gc.images_unused", "gc.layers_budget", "gc.interval"}
    loaded = config.load(layout, write(tmp_path, text))
    assert {**loaded.__dict__, "source": ""} == {**config.defaults(layout).__dict__, "source": ""}


def test_values_are_parsed(tmp_path: Path) -> None:
    cfg = config.load(config.Layout.under(tmp_path), write(tmp_path, """
owner: mikael-lovqvist
socket: {mode: "0600", group: wheel}
runs: {time_limit: 15m, log_limit: 64MiB, max_parallel: 2}
network: {blocked: [192.168.0.0/16]}
deploy_targets:
  sites: {path: /srv/sites, allow: [mikael-lovqvist/rsync-publish]}
"""))
    assert cfg.owner == "mikael-lovqvist" and cfg.socket_mode == 0o600
    assert cfg.time_limit == 900 and cfg.log_limit == 64 << 20 and cfg.max_parallel == 2
    assert cfg.network_blocked == ("192.168.0.0/16",)
    assert cfg.deploy_targets["sites"].allow == ("mikael-lovqvist/rsync-publish",)


@pytest.mark.parametrize(("text", "line", "field", "words"), [
    ("runs:\n  time_limt: 1h\n", 2, "runs.time_limt", "unknown key"),
    ("socket:\n  mode: 0660\n", 2, "socket.mode", "quotes"),
    ("runs:\n  max_parallel: many\n", 2, "runs.max_parallel", "whole decimal number"),
    ("paths:\n  state: relative/dir\n", 2, "paths.state", "absolute path"),
    ("network:\n  subnet: 300.1.2.0/24\n", 2, "network.subnet", "network"),
    ("owner: ../x\n", 1, "owner", "is not a name"),
    ("owner: a\nowner: b\n", 2, "owner", "duplicate"),
    ("deploy_targets:\n  s: {path: /x, allow: [nobody]}\n", 2, "deploy_targets.s.allow[0]",
     "owner/task"),
    ("- a list\n", 1, "", "mapping"),
    ("network:\n  checkout: everywhere\n", 2, "network.checkout", "host or bridge"),
    ("network:\n  git_endpoints: [gitea.local:22]\n", 2, "network.git_endpoints[0]",
     "IP address"),
    ("network:\n  git_endpoints: ['10.0.0.1:99999']\n", 2, "network.git_endpoints[0]",
     "ADDRESS:PORT"),
    ("gitea:\n  git_hosts: [Git.Example.org]\n", 2, "gitea.git_hosts[0]", "lower case"),
    ("gc:\n  keep_runs: -1\n", 2, "gc.keep_runs", "at least 1"),
    ("gc:\n  keep_for: a week\n", 2, "gc.keep_for", "duration"),
    ("gc:\n  logs_keep: -5d\n", 2, "gc.logs_keep", "duration"),
    ("gitea:\n  api: gitea.example.org\n", 2, "gitea.api", "http(s)://"),
])
def test_bad_agent_yml(tmp_path: Path, text: str, line: int, field: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(config.Layout.under(tmp_path), path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), line, field)
    assert words in e.value.message


def test_missing_default_file_means_defaults_but_named_file_must_exist(tmp_path: Path) -> None:
    layout = config.Layout.under(tmp_path)
    assert config.load(layout).source == "(defaults)"
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(layout, tmp_path / "nope.yml")


def test_the_gitea_hosts_are_the_apis_unless_named(tmp_path: Path) -> None:
    layout = config.Layout.under(tmp_path)
    assert config.defaults(layout).gitea_hosts == frozenset()
    api = "gitea:\n  api: https://gitea.example.org/api/v1\n"
    assert config.load(layout, write(tmp_path, api)).gitea_hosts == {"gitea.example.org"}
    named = config.load(layout, write(tmp_path, api + "  git_hosts: [git.example.org]\n"))
    assert named.gitea_hosts == {"gitea.example.org", "git.example.org"}


def test_a_default_limit_past_its_maximum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent.yml:1: .*the default \(4096\) is more than "
                                          r"its maximum \(1000\); raise limits.max_pids"):
        config.load(config.Layout.under(tmp_path), write(tmp_path, "limits: {max_pids: 1000}\n"))
    cfg = config.load(config.Layout.under(tmp_path), write(
        tmp_path, "limits: {cpus: 1.5, swap: 1GiB, max_cpus: 2}\nruns: {min_free: 0}\n"))
    assert (cfg.default_limits.cpus, cfg.default_limits.swap, cfg.max_limits.cpus,
            cfg.min_free) == (1.5, 1 << 30, 2.0, 0)


def test_the_client_finds_the_socket_without_loading_settings_it_does_not_need(
        tmp_path: Path) -> None:
    root = str(tmp_path)
    assert socket_path(root) == f"{root}/run/agent.sock"  # no agent.yml
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/agent.yml").write_text("runs: {max_parallel: [not, checked, here]}\n")
    assert socket_path(root) == f"{root}/run/agent.sock"  # cannot set it
    (tmp_path / "etc/agent.yml").write_text("socket:\n  path: /run/elsewhere.sock\n")
    assert socket_path(root) == "/run/elsewhere.sock"
    with pytest.raises(ConfigError):
        socket_path(root, str(tmp_path / "missing.yml"))  # named, so it must exist
