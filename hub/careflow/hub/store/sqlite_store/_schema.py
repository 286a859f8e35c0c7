"""The adapter's tables, the version of their layout, and the steps between versions."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from careflow.hub.fleet.device_registry import FACTS
from careflow.hub.store.records import IncidentState, NotificationState

__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION"]

# the state words, each spelled once in careflow.hub.store.records
_I, _N = IncidentState, NotificationState

# The layout this code reads and writes, kept in meta.schema_version. 1: any database from
# before the version was kept (it may lack columns and indexes added since); 2: that layout
# kept; 3: incident timelines, spent one-tap links, console users and sessions (new tables
# only: the step to it is the schema's CREATE IF NOT EXISTS); 4: the operations agent's
# proposals, audit trail and mode, rule controls, and an index of notifications by incident
# (again new only). A change of layout adds a version and its step to MIGRATIONS.
SCHEMA_VERSION = 4

_FACT_COLUMNS = "".join(f", {name}, {name}_ms" for name in FACTS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    type TEXT NOT NULL,
    time TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (gateway, device, boot, seq)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms);
CREATE TABLE IF NOT EXISTS devices (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    events INTEGER NOT NULL,
    last_time_ms INTEGER NOT NULL,
    last_type TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    skew_ms INTEGER NOT NULL{_FACT_COLUMNS},
    PRIMARY KEY (gateway, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    boot TEXT NOT NULL,
    max_seq INTEGER NOT NULL,
    received INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, device, boot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    pos INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_size INTEGER NOT NULL,
    batch_index INTEGER,
    log_pos INTEGER  -- a conflict, a refused care alarm: the end of the event log after its commit
);
-- the alert stage reads the conflicts after its cursor, however many other refusals there are
CREATE INDEX IF NOT EXISTS dead_letters_by_code ON dead_letters (code, pos);
CREATE INDEX IF NOT EXISTS dead_letters_by_topic ON dead_letters (topic);
CREATE TABLE IF NOT EXISTS presence (
    gateway TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    conn INTEGER NOT NULL,
    boot TEXT NOT NULL,
    changed_ms INTEGER NOT NULL,
    reason TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS presence_log (  -- every accepted change, for charts and uptime
    pos INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    state TEXT NOT NULL,
    conn INTEGER NOT NULL,
    boot TEXT NOT NULL,
    changed_ms INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS presence_log_by_boot ON presence_log (gateway, boot);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (  -- lines for an external sink that are in no other log
    pos INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS maintenance (
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,  -- '*' pauses the whole gateway
    until_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (gateway, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    summary TEXT NOT NULL,
    detail TEXT NOT NULL,
    triggered_ms INTEGER NOT NULL,
    acknowledged_ms INTEGER,
    acknowledged_by TEXT,
    resolved_ms INTEGER,
    resolved_by TEXT,
    escalation_sent INTEGER NOT NULL DEFAULT 0,
    raises INTEGER NOT NULL DEFAULT 1,
    first_raised_ms INTEGER,
    last_raised_ms INTEGER,
    follows_id INTEGER,
    next_due_ms INTEGER  -- when the escalation walk must look at it next (NULL: never)
);
-- at most one unresolved incident per rule and source
CREATE UNIQUE INDEX IF NOT EXISTS incidents_unresolved
    ON incidents (rule, gateway, device) WHERE state != '{_I.RESOLVED}';
-- counts by state (/metrics at every scrape, careflow status) without reading every incident;
-- severity first, so that the escalation walk's `state = 'open'` keeps using incidents_due
CREATE INDEX IF NOT EXISTS incidents_severity_state ON incidents (severity, state);
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{_N.PENDING}',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    group_key TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt_ms);
CREATE INDEX IF NOT EXISTS notifications_group
    ON notifications (channel, group_key, kind, state);
-- /metrics counts per channel and state at every scrape: from this, not every row kept
CREATE INDEX IF NOT EXISTS notifications_channel_state ON notifications (channel, state);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    rule TEXT NOT NULL,
    starts_ms INTEGER NOT NULL,
    ends_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    comment TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_ms INTEGER NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS incident_actions (  -- what people did, for the incident's timeline
    id INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    action TEXT NOT NULL,
    by TEXT NOT NULL,
    via TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incident_actions_incident ON incident_actions (incident_id, id);
CREATE TABLE IF NOT EXISTS spent_links (  -- one-tap links are single use
    link_id TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    channel TEXT NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS notifications_incident ON notifications (incident_id, id);
CREATE TABLE IF NOT EXISTS proposals (  -- the operations agent's proposals and what became of them
    id INTEGER PRIMARY KEY,
    incident_id INTEGER NOT NULL,
    runbook TEXT NOT NULL,
    action TEXT NOT NULL,
    params TEXT NOT NULL,
    why TEXT NOT NULL,
    evidence TEXT NOT NULL,
    dry_run TEXT NOT NULL,
    expected TEXT NOT NULL,
    verify TEXT NOT NULL,
    planner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    decided_by TEXT,
    decided_ms INTEGER,
    reason TEXT,
    executed_ms INTEGER,
    result TEXT,
    verified_ms INTEGER
);
CREATE INDEX IF NOT EXISTS proposals_state ON proposals (state, id);
CREATE INDEX IF NOT EXISTS proposals_incident ON proposals (incident_id, id);
CREATE TABLE IF NOT EXISTS audit_log (  -- append-only, each row chained to the one before
    pos INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS automation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    mode TEXT NOT NULL,
    by TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rule_controls (  -- noisy rules muted or disabled by a person
    rule TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    until_ms INTEGER,
    by TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS web_sessions (  -- by the hash of the cookie, never the cookie
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Columns added to incidents after the first release: (name, declaration, backfill or None).
_INCIDENT_ADDED = (
    ("raises", "INTEGER NOT NULL DEFAULT 1", None),
    ("first_raised_ms", "INTEGER", "triggered_ms"),
    ("last_raised_ms", "INTEGER", "triggered_ms"),
    ("follows_id", "INTEGER", None),
    ("next_due_ms", "INTEGER", "triggered_ms"),  # due at once: the walk computes the real one
)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _to_version_2(conn: sqlite3.Connection) -> None:
    """What was added before the version was kept: conflicts' place in the log, the incident
    columns of raises and escalation (filled in), and the indexes that read them."""
    if "log_pos" not in _columns(conn, "dead_letters"):
        conn.execute("ALTER TABLE dead_letters ADD COLUMN log_pos INTEGER")
    present = _columns(conn, "incidents")
    for name, declaration, backfill in _INCIDENT_ADDED:
        if name not in present:
            conn.execute(f"ALTER TABLE incidents ADD COLUMN {name} {declaration}")
            if backfill is not None:
                conn.execute(f"UPDATE incidents SET {name} = {backfill}")
    conn.execute("CREATE INDEX IF NOT EXISTS incidents_due ON incidents (next_due_ms) "
                 f"WHERE state = '{_I.OPEN}'")
    # the self-check reads refused care alarms after its cursor once a second: without this,
    # every other refusal after the cursor (up to the dead-letter bound) is read each time
    conn.execute("CREATE INDEX IF NOT EXISTS dead_letters_placed ON dead_letters "
                 "(code, pos) WHERE log_pos IS NOT NULL")


def _new_tables_only(conn: sqlite3.Connection) -> None:
    """Versions 3 and 4 only add tables and indexes, which the schema creates at every open."""
    del conn


# version -> the step that brings a database at that version to the next (3 -> 4 adds tables
# and an index only, as 2 -> 3 did)
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_version_2,
                                                                2: _new_tables_only,
                                                                3: _new_tables_only}
