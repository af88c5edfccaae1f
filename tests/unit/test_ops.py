"""The operations table: each op declared once, by its handler's signature,
and every request the CLI sends valid against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import cli, ops, protocol
from agent.errors import EfciError, RequestError


def test_an_ops_arguments_are_its_handlers_keyword_parameters() -> None:
    assert ops.OPS["run"].args == {"task": (str, True), "follow": (bool, False),
                                   "session": (str, False)}
    assert ops.OPS["logs"].args == {"run": (int, True), "follow": (bool, False),
                                    "position": (int, False), "since_ns": (int, False),
                                    "tail": (int, False), "until": (int, False),
                                    "until_skip": (int, False), "raw": (bool, False),
                                    "stream": (str, False)}
    assert ops.OPS["ping"].args == {}
    request = protocol.parse_request(b'{"op": "key_trust", "args": {"host": "h", "port": 22}}',
                                     ops.schemas())
    assert request.args == {"host": "h", "port": 22}
    with pytest.raises(RequestError, match="missing argument 'host'"):
        protocol.parse_request(b'{"op": "key_trust"}', ops.schemas())


def test_an_argument_must_be_a_json_scalar() -> None:
    async def bad(agent: Any, call: Any, *, where: Path) -> object:
        return None

    with pytest.raises(TypeError, match="argument where must be one of str, int, bool"):
        ops._schema(bad)


class Sent(EfciError):
    pass


class RecordingClient:
    """Stands in for the socket: checks each request against the table,
    then stops the command (its output is not what is tested here)."""

    sent: list[str] = []

    def __init__(self, *_: object, **__: object) -> None:
        pass

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def call(self, op: str, args: dict[str, Any] | None = None, **_: object) -> Any:
        line = json.dumps({"id": 1, "op": op, "args": args or {}}).encode()
        protocol.parse_request(line, ops.schemas())  # RequestError if the CLI is wrong
        self.sent.append(op)
        raise Sent(op)


COMMAND_LINES = [
    ["status"], ["tasks"], ["images"], ["image", "build", "x"], ["reload"], ["run", "t"],
    ["run", "--follow", "t"], ["runs", "--task", "t"], ["show", "1"],
    ["logs", "--follow", "--tail", "5", "--since", "10m", "1"], ["cancel", "1"],
    ["restart", "1"], ["rm", "1"], ["firewall", "status"], ["firewall", "probe"],
    ["firewall", "remove"], ["key", "create", "k"], ["key", "show", "k", "--owner", "o"],
    ["key", "delete", "k", "--force"], ["key", "list"], ["key", "trust", "h", "--port", "2222"],
    ["key", "register", "k", "--repo", "alice/site"], ["gitea", "check"],
    ["cache", "ls"], ["cache", "set-quota", "c", "1GiB"], ["cache", "rm", "c", "--force"],
    ["cache", "release", "c", "--project", "t"], ["cache", "promote", "1", "c"],
    ["retry", "1", "--from", "b"], ["gc", "--dry-run", "--owner", "alice"],
    ["web-login"], ["web-logout", "--all"],
]


def test_every_request_the_cli_sends_is_declared(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "Client", RecordingClient)
    RecordingClient.sent = []
    for argv in COMMAND_LINES:
        assert cli.main(["--root", str(tmp_path), *argv]) == 1, argv
    assert len(RecordingClient.sent) == len(COMMAND_LINES)
    # Every op is reachable from efci, but ping (for scripts), shell (efci
    # shell speaks it from agent/terminal.py, tested end to end) and the web
    # page's own (agent/web, tested in a browser by tests/web).
    assert set(ops.OPS) - set(RecordingClient.sent) == {
        "ping", "shell", "web_session_open", "web_session", "web_hello", "key_scan", "push"}
