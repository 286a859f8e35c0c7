"""The CLI's conventions, checked over the whole command tree rather than remembered: --json on
every command that changes something, an example in every --help."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from careflow.cli.app import app
from careflow.edge.cli import edge_app


def _leaves(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command under ``group`` (hidden ones too), by its path of names."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _leaves(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_leaves(typer.main.get_command(app)))
GATEWAY_COMMANDS = dict(_leaves(typer.main.get_command(edge_app)))
# Every command that changes something: its outcome as JSON, for scripts and agents.
CHANGES_SOMETHING = [
    ("events", "publish"), ("devices", "pause"), ("devices", "resume"), ("devices", "revoke"),
    ("silences", "add"), ("silences", "expire"), ("incidents", "ack"), ("incidents", "resolve"),
    ("notify", "test"), ("provision", "register"), ("ca", "init"), ("ca", "crl-refresh"),
    ("replay",), ("report",), ("edge", "claim"), ("gateway", "cmd"), ("users", "add"),
    ("users", "remove"), ("rules", "mute"), ("rules", "unmute"), ("rules", "disable"),
    ("rules", "enable"), ("agent", "propose"), ("agent", "approve"), ("agent", "reject"),
    ("agent", "run"), ("agent", "mode"),
]


@pytest.mark.parametrize("path", CHANGES_SOMETHING, ids=" ".join)
def test_every_command_that_changes_something_takes_json(path: tuple[str, ...]) -> None:
    options = {opt for param in COMMANDS[path].params for opt in param.opts}
    assert "--json" in options


def test_the_list_of_commands_that_change_something_is_complete() -> None:
    """A new command is either in CHANGES_SOMETHING or known not to change anything."""
    reads_or_runs = {
        ("hub",), ("demo",), ("simulate",), ("status",), ("edge", "run"),
        ("events", "query"), ("events", "count"), ("devices", "list"), ("devices", "show"),
        ("deadletter", "list"), ("schemas", "validate"), ("rules", "check"), ("rules", "test"),
        ("rules", "list"), ("incidents", "list"), ("incidents", "show"), ("notify", "list"),
        ("silences", "list"), ("provision", "list"), ("provision", "refusals"),
        ("provision", "watch"), ("ca", "status"), ("users", "list"), ("runbooks", "list"),
        ("runbooks", "check"), ("agent", "list"), ("agent", "show"), ("agent", "log"),
        ("mcp",),  # a server on stdio: what propose_action leaves, it answers as MCP JSON
    }
    visible = {path for path, command in COMMANDS.items() if not command.hidden}
    assert visible == reads_or_runs | set(CHANGES_SOMETHING)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_shows_an_example_in_its_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.parametrize("path", sorted(GATEWAY_COMMANDS), ids=" ".join)
def test_every_gateway_command_shows_an_example_in_its_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(edge_app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
