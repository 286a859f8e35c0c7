"""A database written by careflow 0.1.0 (commit 2001265), opened by this careflow.

``data/careflow-0.1.0.sql`` is the dump of one, made by that release's ``careflow hub`` on its
embedded broker with channels that refuse (port 9): a gateway with a door sensor on a low battery
and an SOS button that raised a care alarm (its incident and notification, queued after failed
attempts), the hub's own notifications-failing incident, a silence, a second gateway paused;
then the hub was stopped. An installation upgraded in place starts from such a database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from careflow.hub.alerting.incidents import AlertStage, default_rules
from careflow.hub.alerting.notify import load_channels
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.store.sqlite_store._schema import SCHEMA_VERSION
from tests.conftest import UNREACHABLE_CHANNELS

RELEASE_0_1_0 = Path(__file__).parent / "data" / "careflow-0.1.0.sql"


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    """careflow.db as careflow 0.1.0 left it."""
    db = tmp_path / "careflow.db"
    conn = sqlite3.connect(db)
    conn.executescript(RELEASE_0_1_0.read_text())
    conn.close()
    return db


def _dump(db: Path) -> dict[str, Any]:
    """Every row of every table, and the layout (CREATE statements) of the given tables."""
    conn = sqlite3.connect(db)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {"rows": {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                         for t in tables},
                "layout": {name: " ".join((sql or "").split()) for name, sql in conn.execute(
                    "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}}
    finally:
        conn.close()


def test_it_upgrades_a_database_of_release_0_1_0_in_place_and_keeps_every_row(
        old_db: Path, tmp_path: Path) -> None:
    before = _dump(old_db)
    assert before["rows"]["meta"] == [("schema_version", "1")]
    SqliteStore(old_db).close()
    after = _dump(old_db)
    assert after["rows"].pop("meta") == [("schema_version", str(SCHEMA_VERSION))]
    before["rows"].pop("meta")
    added = {"incident_actions", "spent_links", "users", "web_sessions",  # versions 3 and 4
             "proposals", "audit_log", "automation", "rule_controls"}  # (empty)
    assert {name: after["rows"].pop(name) for name in added} == {name: [] for name in added}
    assert after["rows"] == before["rows"]  # events, incidents, notifications, silences, cursors
    SqliteStore(tmp_path / "new.db").close()
    new = _dump(tmp_path / "new.db")["layout"]
    assert {name: after["layout"][name] for name in new} == new  # as if made by this careflow


def test_it_announces_no_alarm_of_release_0_1_0_again(old_db: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The upgraded hub resumes where 0.1.0 stopped: the care alarm stays one open incident,
    its queued notification waits to be retried, and nothing new is queued."""
    monkeypatch.delenv("CAREFLOW_RULES_DIR", raising=False)
    store = SqliteStore(old_db)
    incidents = [(i.id, i.rule, i.state, i.raises) for i in store.incidents()]
    queued = [(n.id, n.incident_id, n.channel, n.state, n.attempts) for n in store.notifications()]
    assert ("care-alarm", "open") in {(rule, state) for _, rule, state, _ in incidents}
    (stopped_ms,) = sqlite3.connect(old_db).execute("SELECT max(received_ms) FROM events").fetchone()
    stage = AlertStage(store, default_rules(), load_channels(UNREACHABLE_CHANNELS))
    for second in range(1, 6):
        stage.tick(stopped_ms + 1000 * second)
    assert [(i.id, i.rule, i.state, i.raises) for i in store.incidents()] == incidents
    assert [(n.id, n.incident_id, n.channel, n.state, n.attempts)
            for n in store.notifications()] == queued
    store.close()
