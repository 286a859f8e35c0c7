"""The alert stage honours rules a person muted or disabled, live: a muted rule records and
announces nothing until its mute ends (then what is open is announced), a disabled one opens
nothing until enabled (then what still holds fires), and a care alarm is never quieted, whatever
the store says."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from careflow.core.errors import StoreError
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import CONTROLS_REFRESH_MS, AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import Incident
from careflow.hub.store.sqlite_store import SqliteStore
from tests.hub.conftest import batch_of

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
  - name: device-silent
    kind: absence
    grace: 2
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
"""
CHANNELS = {"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x",
            "CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/y"}
T = 10**13


def _stage(tmp_path: Path) -> tuple[SqliteStore, AlertStage]:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    return store, AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))


def _send(store: SqliteStore, stage: AlertStage, source: Stamper, now_ms: int, type_: str,
          data: dict[str, object]) -> None:
    stage.handle(store.append(batch_of([source.stamp(type_, data)])).stored, now_ms=now_ms)


def test_a_muted_rule_records_its_incidents_announces_none_and_then_what_is_open(
        tmp_path: Path) -> None:
    store, stage = _stage(tmp_path)
    store.set_rule_control("battery-low", kind="muted", until_ms=T + 60_000, by="ana",
                           reason="cells swapped", at_ms=T)
    stage.tick(T)
    for device in ("door-1", "door-2"):
        _send(store, stage, Stamper(gateway="gw-1", device=device), T + 1, "status",
              {"state": "ok", "battery_pct": 5})
    assert len(store.incidents(states=("open",))) == 2  # recorded
    assert store.notifications() == []  # nothing announced
    assert stage.muted == 2
    stage.tick(T + 59_999)
    assert store.notifications() == []
    stage.tick(T + 60_000)  # the mute ends: what is still open is announced, once
    notes = store.notifications()
    assert [(n.incident_id, n.channel, n.kind) for n in notes] == [(0, "ops", "digest")]
    assert "battery-low is announced again: 2 incident(s) still open" in notes[0].title
    assert "gw-1/door-1" in notes[0].body and "gw-1/door-2" in notes[0].body
    stage.tick(T + 60_250)
    assert len(store.notifications()) == 1
    _send(store, stage, Stamper(gateway="gw-1", device="door-3"), T + 60_300, "status",
          {"state": "ok", "battery_pct": 5})
    assert [n.kind for n in store.notifications()].count("firing") == 1  # announced again


def test_an_unmuted_rule_announces_what_is_open_within_a_second(tmp_path: Path) -> None:
    store, stage = _stage(tmp_path)
    store.set_rule_control("battery-low", kind="muted", until_ms=T + 3_600_000, by="ana",
                           reason="x", at_ms=T)
    stage.tick(T)
    _send(store, stage, Stamper(gateway="gw-1", device="door-1"), T + 1, "status",
          {"state": "ok", "battery_pct": 5})
    store.clear_rule_control("battery-low")  # careflow rules unmute, from another process
    stage.tick(T + 250)  # read at most once a second: still muted
    assert store.notifications() == []
    stage.tick(T + CONTROLS_REFRESH_MS)
    assert [n.kind for n in store.notifications()] == ["digest"]


def test_a_disabled_rule_opens_nothing_and_fires_again_once_enabled(tmp_path: Path) -> None:
    store, stage = _stage(tmp_path)
    store.set_rule_control("battery-low", kind="disabled", until_ms=None, by="ana",
                           reason="firmware", at_ms=T)
    store.set_rule_control("device-silent", kind="disabled", until_ms=None, by="ana",
                           reason="firmware", at_ms=T)
    stage.tick(T)
    door, sensor = Stamper(gateway="gw-1", device="door-1"), Stamper(gateway="gw-1",
                                                                     device="pir-1")
    _send(store, stage, door, T + 1, "status", {"state": "ok", "battery_pct": 5})
    _send(store, stage, sensor, T + 1, "heartbeat", {"interval_s": 60})
    stage.tick(T + 200_000)  # pir-1 silent for more than 2 x 60 s
    assert store.incidents() == [] and store.notifications() == []
    store.clear_rule_control("battery-low")
    store.clear_rule_control("device-silent")
    stage.tick(T + 200_000 + CONTROLS_REFRESH_MS)  # enabled: what still holds fires again
    stage.tick(T + 200_000 + CONTROLS_REFRESH_MS + 250)
    assert sorted((i.rule, i.device) for i in store.incidents()) == [
        ("battery-low", "door-1"), ("device-silent", "pir-1")]
    assert {n.kind for n in store.notifications()} == {"firing"}


def test_a_disabled_rules_open_incident_resolves_unannounced(tmp_path: Path) -> None:
    store, stage = _stage(tmp_path)
    door = Stamper(gateway="gw-1", device="door-1")
    _send(store, stage, door, T, "status", {"state": "ok", "battery_pct": 5})
    store.set_rule_control("battery-low", kind="disabled", until_ms=None, by="ana",
                           reason="firmware", at_ms=T)
    stage.tick(T + CONTROLS_REFRESH_MS)
    _send(store, stage, door, T + CONTROLS_REFRESH_MS + 1, "status",
          {"state": "ok", "battery_pct": 90})
    assert [i.state for i in store.incidents()] == ["resolved"]
    assert [n.kind for n in store.notifications()] == ["firing"]  # the firing, before


