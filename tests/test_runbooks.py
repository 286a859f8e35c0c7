"""Runbooks are instructions someone follows at 3 a.m.: every one a shipped rule links to must
exist, and every `careflow ...` command they tell people to run must be a real command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from careflow.cli.app import app
from careflow.hub.alerting.incidents import default_rules
from careflow.hub.ops.runbooks import load_runbooks

ROOT = Path(__file__).parents[1]
RUNBOOKS = sorted(p for p in (ROOT / "runbooks").glob("*.md") if p.name != "README.md")
COMMAND = re.compile(r"`careflow ([a-z][a-z -]*?)(?= [A-Z]| --| -[a-z]|`)")


def test_every_shipped_rule_links_an_existing_runbook() -> None:
    rules = default_rules().rules
    assert all(rule.runbook for rule in rules), [r.name for r in rules if not r.runbook]
    for rule in rules:
        assert rule.runbook is not None and (ROOT / rule.runbook).is_file(), rule.runbook


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_the_commands_a_runbook_names_exist(runbook: Path) -> None:
    commands = {match.strip() for match in COMMAND.findall(runbook.read_text())}
    assert commands, f"{runbook.name} names no careflow command to run"
    for command in sorted(commands):
        result = CliRunner().invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, f"{runbook.name}: `careflow {command}`: {result.output}"


def test_each_rule_links_the_runbook_whose_front_matter_answers_it() -> None:
    """The link people follow and the runbook the agent follows are one file."""
    runbooks = load_runbooks(ROOT / "runbooks")
    for rule in default_rules().rules:
        assert rule.runbook is not None
        assert rule.name in runbooks[Path(rule.runbook).stem].rules, rule.name
