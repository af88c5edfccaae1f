"""The man pages cover every agent.yml key and every efci command."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent import cli, config

MAN = Path(__file__).parents[2] / "man"


def test_every_setting_is_in_efci_agent_yml_5() -> None:
    page = (MAN / "efci-agent.yml.5").read_text()
    for setting in config.SETTINGS:
        assert setting.key in page, setting.key
    assert "deploy_targets" in page


def test_every_command_is_in_efci_1() -> None:
    page = (MAN / "efci.1").read_text().replace("\\-", "-")
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f".B {name}" in page or f".BR {name}" in page or f".BI {name}" in page or \
            f'.BR "{name} ' in page, name
