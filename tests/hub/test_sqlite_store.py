"""The SQLite store against a real SQLite file: exactly-once, registry, dead letters, replay."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.errors import StoreError
from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.ingest.decode import Accepted, EventHead, PresenceUpdate, Rejected, decode_message
from careflow.hub.replay import replay
from careflow.hub.store.audit_chain import first_broken
from careflow.hub.store.interface import (
    CONFLICTS_CURSOR,
    MAX_DEAD_LETTER_PAYLOAD,
    OVER_BOUND_CURSOR,
)
from careflow.hub.store.records import EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.store.sqlite_store._schema import SCHEMA_VERSION
from tests.conftest import heartbeat
from tests.hub.conftest import batch_of

LIMIT = 256 * 1024


def test_it_stores_each_event_once_and_skips_faithful_retries(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    source = Stamper(gateway="gw-1", device="s-1", boot="b1")
    events = [heartbeat(source) for _ in range(5)]
    first = store.append(batch_of(events))
    restamped = [{**e, "id": new_event_id()} for e in events[:3]]
    again = store.append(batch_of(events + restamped))
    assert len(first.stored) == 5
    assert (len(again.stored), again.duplicates, again.conflicts) == (0, 8, 0)
    assert store.count(EventFilter()) == 5


def test_it_dead_letters_a_different_event_at_a_known_position(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    event = heartbeat(Stamper(gateway="gw-1", boot="b1"))
    store.append(batch_of([event]))
    impostor = {**event, "id": new_event_id(), "data": {"interval_s": 5}}
    result = store.append(batch_of([impostor]))
    assert (len(result.stored), result.conflicts, result.dead_lettered) == (0, 1, 1)
    (letter,) = store.dead_letters()
    assert letter.code == "conflict"
    assert json.loads(letter.payload)["id"] == impostor["id"]


def test_it_keeps_rejections_with_topic_reason_and_payload(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    decoded = decode_message("careflow/v1/gw-1/gw-1/status", b"\x00garbage", max_bytes=LIMIT)
    store.append(IncomingBatch([], [(r, 5) for r in decoded.rejected]))
    (letter,) = store.dead_letters()
    assert (letter.topic, letter.code, letter.payload, letter.received_ms) == (
        "careflow/v1/gw-1/gw-1/status", "not_json", b"\x00garbage", 5)
    assert store.dead_letter_count() == 1


def test_it_truncates_huge_dead_letters_but_records_their_size(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    huge = b"x" * 500_000
    decoded = decode_message("careflow/v1/gw-1/batch", huge, max_bytes=LIMIT)
    store.append(IncomingBatch([], [(r, 5) for r in decoded.rejected]))
    (letter,) = store.dead_letters()
    assert letter.code == "oversized"
    assert letter.payload_size == 500_000 and len(letter.payload) == 64 * 1024


def test_it_tracks_registry_facts_newest_by_event_time(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    source = Stamper(gateway="gw-1", device="door-1", boot="b1")
    t0 = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)
    newer = source.stamp("status", {"state": "ok", "battery_pct": 40, "firmware": "2.0"},
                         at=t0 + timedelta(minutes=5))
    older = source.stamp("status", {"state": "fault", "battery_pct": 90}, at=t0)
    store.append(batch_of([newer]))
    store.append(batch_of([older]))  # replayed late from the gateway's buffer
    record = store.device("gw-1", "door-1")
    assert record is not None
    assert record.facts == {"battery_pct": 40, "firmware": "2.0", "condition": "ok"}
    assert record.events == 2 and record.seq == 1  # seq 1 is the newer event's


def test_it_keeps_facts_that_later_commits_do_not_carry(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    gateway = Stamper(gateway="gw-1", boot="b1")
    sensor = Stamper(gateway="gw-1", device="door-1", boot="b1")
    store.append(batch_of([gateway.stamp("status", {"state": "ok", "battery_pct": 40}),
                           heartbeat(sensor, firmware="1.0")]))
    store.append(batch_of([heartbeat(gateway), heartbeat(sensor, battery_pct=70)]))
    # null is not "unknown" in the contract, it breaks it: the event is refused, facts stay
    refused = batch_of([heartbeat(gateway, battery_pct=None)])
    assert not refused.accepted
    assert "data.battery_pct" in refused.rejected[0][0].reason
    store.append(refused)
    assert store.device("gw-1", "gw-1").facts == {  # type: ignore[union-attr]
        "condition": "ok", "battery_pct": 40, "interval_s": 60}
    assert store.device("gw-1", "door-1").facts == {  # type: ignore[union-attr]
        "interval_s": 60, "firmware": "1.0", "battery_pct": 70}


def test_it_counts_sequence_gaps_and_fills_them_when_late_events_arrive(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    source = Stamper(gateway="gw-1", boot="b1")
    events = [heartbeat(source) for _ in range(10)]
    store.append(batch_of(events[:3] + events[6:]))
    assert store.total_gaps() == 3
    store.append(batch_of(events[3:6]))
    assert store.total_gaps() == 0
    assert store.device("gw-1", "gw-1").gaps == 0  # type: ignore[union-attr]


def test_it_rebuilds_the_registry_from_the_log(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    sources = [Stamper(gateway="gw-1", device=f"s{i}", boot="b") for i in range(3)]
    events = [heartbeat(sources[i % 3], battery_pct=i) for i in range(30)]
    store.append(batch_of(events))
    before = store.devices()
    report = replay(store, EventFilter(), ["registry"])
    assert report.events == 30
    assert store.devices() == before


def test_it_filters_queries(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    store.append(batch_of([heartbeat(Stamper(gateway="gw-1", device="a", boot="b")),
                           heartbeat(Stamper(gateway="gw-2", device="a", boot="b"))]))
    assert store.count(EventFilter(gateway="gw-2")) == 1
    assert store.count(EventFilter(type="status")) == 0
    (ev,) = store.query(EventFilter(gateway="gw-1"))
    assert ev.envelope["gateway"] == "gw-1" and ev.boot == "b" and ev.seq == 1


deliveries = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 8), st.booleans()),  # device, seq, re-stamp?
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=deliveries, split=st.integers(1, 10))
def test_it_stores_every_distinct_event_exactly_once(tmp_path: Path, deliveries: list[Any],
                                                      split: int) -> None:
    """However events repeat, reorder, get re-stamped or split into batches: once each."""
    originals: dict[tuple[int, int], dict[str, Any]] = {}
    stream = []
    for device, seq, restamp in deliveries:
        key = (device, seq)
        if key not in originals:
            originals[key] = Stamper(gateway="gw", device=f"d{device}", boot="b",
                                     next_seq=seq).stamp("heartbeat", {"interval_s": 60})
        event = originals[key]
        stream.append({**event, "id": new_event_id()} if restamp else event)
    db = tmp_path / f"prop-{len(list(tmp_path.iterdir()))}.db"
    store = SqliteStore(db, synchronous="normal")
    for start in range(0, len(stream), split):
        store.append(batch_of(stream[start:start + split]))
    assert store.count(EventFilter()) == len(originals)
    stored_keys = {(ev.device, ev.seq) for ev in store.query(EventFilter())}
    assert stored_keys == {(f"d{d}", s) for d, s in originals}
    assert store.dead_letter_count() == 0
    store.close()


def test_it_dry_runs_the_rules_over_the_log_without_touching_incidents(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    fall = Stamper(gateway="gw-1", device="fall-1", boot="b")
    door = Stamper(gateway="gw-1", device="door-1", boot="b")
    store.append(batch_of([fall.stamp("alert", {"kind": "fall", "state": "raised"}),
                           door.stamp("status", {"state": "ok", "battery_pct": 50})]))
    report = replay(store, EventFilter(gateway="gw-1"), [])
    assert report.stages == ("rules",)  # the registry needs the whole log, so it is skipped
    assert any("firing" in line and "care-alarm" in line and "gw-1/fall-1" in line
               for line in report.notes)
    assert store.incidents() == []


def test_it_adds_fact_columns_to_a_database_made_before_them(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "old.db")
    store._conn.execute("ALTER TABLE devices DROP COLUMN labels")
    store._conn.execute("ALTER TABLE devices DROP COLUMN labels_ms")
    store.close()
    reopened = SqliteStore(tmp_path / "old.db")
    columns = {row[1] for row in reopened._conn.execute("PRAGMA table_info(devices)")}
    reopened.close()
    assert {"labels", "labels_ms"} <= columns


def test_it_adds_the_conflict_log_column_to_a_database_made_before_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "old.db")
    store._conn.execute("DROP INDEX dead_letters_placed")  # made with the column, after it
    store._conn.execute("ALTER TABLE dead_letters DROP COLUMN log_pos")
    store._conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store.close()
    reopened = SqliteStore(tmp_path / "old.db")
    source = Stamper(gateway="gw-1", device="s-1", boot="b1")
    first = reopened.append(batch_of([heartbeat(source)]))
    again = Stamper(gateway="gw-1", device="s-1", boot="b1")  # seq 1 again, other content
    assert reopened.append(batch_of([heartbeat(again, battery_pct=3)])).conflicts == 1
    (letter,) = reopened.dead_letters_after(0, code="conflict")
    reopened.close()
    assert letter.log_pos == first.stored[-1].pos  # placed after the commit it came with


def _legacy_deep_event(levels: int) -> tuple[dict[str, Any], Any]:
    """A heartbeat whose data nests ``levels`` deep, as a hub before the depth limit stored it
    (built without recursion: json.dumps could not write it)."""
    event = heartbeat(Stamper(gateway="gw-1", device="s-1", boot="b1"))
    deep: Any = 1
    for _ in range(levels - 1):
        deep = {"a": deep}
    text = '{"a":' * (levels - 1) + "1" + "}" * (levels - 1)
    body = json.dumps({**event, "data": "__DATA__"}).replace(
        '"__DATA__"', '{"interval_s": 60, "x": ' + text + "}")
    return {**event, "body": body}, {"interval_s": 60, "x": deep}


@pytest.mark.parametrize("levels", [990, 3000])
def test_it_judges_repeats_of_a_stored_copy_too_deep_to_read_back_without_recursing(
        tmp_path: Path, levels: int) -> None:
    store = SqliteStore(tmp_path / "db")
    event, data = _legacy_deep_event(levels)
    head = EventHead(event["id"], "gw-1", "s-1", "heartbeat", event["time"], "b1", 1)
    legacy = Accepted(head, event["body"], "careflow/v1/gw-1/s-1/heartbeat", data, 1_000)
    store.append(IncomingBatch([(legacy, 1_000)], []))
    same = store.append(IncomingBatch([(legacy, 2_000)], []))  # the same text: a repeat
    impostor = {k: v for k, v in event.items() if k != "body"} | {"id": new_event_id()}
    other = store.append(batch_of([impostor]))  # same position, readable content
    assert (same.duplicates, same.conflicts) == (1, 0)
    assert (other.duplicates, other.conflicts) == (0, 1)
    (letter,) = store.dead_letters()
    assert letter.code == "conflict" and "cannot be read back" in letter.reason


def _presence(gateway: str, state: str, conn: int, boot: str, at_ms: int) -> IncomingBatch:
    return IncomingBatch([], [], [(PresenceUpdate(gateway, state, conn, boot, None), at_ms)])


def test_it_takes_a_reflashed_gateway_back_online_and_ignores_its_old_boots_late_will(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    store.append(_presence("gw-1", "online", 57, "boot-a", 1))
    store.append(_presence("gw-1", "offline", 57, "boot-a", 2))   # its Will
    store.append(_presence("gw-1", "online", 1, "boot-b", 3))     # reflashed: counts from 1
    assert (store.presence()["gw-1"].state, store.presence()["gw-1"].conn) == ("online", 1)
    store.append(_presence("gw-1", "offline", 57, "boot-a", 4))   # boot-a's Will, replayed late
    store.append(_presence("gw-1", "online", 2, "boot-b", 5))
    store.append(_presence("gw-2", "online", 9, "boot-x", 1))     # reflashed before its Will
    store.append(_presence("gw-2", "online", 1, "boot-y", 2))
    store.append(_presence("gw-2", "offline", 9, "boot-x", 3))    # the Will arrives after
    assert {g: (p.state, p.conn, p.boot) for g, p in store.presence().items()} == {
        "gw-1": ("online", 2, "boot-b"), "gw-2": ("online", 1, "boot-y")}
    assert [(c.gateway, c.state, c.conn) for c in store.presence_changes()] == [
        ("gw-1", "online", 57), ("gw-1", "offline", 57), ("gw-1", "online", 1),
        ("gw-1", "online", 2), ("gw-2", "online", 9), ("gw-2", "online", 1)]


def _junk(count: int, size: int = 10, code: str = "not_json") -> IncomingBatch:
    return IncomingBatch([], [(Rejected("careflow/v1/gw-1/s/heartbeat", code, "why",
                                        b"%08d" % i + b"x" * size), 1_000)
                              for i in range(count)])


def test_it_keeps_the_newest_dead_letters_within_the_row_bound(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", dead_letter_max_rows=100)
    for _ in range(40):
        store.append(_junk(7))
    assert store.dead_letter_count() == 100
    newest = store.dead_letters(limit=1000)
    assert newest[0].pos == 280 and newest[-1].pos == 181


def test_it_keeps_the_newest_dead_letters_within_the_byte_bound(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", dead_letter_max_bytes=16 * MAX_DEAD_LETTER_PAYLOAD)
    for _ in range(40):  # each refused payload is kept truncated to 64 KiB
        store.append(_junk(1, size=200_000))
    assert store.dead_letter_count() == 16
    assert {letter.payload_size for letter in store.dead_letters()} == {200_008}


def test_it_never_prunes_conflicts_the_alert_rules_have_yet_to_see(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", dead_letter_max_rows=10)
    store.set_cursor(CONFLICTS_CURSOR, 0)  # the alert stage has evaluated nothing yet
    store.append(_junk(5, code="conflict"))
    store.append(_junk(20))
    assert len(store.dead_letters(limit=100, code="conflict")) == 5
    store.set_cursor(CONFLICTS_CURSOR, 5)  # now it has
    store.append(_junk(1))
    assert store.dead_letters(limit=100, code="conflict") == []
    assert store.dead_letter_count() == 10


def test_it_records_a_retained_message_already_dead_lettered_only_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    store.append(_junk(3))  # as first received, live
    again = [(replace(r, retained=True), t) for r, t in _junk(3).rejected]
    for _ in range(3):  # delivered again at every subscribe of the hub
        assert store.append(IncomingBatch([], again)).dead_lettered == 0
    assert store.dead_letter_count() == 3
    new = replace(_junk(4).rejected[3][0], retained=True)
    assert store.append(IncomingBatch([], [(new, 1)])).dead_lettered == 1


def test_it_never_prunes_refused_care_alarms_the_hub_has_yet_to_announce(tmp_path: Path) -> None:
    """A care alarm refused beyond the device bound is announced from its dead letter; other
    refusals of invented devices are pruned as any dead letter is (a flood stays bounded)."""
    store = SqliteStore(tmp_path / "db", dead_letter_max_rows=10, max_devices_per_gateway=0)
    store.set_cursor(OVER_BOUND_CURSOR, 0)  # the hub has announced nothing yet
    store.append(batch_of([Stamper(gateway="gw", device=f"sos-{n}").stamp(
        "alert", {"kind": "sos", "state": "raised"}) for n in range(5)]))
    store.append(batch_of([heartbeat(Stamper(gateway="gw", device=f"x{n}")) for n in range(30)]))
    kept = store.dead_letters(limit=100, code="too_many_devices")
    assert sorted(b"sos-" in letter.payload for letter in kept).count(True) == 5
    assert len(kept) < 20
    store.set_cursor(OVER_BOUND_CURSOR, max(letter.pos for letter in kept))  # announced
    store.append(batch_of([heartbeat(Stamper(gateway="gw", device=f"y{n}")) for n in range(30)]))
    assert not [d for d in store.dead_letters(limit=100) if b"sos-" in d.payload]


def _layout(path: Path) -> dict[str, Any]:
    """Every table's columns and every index of a database, as SQLite reports them."""
    conn = sqlite3.connect(path)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {"columns": {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in tables},
                "indexes": conn.execute("SELECT name, tbl_name, sql FROM sqlite_master WHERE "
                                        "type = 'index' ORDER BY name").fetchall(),
                "meta": conn.execute("SELECT key, value FROM meta").fetchall()}
    finally:
        conn.close()


