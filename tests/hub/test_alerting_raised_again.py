"""A care alarm raised again is a new emergency: on-call hears it at once, every time.

SOS buttons never send ``cleared``: once acknowledged, their incident stays unresolved, and a
later raise of the same button used to be swallowed by the one-unresolved-incident index.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from careflow.cli.common import iso_ms
from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import Notification
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import (
    HttpReceiver,
    Mosquitto,
    RunningHub,
    alert_stage,
    careflow_cmd,
    make_settings,
    wait_until,
)
from tests.hub.conftest import batch_of, publish

RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    severity: critical
    where: {state: raised}
    summary: "CARE ALARM from {device} at {gateway}"
escalation:
  - severity: critical
    steps:
      - after: 5m
        channels: [oncall]
"""
T0 = 1_800_000_000_000
MINUTE = 60_000


def _raise(store: SqliteStore, stage: AlertStage, button: Stamper, at_ms: int) -> None:
    stored = store.append(batch_of([button.stamp("alert", {"kind": "sos", "state": "raised"})],
                                   received_ms=at_ms))
    stage.handle(stored.stored, now_ms=at_ms)


def _oncall(store: SqliteStore) -> list[Notification]:
    return [n for n in reversed(store.notifications(limit=1000)) if n.channel == "oncall"]


def test_it_announces_an_acknowledged_alarm_raised_again_at_once(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES)
    button = Stamper(gateway="gw", device="sos-1")
    _raise(store, stage, button, T0)
    (first,) = store.incidents()
    store.acknowledge_incident(first.id, by="nurse-kari", at_ms=T0 + MINUTE)

    _raise(store, stage, button, T0 + 30 * MINUTE)

    notes = _oncall(store)
    assert [n.kind for n in notes] == ["firing", "firing"]
    again = notes[-1]
    assert again.next_attempt_ms == T0 + 30 * MINUTE  # critical: no group wait
    assert "RAISED AGAIN" in again.title
    assert "raised 2 times" in again.body and "first raised 2027-01-15 08:00:00 UTC" in again.body
    assert "acknowledged by nurse-kari" in again.body
    current = store.incident(again.incident_id)
    assert current is not None and current.state == "open"
    assert (current.raises, current.first_raised_ms, current.last_raised_ms) == (
        2, T0, T0 + 30 * MINUTE)
    assert current.follows_id == first.id
    earlier = store.incident(first.id)
    assert earlier is not None and earlier.state == "resolved"
    assert earlier.resolved_by == f"careflow (raised again: incident {current.id})"
    # no "resolved" message for the acknowledged one: people must not read "it is over"
    assert not [n for n in store.notifications(limit=1000) if n.kind == "resolved"]


def test_escalation_restarts_for_the_new_raise(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES)
    button = Stamper(gateway="gw", device="sos-1")
    _raise(store, stage, button, T0)
    (first,) = store.incidents()
    store.acknowledge_incident(first.id, by="kari", at_ms=T0 + MINUTE)
    _raise(store, stage, button, T0 + 60 * MINUTE)

    stage.tick(T0 + 64 * MINUTE)
    assert [n.kind for n in _oncall(store)] == ["firing", "firing"]  # 4 min: not yet
    stage.tick(T0 + 65 * MINUTE)
    assert [n.kind for n in _oncall(store)] == ["firing", "firing", "escalation"]


def test_an_unacknowledged_alarm_raised_again_is_announced_again_and_keeps_escalating(
    tmp_path: Path,
) -> None:
    store, stage = alert_stage(tmp_path, RULES)
    button = Stamper(gateway="gw", device="sos-1")
    _raise(store, stage, button, T0)
    _raise(store, stage, button, T0 + 3 * MINUTE)

    (incident,) = store.incidents(states=None)
    assert (incident.state, incident.raises, incident.last_raised_ms) == (
        "open", 2, T0 + 3 * MINUTE)
    notes = _oncall(store)
    assert [n.kind for n in notes] == ["firing", "firing"]
    assert "RAISED AGAIN" in notes[-1].title and "raised 2 times" in notes[-1].body
    assert notes[-1].next_attempt_ms == T0 + 3 * MINUTE
    # nobody answered yet: the walk keeps counting from the first raise, not from the last
    stage.tick(T0 + 5 * MINUTE)
    assert [n.kind for n in _oncall(store)] == ["firing", "firing", "escalation"]


