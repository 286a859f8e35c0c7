"""Renamed commands: the new spelling is the one --help shows; the old one keeps working for the
scripts, images and runbooks that have it, hidden, with a one-line note on stderr."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer

from careflow.cli.app import app
from tests.conftest import careflow_cmd

ROOT = typer.main.get_command(app)


def command(*path: str) -> Any:
    found: Any = ROOT
    for name in path:
        found = found.commands[name]
    return found


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("old", "new"), [
    (("device", "revoke"), ("devices", "revoke")),
    (("gateway", "claim"), ("edge", "claim")),
], ids=" ".join)
def test_it_hides_the_old_spelling_and_keeps_its_options(old: tuple[str, ...],
                                                         new: tuple[str, ...]) -> None:
    assert command(*old).hidden and not command(*new).hidden
    assert [p.opts for p in command(*old).params] == [p.opts for p in command(*new).params]
    assert command(*old).help == command(*new).help


def test_the_old_device_group_is_hidden_from_the_top() -> None:
    assert command("device").hidden and not command("devices").hidden


def test_the_old_spelling_runs_and_names_the_new_one(tmp_path: Path) -> None:
    done = cli(tmp_path, "device", "revoke", "gw-x", "--no-reload", "--pki-dir",
               str(tmp_path / "no-pki"))
    assert done.returncode == 2, done.stderr  # no PKI there: a configuration problem
    assert "no PKI directory" in done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: `careflow device revoke` is deprecated; use `careflow devices "
                     "revoke`"]
    new = cli(tmp_path, "devices", "revoke", "gw-x", "--no-reload", "--pki-dir",
              str(tmp_path / "no-pki"))
    assert new.returncode == 2 and "note:" not in new.stderr


def test_the_old_claim_spelling_runs_the_gateway_command(tmp_path: Path) -> None:
    done = cli(tmp_path, "gateway", "claim", "--serial", "SN-1", "--token", "t", "--broker",
               "mqtt://127.0.0.1:1", "--out", str(tmp_path / "gw"), "--timeout", "1")
    assert done.returncode == 75, done.stderr  # no broker there: try again
    assert "use `careflow edge claim`" in done.stderr