def _as_version_1(path: Path) -> None:
    """Make a database what a careflow from before the schema version left: without the
    columns and indexes added since, at version 1."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        DROP INDEX incidents_due; DROP INDEX dead_letters_placed;
        ALTER TABLE dead_letters DROP COLUMN log_pos;
        ALTER TABLE incidents DROP COLUMN next_due_ms; ALTER TABLE incidents DROP COLUMN follows_id;
        ALTER TABLE incidents DROP COLUMN last_raised_ms;
        ALTER TABLE incidents DROP COLUMN first_raised_ms; ALTER TABLE incidents DROP COLUMN raises;
        UPDATE meta SET value = '1' WHERE key = 'schema_version';
    """)
    conn.close()


def test_it_records_the_schema_version_of_a_new_store(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "new.db").close()
    assert _layout(tmp_path / "new.db")["meta"] == [("schema_version", str(SCHEMA_VERSION))]


def test_it_upgrades_a_version_1_store_to_the_layout_of_a_new_one(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "new.db").close()
    old = SqliteStore(tmp_path / "old.db")
    incident_id = old.open_incident(rule="r", gateway="g", device="d", severity="warning",
                                    summary="s", detail="d", at_ms=5)
    old.close()
    _as_version_1(tmp_path / "old.db")
    upgraded = SqliteStore(tmp_path / "old.db")
    incident = upgraded.incident(incident_id or 0)
    upgraded.close()
    assert _layout(tmp_path / "old.db") == _layout(tmp_path / "new.db")
    assert incident is not None  # filled in as the escalation walk needs it: due at once
    assert (incident.raises, incident.first_raised_ms, incident.next_due_ms) == (1, 5, 5)


