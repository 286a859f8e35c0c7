"""The alert stage on a real SQLite store: incidents survive a hub restart without duplicates."""

from __future__ import annotations

from pathlib import Path

from careflow.edge.stamper import Stamper
from careflow.hub.alerting import AlertStage
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
