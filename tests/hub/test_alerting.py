"""The alert stage on a real SQLite store: incidents survive a hub restart without duplicates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from careflow.edge.stamper import Stamper
from careflow.errors import StoreError
from careflow.hub.alerting import AlertStage
from careflow.hub.notify import load_channels
from careflow.hub.rules import load_rules
from careflow.hub.sqlite_store import SqliteStore
from careflow.hub.store import EventFilter
from tests.hub.test_sqlite_store import batch_of

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
"""
ALARM_RULE = """
  - name: care-alarm
    kind: event
    type: alert
    severity: critical
    where: {state: raised}
"""


def test_it_keeps_one_incident_across_a_restart_and_resolves_it_later(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "r.yaml"])
    store = SqliteStore(tmp_path / "db")
    door = Stamper(gateway="gw", device="door")
    stage = AlertStage(store, rules)
    stored = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 5})]))
    stage.handle(stored.stored, now_ms=10**13)
    assert [i.state for i in store.incidents()] == ["open"]

    restarted = AlertStage(store, rules)  # a new hub process on the same store
    again = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 4})]))
    restarted.handle(again.stored, now_ms=10**13 + 1)
    assert len(store.incidents(states=None)) == 1
    healed = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 90})]))
    restarted.handle(healed.stored, now_ms=10**13 + 2)
    assert [i.state for i in store.incidents()] == ["resolved"]
    assert store.count(EventFilter()) == 3


class FlakyStore(SqliteStore):
    """A real store whose incident writes fail a given number of times (disk full, locked)."""

    failures = 0

    def open_incident(self, **kwargs: Any) -> int | None:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            msg = "cannot open an incident in the event store: database is locked"
            raise StoreError(msg)
        return super().open_incident(**kwargs)


def test_an_alert_the_store_refused_is_recorded_at_the_next_tick_and_later_ones_wait(
        tmp_path: Path) -> None:
    """The evaluator counts a change as done once reported; if the store refuses it, the stage
    must keep it (and everything after it, in order), never drop it."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = FlakyStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]))
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    store.failures = 2  # the battery change, then its retry with the alarm behind it
    stored = store.append(batch_of([
        door.stamp("status", {"state": "ok", "battery_pct": 5}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=10**13)  # must not raise, nor skip the alarm
    assert store.incidents() == [] and stage.record_errors == 2
    stage.tick(10**13 + 250)
    assert [i.rule for i in reversed(store.incidents())] == ["battery-low", "care-alarm"]


def test_messages_link_the_runbook_when_a_base_url_is_configured(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(ALARM_RULE.replace(
        "    where: {state: raised}", "    where: {state: raised}\n    runbook: runbooks/care-alarm.md"
    ).replace("\n  - name", "rules:\n  - name", 1))
    store = SqliteStore(tmp_path / "db")
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), channels,
                       runbook_url="https://git.example.org/careflow/blob/main/")
    sos = Stamper(gateway="gw", device="sos")
    stored = store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=10**13)
    (notification,) = store.notifications()
    assert "https://git.example.org/careflow/blob/main/runbooks/care-alarm.md" in notification.body
