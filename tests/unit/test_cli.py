from __future__ import annotations

from pathlib import Path

import pytest

from agent import cli


def test_common_options_go_before_or_after_the_subcommand() -> None:
    parser = cli._parser()
    before = parser.parse_args(["--json", "--config", "/a.yml", "runs", "--limit", "3"])
    after = parser.parse_args(["runs", "--limit", "3", "--json", "--config", "/a.yml"])
    for args in (before, after):
        assert args.json is True and args.config == "/a.yml" and args.limit == 3
    plain = parser.parse_args(["--json", "status"])
    assert plain.json is True  # not reset by the subcommand's absent --json


def test_config_example_prints_a_loadable_file(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    assert cli.main(["--root", str(tmp_path), "config", "example"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "agent.yml").write_text(text)
    assert cli.main(["--config", str(tmp_path / "agent.yml"), "config", "check"]) == 0
    assert "agent.yml: ok" in capsys.readouterr().out


def test_unreachable_agent_is_one_line(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    assert cli.main(["--root", str(tmp_path), "status"]) == 69
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "run/agent.sock") in err[0]


def test_an_unreadable_file_is_one_clear_line(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    (tmp_path / "run").mkdir()
    import socket

    with socket.socket(socket.AF_UNIX) as s:  # something to connect to
        s.bind(str(tmp_path / "run/agent.sock"))
        s.listen()
        status = cli.main(["--root", str(tmp_path), "key", "trust", "h", "--keys",
                           str(missing)])
    assert status == 74
    assert capsys.readouterr().err.strip() == f"efci: {missing}: No such file or directory"


def test_sizes_read_as_people_write_them() -> None:
    from agent.views import size

    assert [size(n) for n in (0, 1023, 1536, 3 << 20, 12 << 30)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "12.0 GiB"]


def test_phases_are_shown_as_a_tree_of_parts() -> None:
    from agent.views import phase_tree
    phases = [{"phase": "queued", "within": None}, {"phase": "stage a", "within": None},
              {"phase": "checkout lib", "within": "stage a"},
              {"phase": "fetch", "within": "checkout lib"},
              {"phase": "run", "within": "stage a"}, {"phase": "stage b", "within": None},
              {"phase": "run", "within": "stage b"}, {"phase": "teardown", "within": None}]
    assert [(depth, p["phase"]) for depth, p in phase_tree(phases)] == [
        (0, "queued"), (0, "stage a"), (1, "checkout lib"), (2, "fetch"), (1, "run"),
        (0, "stage b"), (1, "run"), (0, "teardown")]
