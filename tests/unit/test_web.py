"""The page's pure parts: ranges, and which hosts and origins it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.requests import Request

from agent import config
from agent.web.app import RangeRefused, Refusal, Web, _range
from agent.web.link import AgentLink


def test_ranges() -> None:
    assert _range("bytes=0-0", 10) == (0, 1)
    assert _range("bytes=2-", 10) == (2, 10)
    assert _range("bytes=-3", 10) == (7, 10)
    assert _range("bytes=5-100", 10) == (5, 10)
    with pytest.raises(RangeRefused):
        _range("bytes=10-", 10)
    for bad in ("bytes=1-2,4-5", "items=0-1", "bytes=a-b", "bytes=-", "bytes=3-1x"):
        with pytest.raises(Refusal) as refused:
            _range(bad, 10)
        assert refused.value.status == 416


def request(headers: dict[str, str], path: str = "/runs", query: str = "") -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})


def web(tmp_path: Path, public_url: str = "") -> Web:
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc/agent.yml").write_text(
        f"web:\n  listen: 127.0.0.1:9000\n  public_url: '{public_url}'\n")
    cfg = config.load(config.Layout.under(tmp_path))
    return Web(cfg, AgentLink(cfg.socket_path))


def test_only_its_own_hosts_and_origins(tmp_path: Path) -> None:
    w = web(tmp_path, "https://ci.example.org")
    for host in ("127.0.0.1:9000", "localhost:9000", "ci.example.org"):
        w.check_host(request({"host": host}))
    for host in ("evil.example:9000", "127.0.0.1:9001", ""):
        with pytest.raises(Refusal) as refused:
            w.check_host(request({"host": host}))
        assert refused.value.status == 421
    w.check_origin(request({"origin": "https://ci.example.org"}))
    w.check_origin(request({"origin": "http://127.0.0.1:9000"}))
    for origin in ({"origin": "http://ci.example.org"}, {"origin": "null"}, {}):
        with pytest.raises(Refusal):
            w.check_origin(request(origin))
    assert w.secure


def test_a_long_query_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refusal) as refused:
        web(tmp_path).check_host(request({"host": "127.0.0.1:9000"}, query="a" * 5000))
    assert refused.value.status == 414
