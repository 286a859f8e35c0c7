"""`careflow rules list|mute|unmute|disable|enable` and the silences they go with, as an operator
runs them: real processes over a real store; every change and refusal is an audit row."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from careflow.core import clock
from careflow.hub.store.audit_chain import first_broken
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.schemas import parse_rfc3339
from tests.conftest import careflow_cmd


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    SqliteStore(data / "careflow.db", synchronous="normal").close()
    return data


def cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
               "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200", **env}
    return subprocess.run(careflow_cmd(*args), env=environ, capture_output=True, text=True,
                          timeout=60, check=False)


def _audit(data_dir: Path) -> list[tuple[str, str, str]]:
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        log = store.audit_log()
        assert first_broken(log) is None
        return [(row.actor, row.event, row.subject) for row in log]
    finally:
        store.close()


def _rows(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    assert done.returncode == 0, done.stderr
    return {row["rule"]: row for row in map(json.loads, done.stdout.splitlines())}


def test_it_mutes_and_unmutes_a_rule_shown_with_who_and_why(data_dir: Path) -> None:
    muted = cli(data_dir, "rules", "mute", "battery-low", "--for", "4h", "--reason",
                "cells swapped on ward 3", "--by", "ana", "--json")
    assert muted.returncode == 0, muted.stderr
    row = json.loads(muted.stdout)
    assert (row["rule"], row["control"], row["by"], row["reason"]) == (
        "battery-low", "muted", "ana", "cells swapped on ward 3")
    until_ms = parse_rfc3339(row["until"]).timestamp() * 1000
    assert abs(until_ms - clock.now_ms() - 4 * 3_600_000) < 60_000
    listed = _rows(cli(data_dir, "rules", "list", "--json"))
    assert listed["battery-low"]["control"] == "muted"
    assert listed["error-burst"]["control"] is None
    assert listed["care-alarm"]["may_quiet"] is False
    table = cli(data_dir, "rules", "list")
    assert "muted until" in table.stdout and "cells swapped on ward 3" in table.stdout
    assert "never quieted" in table.stdout
    unmuted = cli(data_dir, "rules", "unmute", "battery-low", "--by", "bo")
    assert unmuted.returncode == 0, unmuted.stderr
    assert _rows(cli(data_dir, "rules", "list", "--json"))["battery-low"]["control"] is None
    again = cli(data_dir, "rules", "unmute", "battery-low")
    assert again.returncode == 1 and "not muted" in again.stderr
    assert _audit(data_dir) == [("ana", "rule.muted", "rule battery-low"),
                                ("bo", "rule.unmuted", "rule battery-low")]


def test_it_disables_and_enables_a_rule(data_dir: Path) -> None:
    done = cli(data_dir, "rules", "disable", "error-burst", "--reason", "firmware 2.3",
               "--by", "ana")
    assert done.returncode == 0, done.stderr
    assert "error-burst disabled by ana: firmware 2.3" in done.stdout
    row = _rows(cli(data_dir, "rules", "list", "--json"))["error-burst"]
    assert (row["control"], row["until"], row["by"]) == ("disabled", None, "ana")
    wrong = cli(data_dir, "rules", "unmute", "error-burst")
    assert wrong.returncode == 1 and "careflow rules enable" in wrong.stderr
    weaker = cli(data_dir, "rules", "mute", "error-burst", "--for", "1h", "--reason", "x")
    assert weaker.returncode == 1 and "enable` it first" in weaker.stderr
    assert cli(data_dir, "rules", "enable", "error-burst", "--by", "bo").returncode == 0
    assert _audit(data_dir) == [("ana", "rule.disabled", "rule error-burst"),
                                ("bo", "rule.enabled", "rule error-burst")]


@pytest.mark.parametrize("rule", ["care-alarm", "refused-care-alarm", "gateway-offline",
                                  "hub-alerts-lagging"])
def test_a_critical_rule_is_never_muted_nor_disabled_and_the_refusal_is_audited(
        data_dir: Path, rule: str) -> None:
    muted = cli(data_dir, "rules", "mute", rule, "--for", "1h", "--reason", "noisy",
                "--by", "ana")
    disabled = cli(data_dir, "rules", "disable", rule, "--reason", "noisy", "--by", "ana")
    for done in (muted, disabled):
        assert done.returncode == 1 and "refused" in done.stderr and rule in done.stderr
    assert _rows(cli(data_dir, "rules", "list", "--json")).get(rule, {}).get("control") is None
    assert _audit(data_dir) == [("ana", "rule.mute_refused", f"rule {rule}"),
                                ("ana", "rule.disable_refused", f"rule {rule}")]


def test_a_care_alarm_stays_critical_in_a_custom_rules_folder_made_lax(
        data_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "rules"
    own.mkdir()
    (own / "lax.yaml").write_text(
        "rules:\n  - name: care-alarm\n    kind: event\n    type: alert\n"
        "    severity: warning\n")
    done = cli(data_dir, "rules", "mute", "care-alarm", "--for", "1h", "--reason", "x",
               CAREFLOW_RULES_DIR=str(own))
    assert done.returncode == 1 and "never muted" in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    ((), "a mute must end"), (("--for", "8d"), "at most 7 days"),
    (("--for", "0h"), "a mute must end")])
def test_a_mute_that_would_not_end_soon_is_refused(data_dir: Path, args: tuple[str, ...],
                                                   says: str) -> None:
    done = cli(data_dir, "rules", "mute", "battery-low", *args, "--reason", "x", "--by", "ana")
    assert done.returncode == 1 and says in done.stderr
    assert _audit(data_dir) == [("ana", "rule.mute_refused", "rule battery-low")]


@pytest.mark.parametrize(("args", "says"), [
    (("battery-low", "--for", "soon", "--reason", "x"), "such as 30m"),
    (("battery-low", "--for", "1h"), "give --reason"),
    (("battery-low", "--for", "1h", "--reason", "a\nb"), "one visible line"),
    (("no-such-rule", "--for", "1h", "--reason", "x"), "careflow rules list")])
def test_a_mute_asked_wrongly_says_what_to_do(data_dir: Path, args: tuple[str, ...],
                                              says: str) -> None:
    done = cli(data_dir, "rules", "mute", *args)
    assert done.returncode in (1, 2) and says in done.stderr


@pytest.mark.parametrize(("args", "refused"), [
    (("-r", "care-alarm"), True), (("-d", "sos-1"), True), (("-g", "gw-*"), True),
    (("-r", "hub-*"), True), (("-g", "gw-0042",), False), (("-g", "gw-0042", "-r", "care-alarm"),
                                                           False),
    (("-r", "battery-*"), False)])
def test_a_silence_of_a_critical_rule_across_gateways_is_refused(
        data_dir: Path, args: tuple[str, ...], refused: bool) -> None:
    done = cli(data_dir, "silences", "add", *args, "--for", "1h", "--reason", "visit")
    if refused:
        assert done.returncode == 1 and "name one gateway" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_careflow_status_shows_the_rules_quieted(data_dir: Path) -> None:
    assert cli(data_dir, "rules", "mute", "battery-low", "--for", "2h", "--reason",
               "cells swapped", "--by", "ana").returncode == 0
    assert cli(data_dir, "rules", "disable", "error-burst", "--reason", "firmware 2.3",
               "--by", "bo").returncode == 0
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    store.set_rule_control("care-alarm", kind="disabled", until_ms=None, by="x",
                           reason="behind careflow's back", at_ms=0)  # the hub ignores it
    store.close()
    shown = cli(data_dir, "status")
    assert shown.returncode == 1  # no hub runs here
    assert "rule quieted: battery-low muted until" in shown.stdout
    assert "by ana: cells swapped" in shown.stdout
    assert "rule quieted: error-burst disabled by bo: firmware 2.3" in shown.stdout
    assert "care-alarm" not in shown.stdout
    report = json.loads(cli(data_dir, "status", "--json").stdout)
    assert [(r["rule"], r["control"], r["by"]) for r in report["rules_quieted"]] == [
        ("battery-low", "muted", "ana"), ("error-burst", "disabled", "bo")]


@pytest.mark.parametrize("args", [("mute", "battery-low", "--for", "4h"),
                                  ("disable", "battery-low")], ids=["mute", "disable"])
def test_a_rule_is_quieted_with_its_audit_row_or_not_at_all(data_dir: Path,
                                                           args: tuple[str, ...]) -> None:
    """The audit row cannot be written (the disk is full for it, here a trigger that refuses
    it): the rule stays announced, rather than quieted with no one accountable in the trail."""
    with sqlite3.connect(data_dir / "careflow.db") as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_log "
                     "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    conn.close()
    done = cli(data_dir, "rules", *args, "--reason", "noisy", "--by", "ana")
    assert done.returncode != 0
    assert "disk is full" in done.stderr
    assert _rows(cli(data_dir, "rules", "list", "--json"))["battery-low"]["control"] is None