def test_a_care_alarm_is_announced_whatever_the_store_says(tmp_path: Path) -> None:
    """A row written behind careflow's back (the CLI refuses it) quiets no care alarm."""
    store, stage = _stage(tmp_path)
    store.set_rule_control("care-alarm", kind="disabled", until_ms=None, by="x", reason="x",
                           at_ms=T)
    stage.tick(T)
    _send(store, stage, Stamper(gateway="gw-1", device="sos-1"), T + 1, "alert",
          {"state": "raised", "kind": "sos"})
    store.set_rule_control("care-alarm", kind="muted", until_ms=T + 10**9, by="x", reason="x",
                           at_ms=T)
    stage.tick(T + CONTROLS_REFRESH_MS)
    _send(store, stage, Stamper(gateway="gw-1", device="sos-2"), T + CONTROLS_REFRESH_MS + 1,
          "alert", {"state": "raised", "kind": "sos"})
    assert sorted(i.device for i in store.incidents()) == ["sos-1", "sos-2"]
    assert sorted(n.channel for n in store.notifications() if n.kind == "firing") == [
        "oncall", "oncall"]
    assert stage.muted == 0


def test_a_mute_that_ended_while_the_hub_was_down_is_announced_at_its_start_once(
        tmp_path: Path) -> None:
    store, stage = _stage(tmp_path)
    store.set_rule_control("battery-low", kind="muted", until_ms=T + 60_000, by="ana",
                           reason="x", at_ms=T)
    stage.tick(T)
    _send(store, stage, Stamper(gateway="gw-1", device="door-1"), T + 1, "status",
          {"state": "ok", "battery_pct": 5})
    del stage  # the hub stops while muted...
    store, restarted = _stage(tmp_path)
    restarted.tick(T + 120_000)  # ...and starts after the mute ended
    assert [n.kind for n in store.notifications()] == ["digest"]
    store, again = _stage(tmp_path)
    again.tick(T + 180_000)  # announced already: not at every start
    assert len(store.notifications()) == 1


class RefusingStore(SqliteStore):
    """A real store whose incident reads fail a given number of times (disk I/O, locked)."""

    refusals = 0

    def incidents(self, *, states: Sequence[str] | None = None,
                  limit: int = 50) -> list[Incident]:
        if self.refusals:
            self.refusals -= 1
            msg = "cannot read the incidents in the event store: database is locked"
            raise StoreError(msg)
        return super().incidents(states=states, limit=limit)


def test_a_rule_enabled_while_the_store_refuses_a_read_fires_again_once_it_reads(
        tmp_path: Path) -> None:
    """The store refusing the read that enabling a rule needs only delays it: what still
    holds fires, and nothing of it is forgotten (lost alerts until the source cleared)."""
    (tmp_path / "r.yaml").write_text(RULES)
    store = RefusingStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    store.set_rule_control("battery-low", kind="disabled", until_ms=None, by="ana",
                           reason="firmware", at_ms=T)
    stage.tick(T)
    _send(store, stage, Stamper(gateway="gw-1", device="door-1"), T + 1, "status",
          {"state": "ok", "battery_pct": 5})
    assert store.incidents() == []
    store.clear_rule_control("battery-low")
    store.refusals = 1
    with contextlib.suppress(StoreError):  # as the hub's writer loop does (_run_stage)
        stage.tick(T + CONTROLS_REFRESH_MS)  # enabled, but the store refuses: judged again
    assert store.refusals == 0
    stage.tick(T + CONTROLS_REFRESH_MS + 250)
    stage.tick(T + CONTROLS_REFRESH_MS + 500)
    assert [(i.rule, i.device) for i in store.incidents()] == [("battery-low", "door-1")]
    assert [n.kind for n in store.notifications()] == ["firing"]


def test_a_damaged_incident_the_end_of_a_mute_cannot_read_holds_back_no_escalation(
        tmp_path: Path) -> None:
    """Announcing a rule no longer muted reads its open incidents; a damaged row there (a
    severity this version does not know) failed it at every tick before the escalation walk,
    so no care alarm escalated any more. The walk goes on; the failure is still raised (the
    hub counts and logs it)."""
    (tmp_path / "r.yaml").write_text(RULES + """
escalation:
  - severity: critical
    steps:
      - after: 5m
        channels: [oncall]
""")
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    store.set_rule_control("battery-low", kind="muted", until_ms=T + 60_000, by="ana",
                           reason="cells swapped", at_ms=T)
    stage.tick(T)
    _send(store, stage, Stamper(gateway="gw-1", device="door-1"), T + 1, "status",
          {"state": "ok", "battery_pct": 5})
    _send(store, stage, Stamper(gateway="gw-1", device="sos-1"), T + 2, "alert",
          {"state": "raised", "kind": "sos"})
    with sqlite3.connect(tmp_path / "db") as conn:  # damaged (or written by a newer version)
        conn.execute("UPDATE incidents SET severity = 'urgent', next_due_ms = NULL "
                     "WHERE rule = 'battery-low'")
    conn.close()
    with pytest.raises(ValueError, match="urgent"):
        stage.tick(T + 60_000)  # the mute ends: its open incidents cannot be read
    with pytest.raises(ValueError, match="urgent"):
        stage.tick(T + 2 + 5 * 60_000)  # the care alarm's escalation is due
    alarm = store.unresolved_incident(rule="care-alarm", gateway="gw-1", device="sos-1")
    assert alarm is not None and alarm.escalation_sent == 1
    assert [n.channel for n in store.notifications() if n.kind == "escalation"] == ["oncall"]