def test_it_refuses_a_store_made_by_a_newer_careflow(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "db").close()
    conn = sqlite3.connect(tmp_path / "db")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                 (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this careflow knows"):
        SqliteStore(tmp_path / "db")


def test_it_leaves_a_store_made_by_a_newer_careflow_as_it_found_it(tmp_path: Path) -> None:
    """A later layout may have dropped what this one creates: refusing it must not put back
    this careflow's tables, indexes and fact columns first (an old CLI run by mistake, or a
    rollback, would change the newer hub's database)."""
    SqliteStore(tmp_path / "db").close()
    conn = sqlite3.connect(tmp_path / "db")
    conn.executescript(f"""
        DROP TABLE outbox; DROP INDEX events_by_time; ALTER TABLE devices DROP COLUMN firmware_ms;
        UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version';
    """)
    conn.close()
    before = _layout(tmp_path / "db")
    with pytest.raises(StoreError, match="newer than this careflow knows"):
        SqliteStore(tmp_path / "db")
    assert _layout(tmp_path / "db") == before


def test_a_metrics_scrape_counts_from_indexes_not_by_reading_every_row(tmp_path: Path) -> None:
    """The outbox keeps every notification ever sent and incidents are never deleted: a
    scrape (every 15 s, holding the web's connection, which the one-tap links wait for) must
    not read and sort every row of either table."""
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    conn = store._conn
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.notification_counts()
    store.incident_counts(states=("open", "acknowledged"))
    conn.set_trace_callback(None)
    assert len(statements) == 2
    for sql in statements:  # as run, with the parameters bound
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "COVERING INDEX" in plan and "TEMP B-TREE" not in plan, plan
    store.close()


def test_the_escalation_walk_and_the_senders_read_only_what_is_due(tmp_path: Path) -> None:
    """The 250 ms tick and each channel's sender look up what is due through the indexes
    that order it by due time: an index added for something else (counting) must not
    win them over, or every tick reads and sorts every open incident."""
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    conn = store._conn
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.due_incidents(now_ms=5, limit=1000)
    store.overdue_notifications(due_before_ms=5)
    store.claim_notifications(now_ms=5, limit=50, channel="oncall")
    conn.set_trace_callback(None)
    selects = [sql for sql in statements if sql.startswith("SELECT")]
    assert len(selects) == 3
    due, overdue, claim = (" ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                           for sql in selects)
    assert "USING INDEX incidents_due (next_due_ms<?)" in due and "TEMP B-TREE" not in due, due
    for plan in (overdue, claim):
        assert "USING INDEX notifications_due (state=? AND next_attempt_ms<?)" in plan, plan
    store.close()


def test_an_edited_or_deleted_audit_row_is_found_and_named(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db", synchronous="normal")
    for n in range(1, 6):
        store.append_audit(at_ms=n, actor="ana", event="e", subject=f"s{n}", detail={"n": n})
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE pos = 3")
    broken = first_broken(store.audit_log())
    assert broken is not None and broken[0] is not None and broken[0].pos == 3
    assert "row 3 was edited" in broken[1]
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("UPDATE audit_log SET actor = 'ana' WHERE pos = 3")
        conn.execute("DELETE FROM audit_log WHERE pos = 2")
    broken = first_broken(store.audit_log())
    assert broken is not None and broken[0] is not None and broken[0].pos == 3
    assert "does not follow" in broken[1]
    store.close()