def test_a_third_raise_counts_three_and_keeps_the_first_raise_time(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES)
    button = Stamper(gateway="gw", device="sos-1")
    for n in range(3):
        _raise(store, stage, button, T0 + n * 30 * MINUTE)
        (active,) = store.incidents(states=("open",))
        store.acknowledge_incident(active.id, by="kari", at_ms=T0 + n * 30 * MINUTE + MINUTE)
    (last,) = store.incidents(states=("acknowledged",))
    assert (last.raises, last.first_raised_ms) == (3, T0)
    assert "raised 3 times" in _oncall(store)[-1].body


def test_a_raise_after_a_restart_is_announced_too(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES)
    button = Stamper(gateway="gw", device="sos-1")
    _raise(store, stage, button, T0)
    (first,) = store.incidents()
    store.acknowledge_incident(first.id, by="kari", at_ms=T0 + MINUTE)
    _, restarted = alert_stage(tmp_path, RULES)  # a new hub process on the same database
    _raise(store, restarted, button, T0 + 10 * MINUTE)
    assert [n.kind for n in _oncall(store)] == ["firing", "firing"]
    assert store.incidents(states=("open",))[0].raises == 2


@pytest.mark.broker
def test_on_call_hears_an_acknowledged_sos_raised_again_through_a_live_hub(
    mosquitto: Mosquitto, tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """End to end: Mosquitto, the hub with its alert stage, the notification sender and a real
    HTTP receiver behind an Apprise json:// channel; `careflow incidents show` tells the story."""
    channels = load_channels({
        "CAREFLOW_CHANNEL_ONCALL": f"json://127.0.0.1:{http_receiver.port}/oncall",
        "CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/ops"})
    (tmp_path / "r.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "r.yaml"])
    settings = make_settings(tmp_path / "data", mosquitto.url)
    hub = RunningHub(settings, rules, channels=channels).start()
    try:
        button = Stamper(gateway="gw-e", device="sos-7")
        publish(mosquitto, [button.stamp("alert", {"kind": "sos", "state": "raised"})])
        wait_until(lambda: len(http_receiver.bodies) == 1, what="the first alarm on on-call")
        (first,) = hub.store.incidents()
        hub.store.acknowledge_incident(first.id, by="nurse-kari",
                                       at_ms=clock.now_ms())

        publish(mosquitto, [button.stamp("alert", {"kind": "sos", "state": "raised"})])
        wait_until(lambda: len(http_receiver.bodies) == 2, what="the second raise on on-call")
        again = http_receiver.bodies[1]
        assert again["title"].startswith("[CRITICAL] RAISED AGAIN: CARE ALARM from sos-7")
        assert "raised 2 times" in again["message"]
        assert "acknowledged by nurse-kari" in again["message"]
        assert http_receiver.requests[1][1] == "/oncall"

        env = {**os.environ, "CAREFLOW_DATA_DIR": str(settings.data_dir)}
        (current,) = hub.store.incidents(states=("open",))
        shown = subprocess.run(careflow_cmd("incidents", "show", str(current.id), "--json"),
                               env=env, capture_output=True, text=True, check=True, timeout=30)
        row = json.loads(shown.stdout)
        assert (row["raises"], row["follows_id"], row["state"]) == (2, first.id, "open")
        assert row["first_raised"] == iso_ms(first.triggered_ms)
        assert row["last_raised"] == iso_ms(current.triggered_ms)
    finally:
        hub.stop()


def test_a_database_from_before_raises_and_due_times_gains_the_columns(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    incident_id = store.open_incident(rule="care-alarm", gateway="gw", device="sos-1",
                                      severity="critical", summary="s", detail="d", at_ms=T0)
    store.close()
    with sqlite3.connect(tmp_path / "db") as conn:  # as the previous release left it
        conn.execute("DROP INDEX incidents_due")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        for column in ("raises", "first_raised_ms", "last_raised_ms", "follows_id",
                       "next_due_ms"):
            conn.execute(f"ALTER TABLE incidents DROP COLUMN {column}")
    reopened = SqliteStore(tmp_path / "db")
    assert incident_id is not None
    incident = reopened.incident(incident_id)
    assert incident is not None
    assert (incident.raises, incident.first_raised_ms, incident.last_raised_ms,
            incident.follows_id, incident.next_due_ms) == (1, T0, T0, None, T0)
    assert reopened.due_incidents(now_ms=T0, limit=10) == [incident]
