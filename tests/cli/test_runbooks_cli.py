"""`careflow runbooks list|check`: what the agent may do per runbook, and every problem with its
file and line (exit 1), a missing folder a usage error (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from careflow.cli.app import app
from tests.conftest import careflow_cmd

SHIPPED = Path(__file__).parents[2] / "runbooks"


def test_it_lists_the_runbooks_as_json() -> None:
    result = CliRunner().invoke(app, ["runbooks", "list", "--json", "--runbooks-dir",
                                      str(SHIPPED)])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in map(json.loads, result.output.splitlines())}
    assert rows["care-alarm"]["read_only"] is True and rows["care-alarm"]["actions"] == []
    assert rows["gateway-offline"]["actions"][0] == {
        "action": "gateway.resend", "params": {"gateway": "{{incident.gateway}}"},
        "why": rows["gateway-offline"]["actions"][0]["why"]}
    assert rows["hub-unhealthy"]["rules"][-2:] == ["hub-devices-over-bound",
                                                   "hub-evaluation-failed"]


def test_the_shipped_runbooks_pass_the_check() -> None:
    result = CliRunner().invoke(app, ["runbooks", "check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True and report["problems"] == [] and report["runbooks"] >= 12
    assert report["rules_not_loaded"] == []


def test_it_names_each_problem_and_exits_1_or_2_without_a_folder(tmp_path: Path) -> None:
    broken = (SHIPPED / "care-alarm.md").read_text().replace(
        "actions: []", "actions:\n  - action: gateway.restart-agent\n"
        "    params: {gateway: \"{{incident.gateway}}\"}")
    (tmp_path / "care-alarm.md").write_text(broken)
    (tmp_path / "error-burst.md").write_text(
        (SHIPPED / "error-burst.md").read_text().replace("gateway.diagnostics", "gateway.shell"))
    run = subprocess.run(careflow_cmd("runbooks", "check", "--runbooks-dir", str(tmp_path)),
                         capture_output=True, text=True, env=os.environ, timeout=60, check=False)
    assert run.returncode == 1, run.stderr
    assert f"{tmp_path}/care-alarm.md:18: gateway.restart-agent is a write: this runbook is " \
           "read-only" in run.stderr
    assert f"{tmp_path}/error-burst.md:9: unknown action 'gateway.shell'" in run.stderr
    assert "2 runbook(s), 2 problem(s)" in run.stdout
    missing = subprocess.run(careflow_cmd("runbooks", "check", "--runbooks-dir",
                                          str(tmp_path / "nope")),
                             capture_output=True, text=True, env=os.environ, timeout=60,
                             check=False)
    assert missing.returncode == 2 and "no runbooks folder" in missing.stderr
