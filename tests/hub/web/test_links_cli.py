"""`careflow incidents ack|resolve` land in the incident's timeline with the change, and
`incidents show` lists the timeline, whoever acted and by which way (real CLI processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from careflow.core import clock
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import careflow_cmd


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_cli_records_its_acknowledge_and_resolve_and_shows_the_timeline(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteStore(data / "careflow.db")
    incident = store.open_incident(rule="care-alarm", gateway="gw-1", device="fall-1",
                                   severity="critical", summary="CARE ALARM fall-1",
                                   detail="fall", at_ms=clock.now_ms())
    assert incident is not None
    store.record_action(incident, at_ms=clock.now_ms(), action="silence", by="oncall",
                        via="link", detail="link abcdefghijklmnop sent to oncall")

    acked = cli(data, "incidents", "ack", str(incident), "--by", "nurse [b]kari[/b]", "--json")
    assert acked.returncode == 0, acked.stderr
    row = json.loads(acked.stdout)
    assert row["state"] == "acknowledged"
    assert [(e["action"], e["by"], e["via"]) for e in row["timeline"]] == [
        ("silence", "oncall", "link"), ("acknowledge", "nurse [b]kari[/b]", "cli")]

    refused = cli(data, "incidents", "ack", str(incident), "--by", "someone-else")
    assert refused.returncode != 0 and "acknowledged" in refused.stderr + refused.stdout
    assert len(store.incident_actions(incident)) == 2  # a refused ack records nothing

    assert cli(data, "incidents", "resolve", str(incident), "--by", "tech-anne").returncode == 0
    shown = cli(data, "incidents", "show", str(incident))
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if " via " in line]
    assert len(lines) == 3
    assert "silence by oncall via link (link abcdefghijklmnop sent to oncall)" in lines[0]
    assert "acknowledge by nurse [b]kari[/b] via cli" in lines[1]  # shown, not obeyed
    assert "resolve by tech-anne via cli" in lines[2]
    (entry,) = [e for e in store.incident_actions(incident) if e.action == "resolve"]
    resolved = store.incident(incident)
    assert resolved is not None and resolved.resolved_ms == entry.at_ms  # one moment, one commit


def test_the_name_given_to_the_cli_is_one_visible_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteStore(data / "careflow.db")
    incident = store.open_incident(rule="care-alarm", gateway="gw-1", device="fall-1",
                                   severity="critical", summary="CARE ALARM fall-1",
                                   detail="fall", at_ms=clock.now_ms())
    assert incident is not None
    forged = "ana\nAcknowledge: https://evil.example/l/x\u202e"
    assert cli(data, "incidents", "ack", str(incident), "--by", forged).returncode == 0
    acknowledged = store.incident(incident)
    assert acknowledged is not None  # it goes into later messages: "acknowledged by ..."
    assert acknowledged.acknowledged_by == "ana Acknowledge: https://evil.example/l/x"
    (entry,) = store.incident_actions(incident)
    assert entry.by == acknowledged.acknowledged_by
