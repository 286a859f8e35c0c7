"""SQLite adapter of the store (:class:`~careflow.hub.store.interface.Store`): WAL, one
transaction per batch.

sqlite3 errors become :class:`StoreError` here. ``synchronous=FULL`` (the default) makes a commit
survive power loss; ``normal`` survives a crash of the process but may lose the last commits on
power loss, and is faster.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from careflow.core.config import (
    DEFAULT_DEAD_LETTER_MAX_MB,
    DEFAULT_DEAD_LETTER_MAX_ROWS,
    DEFAULT_MAX_DEVICES_PER_GATEWAY,
)
from careflow.core.errors import ContractError, RefusedError, StoreError
from careflow.core.sqlite import immediate_transaction, open_wal
from careflow.hub.alerting.mute import Silence
from careflow.hub.fleet.device_registry import (
    FACTS,
    JSON_FACTS,
    DeviceUpdate,
    SourceUpdate,
    beyond_bound,
    summarize,
)
from careflow.hub.fleet.presence import PresenceRecord, supersedes
from careflow.hub.ingest.decode import Accepted, Rejected
from careflow.hub.ingest.dedupe import Candidate, Verdict, judge
from careflow.hub.store.interface import (
    CONFLICTS_CURSOR,
    MAX_DEAD_LETTER_PAYLOAD,
    MAX_GROUP_CLAIM,
    OVER_BOUND_CURSOR,
)
from careflow.hub.store.records import (
    AppendResult,
    DeadLetter,
    DeviceRecord,
    EventFilter,
    Incident,
    IncidentState,
    IncomingBatch,
    Notification,
    NotificationKind,
    NotificationState,
    Outgoing,
    OverBound,
    PresenceChange,
    Severity,
    SourceGap,
    StoredEvent,
)
from careflow.schemas import check_depth

__all__ = ["SqliteStore"]

# The layout this code reads and writes, kept in meta.schema_version. 1: any database from
# before the version was kept (it may lack columns and indexes added since); 2: this layout.
# A change of layout adds a version and its step to _MIGRATIONS.
SCHEMA_VERSION = 2
# The state words, each spelled once (in careflow.hub.store.records): the SQL is built from them.
_I, _N, _K, _S = IncidentState, NotificationState, NotificationKind, Severity
# The dead-letter codes this store gives a meaning to (ingest's vocabulary).
CONFLICT = "conflict"
TOO_MANY_DEVICES = "too_many_devices"

_FACT_COLUMNS = "".join(f", {name}, {name}_ms" for name in FACTS)
_SCHEMA = f"""
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
"""

# Named, not *: a database made before a column existed has its columns in another order.
_INCIDENT_COLUMNS = ("id, rule, gateway, device, severity, state, summary, detail, triggered_ms, "
                     "acknowledged_ms, acknowledged_by, resolved_ms, resolved_by, escalation_sent, "
                     "raises, first_raised_ms, last_raised_ms, follows_id, next_due_ms")
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


# version -> the step that brings a database at that version to the next
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _to_version_2}
_EVENT_COLUMNS = "pos, id, gateway, device, type, time, time_ms, received_ms, boot, seq, body"
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events "
    "(id, gateway, device, type, time, time_ms, received_ms, boot, seq, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (received_ms, topic, code, reason, payload, payload_size, "
    "batch_index, log_pos) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# Newest-wins merge: a fact only replaces the stored one when it is at least as new.
def _fact_merge(names: Sequence[str]) -> str:
    return "".join(
        f", {n} = CASE WHEN excluded.{n}_ms >= COALESCE({n}_ms, -9e18) THEN excluded.{n} "
        f"ELSE {n} END, {n}_ms = MAX(COALESCE({n}_ms, -9e18), excluded.{n}_ms)"
        for n in names)
_UPSERT_DEVICE = """
INSERT INTO devices (gateway, device, first_seen_ms, last_seen_ms, events, last_time_ms, last_type,
    boot, seq, skew_ms{columns})
VALUES ({values})
ON CONFLICT (gateway, device) DO UPDATE SET
    first_seen_ms = MIN(first_seen_ms, excluded.first_seen_ms),
    last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms),
    events = events + excluded.events,
    last_type = CASE WHEN (excluded.last_time_ms, excluded.seq) >= (last_time_ms, seq)
        THEN excluded.last_type ELSE last_type END,
    boot = CASE WHEN (excluded.last_time_ms, excluded.seq) >= (last_time_ms, seq)
        THEN excluded.boot ELSE boot END,
    skew_ms = CASE WHEN (excluded.last_time_ms, excluded.seq) >= (last_time_ms, seq)
        THEN excluded.skew_ms ELSE skew_ms END,
    seq = CASE WHEN (excluded.last_time_ms, excluded.seq) >= (last_time_ms, seq)
        THEN excluded.seq ELSE seq END,
    last_time_ms = MAX(last_time_ms, excluded.last_time_ms){merge}
"""


@functools.cache
def _upsert_device(names: tuple[str, ...]) -> str:
    """The device UPSERT for rows that carry these facts (and leave the others alone)."""
    return _UPSERT_DEVICE.format(columns="".join(f", {n}, {n}_ms" for n in names),
                                 values=", ".join("?" * (10 + 2 * len(names))),
                                 merge=_fact_merge(names))


_UPSERT_SOURCE = """
INSERT INTO sources (gateway, device, boot, max_seq, received, first_seen_ms)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (gateway, device, boot) DO UPDATE SET
    max_seq = MAX(max_seq, excluded.max_seq),
    received = received + excluded.received,
    first_seen_ms = MIN(first_seen_ms, excluded.first_seen_ms)
"""
_GAP_QUERY_CHUNK = 2000  # sources per gap query (3 bound values each, well under SQLite's limit)
# Registry rows with their sequence gaps, in one query rather than one query per device.
_DEVICES_WITH_GAPS = (
    "SELECT d.*, COALESCE(g.gaps, 0) FROM devices AS d LEFT JOIN ("
    "SELECT gateway, device, SUM(max_seq - received) AS gaps FROM sources "
    "GROUP BY gateway, device) AS g ON g.gateway = d.gateway AND g.device = d.device"
)


@contextlib.contextmanager
def _joined(conn: sqlite3.Connection, failure: str) -> Iterator[sqlite3.Connection]:
    """A write inside a transaction someone else opened: errors translated, no commit (the
    owner of the transaction rolls it all back)."""
    try:
        yield conn
    except sqlite3.Error as exc:
        msg = f"{failure}: {exc}"
        raise StoreError(msg) from exc


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _where(flt: EventFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("gateway", flt.gateway), ("device", flt.device), ("type", flt.type)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if flt.since_ms is not None:
        clauses.append("time_ms >= ?")
        params.append(flt.since_ms)
    if flt.until_ms is not None:
        clauses.append("time_ms < ?")
        params.append(flt.until_ms)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _stored(row: sqlite3.Row | tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(*row)


def _incident(row: Sequence[Any]) -> Incident:
    """An incident from its row (columns as ``_INCIDENT_COLUMNS``), its words as enums."""
    return Incident(row[0], row[1], row[2], row[3], _S(row[4]), _I(row[5]), *row[6:])


def _notification(row: Sequence[Any]) -> Notification:
    """A notification from its row (every column, in table order), its words as enums."""
    return Notification(row[0], row[1], row[2], _K(row[3]), row[4], row[5], _N(row[6]),
                        *row[7:])


def _candidate(event_id: str, key: tuple[str, str, str, int], type_: str, time_text: str,
               data: Mapping[str, Any]) -> Candidate:
    return Candidate(event_id, key, type_, time_text, data)


def _stored_candidate(row: StoredEvent) -> Candidate:
    """A stored event for judging; ContractError if it nests deeper than the contract allows
    (stored by an older hub), so reading it back never recurses without bound."""
    check_depth(row.body)
    return _candidate(row.id, (row.gateway, row.device, row.boot, row.seq), row.type, row.time,
                      row.data)


def _event_row(accepted: Accepted, received_ms: int) -> tuple[Any, ...]:
    ev = accepted.event
    return (ev.id, ev.gateway, ev.device, ev.type, ev.time, accepted.time_ms, received_ms, ev.boot,
            int(ev.seq), accepted.body)


_KEPT_WHOLE = frozenset({CONFLICT, "internal_error"})


def _dead_letter_row(rejected: Rejected, received_ms: int,
                     log_pos: int | None = None) -> tuple[Any, ...]:
    # A conflict is a valid event (bounded by the message limit, like any stored one) that the
    # alert stage reads back from here: kept whole. So is a message the hub failed on (a bug):
    # it may be a valid batch of up to the message limit, acknowledged, whose only copy this is.
    # Other refusals keep their first 64 KiB.
    payload = rejected.payload if rejected.code in _KEPT_WHOLE else \
        rejected.payload[:MAX_DEAD_LETTER_PAYLOAD]
    return (received_ms, rejected.topic, rejected.code, rejected.reason, payload,
            len(rejected.payload), rejected.index, log_pos)


class SqliteStore:
    """The event store on one SQLite file (WAL mode, so readers never block the writer)."""

    def __init__(self, path: Path, *, synchronous: str = "full",
                 max_devices_per_gateway: int = DEFAULT_MAX_DEVICES_PER_GATEWAY,
                 dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS,
                 dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_MAX_MB << 20) -> None:
        """Open (or create) the store. Dead-letter retention: the newest rows are kept within
        both bounds (CAREFLOW_DEAD_LETTER_MAX_ROWS / _MB)."""
        self.path = path
        self._dead_letter_bounds = (dead_letter_max_rows, dead_letter_max_bytes)
        # Pruning scans the table, so it runs after every 1% of either bound (and at the first
        # dead letter after opening, so that lowered bounds apply at once), never per message.
        self._prune_every = (max(1, min(1000, dead_letter_max_rows // 100)),
                             max(MAX_DEAD_LETTER_PAYLOAD, dead_letter_max_bytes // 100))
        self._dead_since_prune = self._prune_every
        self._atomic = False  # inside atomically()
        # A gateway that invents devices must not grow the registry and the rules' state
        # without end: beyond this many, a new device's events are dead-lettered.
        self.max_devices_per_gateway = max_devices_per_gateway
        self._registered: set[tuple[str, str]] = set()  # (gateway, device) known registered
        try:
            self._conn = open_wal(path, synchronous=synchronous, schema=_SCHEMA)
            self._add_fact_columns()  # at every open: the facts follow the contract
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            msg = (f"cannot open the event store at {path}: {exc}. Check that the directory is "
                   "writable (set CAREFLOW_DATA_DIR or --data-dir to choose another).")
            raise StoreError(msg) from exc

    def _add_fact_columns(self) -> None:
        """A database made before a fact existed gains its columns (facts only ever grow)."""
        known = {row[1] for row in self._conn.execute("PRAGMA table_info(devices)")}
        for name in FACTS:
            for column in (name, f"{name}_ms"):
                if column not in known:
                    self._conn.execute(f"ALTER TABLE devices ADD COLUMN {column}")

    def _migrate(self) -> None:
        """Bring a database made by an earlier careflow up to :data:`SCHEMA_VERSION`, one step
        per version, in one transaction; refuse one made by a later careflow (its layout may
        mean what this code does not know)."""
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            msg = (f"the event store at {self.path} has schema version {version}, newer than this "
                   f"careflow knows ({SCHEMA_VERSION}): upgrade careflow, or point "
                   "CAREFLOW_DATA_DIR / --data-dir at another directory")
            raise StoreError(msg)
        if version == SCHEMA_VERSION:
            return
        with immediate_transaction(self._conn, "upgrade the event store's schema") as conn:
            # read again inside the lock: the hub and a CLI command may both be upgrading
            for step in range(self._schema_version(), SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def _schema_version(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 1  # new, or made before the version was written

    # -- writing ----------------------------------------------------------------------------

    def _transaction(self, action: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        failure = f"cannot {action} in the event store at {self.path}"
        if self._atomic:  # inside atomically(): join its transaction, commit nothing yet
            return _joined(self._conn, failure)
        return immediate_transaction(self._conn, failure)

    @contextlib.contextmanager
    def atomically(self, action: str) -> Iterator[None]:
        """Every write inside commits together (one transaction, one fsync), or none does.

        The alert stage records incident changes, their notifications and its cursor this way,
        so a crash or a refused write never leaves one without the others. One thread only.
        """
        if self._atomic:
            yield
            return
        with self._transaction(action):
            self._atomic = True
            try:
                yield
            finally:
                self._atomic = False

    def append(self, batch: IncomingBatch) -> AppendResult:
        """Commit events, dead letters and registry updates in one transaction."""
        with self._transaction("write"):
            return self._append(batch)

    def _append(self, batch: IncomingBatch) -> AppendResult:
        batch, over_bound = self._within_bound(batch)
        conn = self._conn
        rows = [_event_row(accepted, received_ms) for accepted, received_ms in batch.accepted]
        stored = self._insert_all_fresh(batch, rows)
        # care alarms refused beyond the device bound (the last of the refusals) are placed in
        # the log as conflicts are: the alert stage announces them from there
        alarms = [False] * (len(batch.rejected) - len(over_bound)) + \
            [item.alarm for item in over_bound]
        alarm_pos = int(conn.execute("SELECT COALESCE(MAX(pos), 0) FROM events").fetchone()[0]) \
            if any(alarms) else None
        dead = [_dead_letter_row(r, received, alarm_pos if alarm else None)
                for (r, received), alarm in zip(batch.rejected, alarms, strict=True)
                if not (r.retained and self._already_dead_lettered(r))]
        duplicates = conflicts = 0
        conflicted: list[tuple[Rejected, int]] = []
        if stored is None:  # some are repeats: insert one by one and judge the rest
            stored = []
            for (accepted, received_ms), row in zip(batch.accepted, rows, strict=True):
                cursor = conn.execute(_INSERT_EVENT, row)
                if cursor.rowcount == 1:
                    assert cursor.lastrowid is not None
                    stored.append((StoredEvent(cursor.lastrowid, *row), accepted.data))
                    continue
                verdict, reason = self._judge(accepted)
                if verdict is Verdict.DUPLICATE:
                    duplicates += 1
                else:
                    conflicts += 1
                    conflicted.append((Rejected(accepted.topic, CONFLICT, reason,
                                                accepted.body.encode()), received_ms))
        if conflicted:  # placed after this commit's events, where the alert stage reads them
            end = int(conn.execute("SELECT COALESCE(MAX(pos), 0) FROM events").fetchone()[0])
            dead += [_dead_letter_row(item, at_ms, end) for item, at_ms in conflicted]
        if dead:
            conn.executemany(_INSERT_DEAD_LETTER, dead)
            rows_since, bytes_since = self._dead_since_prune
            self._dead_since_prune = (rows_since + len(dead),
                                      bytes_since + sum(len(row[4]) for row in dead))
            if any(map(operator.ge, self._dead_since_prune, self._prune_every)):
                self._prune_dead_letters()
        gaps = self._fold(stored)
        self._apply_presence(batch)
        return AppendResult(tuple(ev for ev, _ in stored), duplicates, conflicts, len(dead), gaps,
                            tuple(data for _, data in stored), over_bound)

    def _within_bound(self, batch: IncomingBatch) -> tuple[IncomingBatch, tuple[OverBound, ...]]:
        """The batch without the events of devices beyond their gateway's bound (those become
        ``too_many_devices`` dead letters), and what was refused."""
        registered = self._registered
        new: dict[str, dict[str, None]] = {}  # gateway -> devices not known registered, in order
        for accepted, _ in batch.accepted:
            event = accepted.event
            if event.device != event.gateway and (event.gateway, event.device) not in registered:
                new.setdefault(event.gateway, {})[event.device] = None
        if not new:
            return batch, ()
        counts: dict[str, int] = {}
        for gateway in new:
            rows = self._conn.execute("SELECT device FROM devices WHERE gateway = ? AND "
                                      "device != gateway", (gateway,)).fetchall()
            registered.update((gateway, row[0]) for row in rows)
            counts[gateway] = len(rows)
        newcomers = {gateway: [d for d in devices if (gateway, d) not in registered]
                     for gateway, devices in new.items()}
        bound = self.max_devices_per_gateway
        refused = beyond_bound(newcomers, counts, bound=bound)
        # admitted newcomers count as registered from now (a rolled-back commit is retried
        # with the same events, which admits the same devices)
        registered.update((gateway, device) for gateway, devices in newcomers.items()
                          for device in devices if (gateway, device) not in refused)
        if not refused:
            return batch, ()
        kept: list[tuple[Accepted, int]] = []
        rejected = list(batch.rejected)
        over: list[OverBound] = []
        for accepted, received_ms in batch.accepted:
            event = accepted.event
            if (event.gateway, event.device) not in refused:
                kept.append((accepted, received_ms))
                continue
            reason = (f"device {event.device!r} is new, and gateway {event.gateway!r} already has "
                      f"{bound} devices, the bound (CAREFLOW_MAX_DEVICES_PER_GATEWAY={bound}): "
                      "its events are kept here and it is not registered. Raise the bound if the "
                      "gateway really serves this many devices; else find out what invents them")
            rejected.append((Rejected(accepted.topic, TOO_MANY_DEVICES, reason,
                                      accepted.body.encode()), received_ms))
            over.append(OverBound(event.gateway, event.device, event.type,
                                  event.type == "alert" and accepted.data.get("state") == "raised"))
        return IncomingBatch(kept, rejected, batch.presence), tuple(over)

    def _already_dead_lettered(self, rejected: Rejected) -> bool:
        """Whether these bytes on this topic are already a dead letter: the broker delivers a
        retained message again at every (re)subscribe of the hub, and junk left retained would
        otherwise add a row each time."""
        return self._conn.execute(
            "SELECT 1 FROM dead_letters WHERE topic = ? AND code = ? AND payload_size = ? AND "
            "payload = ? LIMIT 1", (rejected.topic, rejected.code, len(rejected.payload),
                                    _dead_letter_row(rejected, 0)[4])).fetchone() is not None

    def _prune_dead_letters(self) -> None:
        """Keep the newest dead letters within both bounds (rows, payload bytes); conflicts the
        alert stage has yet to evaluate stay whatever the bounds say."""
        max_rows, max_bytes = self._dead_letter_bounds
        conn = self._conn
        by_rows = conn.execute("SELECT pos FROM dead_letters ORDER BY pos DESC LIMIT 1 OFFSET ?",
                               (max_rows,)).fetchone()
        # The running sum finds the cut; it costs ~4x a plain sum, which says if there is one.
        total = conn.execute("SELECT SUM(length(payload)) FROM dead_letters").fetchone()[0]
        by_bytes = conn.execute(
            "SELECT pos FROM (SELECT pos, SUM(length(payload)) OVER (ORDER BY pos DESC) AS kept "
            "FROM dead_letters) WHERE kept > ? ORDER BY pos DESC LIMIT 1", (max_bytes,)
        ).fetchone() if (total or 0) > max_bytes else None
        self._dead_since_prune = (0, 0)
        cut = max(by_rows[0] if by_rows else 0, by_bytes[0] if by_bytes else 0)
        if cut:
            protected, over_bound = (
                row[0] if (row := conn.execute("SELECT value FROM cursors WHERE name = ?",
                                               (name,)).fetchone()) else cut
                for name in (CONFLICTS_CURSOR, OVER_BOUND_CURSOR))
            # The newest row always stays: a position is a rowid, and SQLite gives a deleted
            # maximum out again, which would put a new conflict behind the alert stage's cursor.
            # Care alarms refused beyond the device bound stay until the hub announced them.
            conn.execute(f"DELETE FROM dead_letters WHERE pos <= ? AND (code != '{CONFLICT}' OR "
                         f"pos <= ?) AND (code != '{TOO_MANY_DEVICES}' OR log_pos IS NULL OR "
                         "pos <= ?) AND pos < (SELECT MAX(pos) FROM dead_letters)",
                         (cut, protected, over_bound))

    def _insert_all_fresh(
        self, batch: IncomingBatch, rows: list[tuple[Any, ...]]
    ) -> list[tuple[StoredEvent, Mapping[str, Any]]] | None:
        """The common case in one executemany; None (and nothing written) if any row repeats."""
        if not rows:
            return []
        conn = self._conn
        conn.execute("SAVEPOINT fresh")
        before = conn.total_changes
        conn.executemany(_INSERT_EVENT, rows)
        if conn.total_changes - before != len(rows):
            conn.execute("ROLLBACK TO fresh")
            conn.execute("RELEASE fresh")
            return None
        conn.execute("RELEASE fresh")
        # One writer inside BEGIN IMMEDIATE: the new rowids are consecutive.
        last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        first = last - len(rows) + 1
        return [(StoredEvent(first + i, *row), accepted.data)
                for i, (row, (accepted, _)) in enumerate(zip(rows, batch.accepted, strict=True))]

    def _apply_presence(self, batch: IncomingBatch) -> None:
        for update, received_ms in batch.presence:
            row = self._conn.execute("SELECT * FROM presence WHERE gateway = ?",
                                     (update.gateway,)).fetchone()
            old = PresenceRecord(*row) if row else None
            boot_seen = old is not None and old.boot != update.boot and self._conn.execute(
                "SELECT 1 FROM presence_log WHERE gateway = ? AND boot = ? LIMIT 1",
                (update.gateway, update.boot)).fetchone() is not None
            if supersedes(update.state, update.conn, old, boot=update.boot, boot_seen=boot_seen):
                values = (update.gateway, update.state, update.conn, update.boot, received_ms,
                          update.reason)
                self._conn.execute("INSERT OR REPLACE INTO presence VALUES (?, ?, ?, ?, ?, ?)",
                                   values)
                # every boot is logged (it is how a late Will of an earlier boot is recognised)
                if old is None or (old.state, old.conn, old.boot) != (update.state, update.conn,
                                                                      update.boot):
                    self._conn.execute(
                        "INSERT INTO presence_log (gateway, state, conn, boot, changed_ms, reason)"
                        " VALUES (?, ?, ?, ?, ?, ?)", values)

    def presence_changes(self, *, after_pos: int = 0, limit: int = 1000) -> list[PresenceChange]:
        """Accepted presence changes in the order they were recorded."""
        rows = self._read("SELECT pos, gateway, state, conn, boot, changed_ms, reason "
                          "FROM presence_log WHERE pos > ? ORDER BY pos LIMIT ?",
                          (after_pos, limit))
        return [PresenceChange(*row) for row in rows]

    def last_pos(self) -> int:
        """The newest event's place in the log (0 when empty)."""
        row = self._read("SELECT COALESCE(MAX(pos), 0) FROM events")[0]
        return int(row[0])

    def count_after(self, after_pos: int) -> int:
        """How many events the log holds after a position: here a difference of positions, as
        they are rowids of a table no row is ever deleted from, given out one writer at a time
        (consecutive; a rolled-back insert takes none)."""
        return max(self.last_pos() - after_pos, 0)

    def incidents_changed(self, *, since_ms: int, after_id: int = 0,
                          limit: int = 1000) -> list[Incident]:
        """Incidents opened, acknowledged or resolved at or after a moment, by id."""
        rows = self._read(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id > ? AND MAX(triggered_ms, "
            "COALESCE(acknowledged_ms, 0), COALESCE(resolved_ms, 0)) >= ? ORDER BY id LIMIT ?",
            (after_id, since_ms, limit))
        return [_incident(row) for row in rows]

    def queue_lines(self, sink: str, lines: Sequence[str], *, max_rows: int) -> int:
        """Keep lines for a sink until it confirms them; oldest dropped past ``max_rows``.

        Returns how many were dropped, so the caller can say so loudly.
        """
        with self._transaction("queue lines for a sink"):
            self._conn.executemany("INSERT INTO outbox (sink, line) VALUES (?, ?)",
                                   [(sink, text) for text in lines])
            count = int(self._conn.execute("SELECT COUNT(*) FROM outbox WHERE sink = ?",
                                           (sink,)).fetchone()[0])
            excess = count - max_rows
            if excess > 0:
                self._conn.execute(
                    "DELETE FROM outbox WHERE pos IN (SELECT pos FROM outbox WHERE sink = ? "
                    "ORDER BY pos LIMIT ?)", (sink, excess))
            return max(excess, 0)

    def queued_lines(self, sink: str, *, limit: int = 5000) -> list[tuple[int, str]]:
        """The oldest lines waiting for a sink, with their positions."""
        rows = self._read("SELECT pos, line FROM outbox WHERE sink = ? ORDER BY pos LIMIT ?",
                          (sink, limit))
        return [(int(row[0]), str(row[1])) for row in rows]

    def forget_lines(self, sink: str, *, up_to_pos: int) -> None:
        """Drop lines the sink has confirmed."""
        with self._transaction("forget delivered sink lines"):
            self._conn.execute("DELETE FROM outbox WHERE sink = ? AND pos <= ?", (sink, up_to_pos))

    def cursor(self, name: str, *, missing: int = 0) -> int:
        """A consumer's saved position (``missing`` when it never saved one)."""
        rows = self._read("SELECT value FROM cursors WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else missing

    def set_cursor(self, name: str, value: int) -> None:
        """Save a consumer's position once what it read is safely elsewhere."""
        with self._transaction("save a cursor"):
            self._conn.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (name, value))

    def pause(self, gateway: str, device: str | None, *, until_ms: int, reason: str) -> None:
        """Put a gateway (device None: with all its devices) or one device in maintenance."""
        with self._transaction("pause"):
            self._conn.execute("INSERT OR REPLACE INTO maintenance VALUES (?, ?, ?, ?)",
                               (gateway, device or "*", until_ms, reason))

    def resume(self, gateway: str, device: str | None) -> bool:
        """End a maintenance window early; False if there was none."""
        with self._transaction("resume"):
            cursor = self._conn.execute(
                "DELETE FROM maintenance WHERE gateway = ? AND device = ?", (gateway, device or "*"))
            return cursor.rowcount > 0

    def paused(self, now_ms: int) -> dict[tuple[str, str], tuple[int, str]]:
        """Active maintenance windows: (gateway, device or '*') -> (until_ms, reason)."""
        rows = self._read("SELECT gateway, device, until_ms, reason FROM maintenance "
                          "WHERE until_ms > ?", (now_ms,))
        return {(row[0], row[1]): (int(row[2]), str(row[3])) for row in rows}

    def open_incident(self, *, rule: str, gateway: str, device: str, severity: str,
                      summary: str, detail: str, at_ms: int,
                      notify: Sequence[Outgoing] = (), group_wait_ms: int = 0,
                      next_due_ms: int | None = 0) -> int | None:
        """Open an incident unless one is unresolved for this rule and source; its id or None.

        Its notifications are written in the same transaction: an incident is never recorded
        without the messages that announce it. ``next_due_ms``: when the escalation walk first
        looks at it (None: never; the default 0: at once, and the walk works out the rest).
        """
        with self._transaction("open an incident") as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO incidents (rule, gateway, device, severity, state, "
                "summary, detail, triggered_ms, first_raised_ms, last_raised_ms, next_due_ms) "
                f"VALUES (?, ?, ?, ?, '{_I.OPEN}', ?, ?, ?, ?, ?, ?)",
                (rule, gateway, device, severity, summary, detail, at_ms, at_ms, at_ms,
                 next_due_ms))
            if cursor.rowcount != 1:
                return None
            incident_id = cursor.lastrowid
            assert incident_id is not None
            self._queue(incident_id, _K.FIRING, notify, at_ms, group_key=gateway,
                        delay_ms=group_wait_ms)
            return incident_id

    def _queue(self, incident_id: int, kind: NotificationKind, notify: Sequence[Outgoing], at_ms: int, *,
               group_key: str = "", delay_ms: int = 0) -> None:
        self._conn.executemany(
            "INSERT INTO notifications (incident_id, channel, kind, title, body, "
            "next_attempt_ms, created_ms, group_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(incident_id, channel, kind, title, body, at_ms + delay_ms, at_ms, group_key)
             for channel, title, body in notify])

    def escalate_incident(self, incident_id: int, *, sent_before: int, at_ms: int,
                          notify: Sequence[Outgoing], group_key: str = "",
                          next_due_ms: int | None = None) -> bool:
        """Record that escalation step (or repeat) ``sent_before`` went out (compare-and-set:
        only while the incident is still open and no one else sent it) with its notifications;
        ``group_key`` lets the reminders of one gateway go out as one message; ``next_due_ms``:
        when the walk must look at it again (None: never)."""
        with self._transaction("escalate an incident") as conn:
            won = conn.execute(
                "UPDATE incidents SET escalation_sent = escalation_sent + 1, next_due_ms = ? "
                f"WHERE id = ? AND state = '{_I.OPEN}' AND escalation_sent = ?",
                (next_due_ms, incident_id, sent_before)).rowcount
            if won:
                self._queue(incident_id, _K.ESCALATION, notify, at_ms, group_key=group_key)
            return bool(won)

    def due_incidents(self, *, now_ms: int, limit: int) -> list[Incident]:
        """Open incidents whose reminder is due, the longest due first."""
        return [_incident(row) for row in self._read(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE state = '{_I.OPEN}' AND "
            "next_due_ms <= ? ORDER BY next_due_ms, id LIMIT ?", (now_ms, limit))]

    def set_incident_due(self, incident_id: int, *, next_due_ms: int | None) -> None:
        """When the walk must look at an open incident again (None: never)."""
        with self._transaction("schedule an incident's reminder") as conn:
            conn.execute(f"UPDATE incidents SET next_due_ms = ? WHERE id = ? AND state = '{_I.OPEN}'",
                         (next_due_ms, incident_id))

    def make_open_incidents_due(self) -> int:
        """Every open incident due now, so the walk recomputes each one's due time (after a
        start: the escalation policies may have changed); how many."""
        with self._transaction("reschedule open incidents") as conn:
            return conn.execute("UPDATE incidents SET next_due_ms = triggered_ms "
                                f"WHERE state = '{_I.OPEN}'").rowcount

    def resolve_incidents(self, *, rule: str, gateway: str, device: str, at_ms: int,
                          by: str, notify: Sequence[Outgoing] = ()) -> int:
        """Resolve the unresolved incident of this rule and source (0 or 1)."""
        with self._transaction("resolve an incident") as conn:
            row = conn.execute(
                "SELECT id FROM incidents WHERE rule = ? AND gateway = ? AND device = ? "
                f"AND state != '{_I.RESOLVED}'", (rule, gateway, device)).fetchone()
            if row is None:
                return 0
            conn.execute(f"UPDATE incidents SET state = '{_I.RESOLVED}', resolved_ms = ?, "
                         "resolved_by = ? WHERE id = ?", (at_ms, by, row[0]))
            self._queue(int(row[0]), _K.RESOLVED, notify, at_ms)
            return 1

    def unresolved_incident(self, *, rule: str, gateway: str, device: str) -> Incident | None:
        """The open or acknowledged incident of this rule and source (the unique index holds
        at most one)."""
        rows = self._read(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE rule = ? AND "
                          f"gateway = ? AND device = ? AND state != '{_I.RESOLVED}'",
                          (rule, gateway, device))
        return _incident(rows[0]) if rows else None

    def raise_again(self, incident_id: int, *, at_ms: int, detail: str,
                    notify: Sequence[Outgoing] = (), group_wait_ms: int = 0) -> bool:
        """Count a new raise on a still-open incident, with its messages, in one transaction
        (compare-and-set: False when someone acknowledged or resolved it meanwhile)."""
        with self._transaction("record a raise of an incident") as conn:
            row = conn.execute(f"SELECT gateway FROM incidents WHERE id = ? AND state = '{_I.OPEN}'",
                               (incident_id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE incidents SET raises = raises + 1, last_raised_ms = ?, "
                         "detail = ? WHERE id = ?", (at_ms, detail, incident_id))
            self._queue(incident_id, _K.FIRING, notify, at_ms, group_key=row[0],
                        delay_ms=group_wait_ms)
            return True

    def supersede_incident(self, incident_id: int, *, at_ms: int, detail: str,
                           notify: Sequence[Outgoing] = (), group_wait_ms: int = 0,
                           next_due_ms: int | None = 0) -> int | None:
        """A new raise of an acknowledged incident opens a new one that follows it.

        The acknowledged one is resolved without a message (a "resolved" message would read as
        "it is over" while a new emergency starts); the new one carries the raise count and
        the first raise's time, and its messages are written in the same transaction
        (``next_due_ms`` as for :meth:`open_incident`). Compare-and-set: None when the
        incident is no longer acknowledged.
        """
        with self._transaction("open an incident for a new raise") as conn:
            row = conn.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ? AND "
                               f"state = '{_I.ACKNOWLEDGED}'", (incident_id,)).fetchone()
            if row is None:
                return None
            old = _incident(row)
            conn.execute(f"UPDATE incidents SET state = '{_I.RESOLVED}', resolved_ms = ? WHERE id = ?",
                         (at_ms, incident_id))
            cursor = conn.execute(
                "INSERT INTO incidents (rule, gateway, device, severity, state, summary, detail, "
                "triggered_ms, raises, first_raised_ms, last_raised_ms, follows_id, next_due_ms) "
                f"VALUES (?, ?, ?, ?, '{_I.OPEN}', ?, ?, ?, ?, ?, ?, ?, ?)",
                (old.rule, old.gateway, old.device, old.severity, old.summary, detail, at_ms,
                 old.raises + 1, old.first_raised_ms or old.triggered_ms, at_ms, incident_id,
                 next_due_ms))
            new_id = cursor.lastrowid
            assert new_id is not None
            conn.execute("UPDATE incidents SET resolved_by = ? WHERE id = ?",
                         (f"careflow (raised again: incident {new_id})", incident_id))
            self._queue(new_id, _K.FIRING, notify, at_ms, group_key=old.gateway,
                        delay_ms=group_wait_ms)
            return new_id

    def group_timing(self, *, channel: str, group_key: str) -> tuple[int | None, int | None]:
        """When the group's last firing message went out, and when its waiting batch goes."""
        row = self._read(
            "SELECT (SELECT MAX(sent_ms) FROM notifications WHERE channel = ?1 AND "
            f"group_key = ?2 AND kind = '{_K.FIRING}' AND state = '{_N.SENT}'), (SELECT "
            "MIN(next_attempt_ms) FROM notifications WHERE channel = ?1 AND group_key = ?2 AND "
            f"kind = '{_K.FIRING}' AND state = '{_N.PENDING}' AND attempts = 0)", (channel, group_key))[0]
        return row[0], row[1]

    def claim_notifications(self, *, now_ms: int, limit: int,
                            channel: str | None = None) -> list[Notification]:
        """Due notifications (of one channel, or of all; critical ones first), at most ``limit``
        and the rest of their groups (at most ``MAX_GROUP_CLAIM`` more), each claimed by compare-and-set so no
        one else sends it; one commit for all (a gateway's group of thousands must not cost
        thousands of fsyncs under the lock the channels' senders share)."""
        claimed: list[Notification] = []
        only = "" if channel is None else "channel = ? AND "
        rows = self._read(  # critical ones first: a care alarm never waits behind warnings
            f"SELECT id, channel, group_key, kind FROM notifications WHERE state = '{_N.PENDING}' AND "
            f"{only}next_attempt_ms <= ? ORDER BY (SELECT severity FROM incidents WHERE "
            f"incidents.id = notifications.incident_id) = '{_S.CRITICAL}' DESC, id LIMIT ?",
            (now_ms, limit) if channel is None else (channel, now_ms, limit))
        # a due notification brings along the rest of its group (same channel, gateway and
        # kind: firing messages, or repeats, which escalation queues with a group key)
        groups = {(channel, key, kind) for _, channel, key, kind in rows if key}
        extra = [row[0] for channel, key, kind in sorted(groups) for row in self._read(
            f"SELECT id FROM notifications WHERE state = '{_N.PENDING}' AND channel = ? AND "
            "group_key = ? AND kind = ? AND attempts = 0", (channel, key, kind))]
        due = list(dict.fromkeys([row[0] for row in rows] + extra[:MAX_GROUP_CLAIM]))
        with self._transaction("claim notifications") as conn:
            for notification_id in due:
                won = conn.execute(f"UPDATE notifications SET state = '{_N.SENDING}' "
                                   f"WHERE id = ? AND state = '{_N.PENDING}'",
                                   (notification_id,)).rowcount == 1
                if won:
                    row = conn.execute("SELECT * FROM notifications WHERE id = ?",
                                       (notification_id,)).fetchone()
                    claimed.append(_notification(row))
        return claimed

    def finish_notification(self, notification_id: int, *, ok: bool, now_ms: int,
                            error: str | None, final: bool, retry_in_ms: int = 0,
                            attempts: int | None = None) -> None:
        """Sent, failed for good, or back to pending for a later attempt (``attempts``: the
        count to record, when not one more than before)."""
        state = _N.SENT if ok else (_N.FAILED if final else _N.PENDING)
        with self._transaction("record a notification") as conn:
            conn.execute(
                "UPDATE notifications SET state = ?, attempts = COALESCE(?, attempts + 1), "
                "last_error = ?, sent_ms = CASE WHEN ? THEN ? ELSE sent_ms END, "
                f"next_attempt_ms = ? WHERE id = ? AND state = '{_N.SENDING}'",
                (state, attempts, error, ok, now_ms, now_ms + retry_in_ms, notification_id))

    def cancel_notification(self, notification_id: int, *, now_ms: int, reason: str) -> bool:
        """A claimed notification that must not go out any more (its incident was acknowledged
        or resolved meanwhile): cancelled, with the reason, for `careflow notify list`."""
        with self._transaction("cancel a notification") as conn:
            return conn.execute(
                f"UPDATE notifications SET state = '{_N.CANCELLED}', last_error = ?, "
                f"next_attempt_ms = ? WHERE id = ? AND state = '{_N.SENDING}'",
                (reason, now_ms, notification_id)).rowcount == 1

    def overdue_notifications(self, *, due_before_ms: int) -> dict[str, int]:
        """Per channel, how many notifications are pending that were due before this moment
        (none is, while the channel's sender keeps up)."""
        rows = self._read(f"SELECT channel, COUNT(*) FROM notifications WHERE state = '{_N.PENDING}' "
                          "AND next_attempt_ms < ? GROUP BY channel", (due_before_ms,))
        return {str(channel): int(count) for channel, count in rows}

    def failing_channels(self) -> dict[str, str]:
        """Channels whose latest attempt failed, with that attempt's reason."""
        rows = self._read(
            "SELECT n.channel, n.last_error FROM notifications AS n JOIN (SELECT MAX(id) AS id "
            "FROM notifications WHERE attempts > 0 AND "
            f"state IN ('{_N.PENDING}', '{_N.SENT}', '{_N.FAILED}') "
            "GROUP BY channel) AS latest ON n.id = latest.id "
            f"WHERE n.state != '{_N.SENT}' AND n.last_error IS NOT NULL")
        return {str(channel): str(error) for channel, error in rows}

    def release_claimed_notifications(self, channel: str | None = None) -> int:
        """Claimed by a sender that died (or by one channel's sender that failed mid-way):
        pending again (it may go out twice, never zero)."""
        only = "" if channel is None else " AND channel = ?"
        with self._transaction("release notifications") as conn:
            return conn.execute(f"UPDATE notifications SET state = '{_N.PENDING}' "
                                f"WHERE state = '{_N.SENDING}'{only}",
                                () if channel is None else (channel,)).rowcount

    def _in_states(self, what: str, table: str, states: Sequence[str] | None,
                   tail: str = "", params: Sequence[Any] = ()) -> list[Any]:
        """Rows (or a count) of incidents/notifications, optionally only in some states."""
        sql, bound = f"SELECT {what} FROM {table}", list(params)
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            bound = [*states, *bound]
        return self._read(sql + tail, bound)

    def notifications(self, *, states: Sequence[str] | None = None,
                      limit: int = 50) -> list[Notification]:
        """Newest first."""
        return [_notification(row) for row in self._in_states(
            "*", "notifications", states, " ORDER BY id DESC LIMIT ?", [limit])]

    def count_notifications(self, *, states: Sequence[str] | None = None,
                            min_attempts: int = 0, critical_min_attempts: int | None = None) -> int:
        """How many notifications are in these states (tried at least ``min_attempts`` times;
        those of critical incidents at least ``critical_min_attempts``, when given)."""
        if critical_min_attempts is not None:
            return int(self._in_states(
                "COUNT(*)", "notifications", states,
                f" {'AND' if states else 'WHERE'} attempts >= CASE WHEN incident_id IN (SELECT id "
                f"FROM incidents WHERE severity = '{_S.CRITICAL}') THEN ? ELSE ? END",
                [critical_min_attempts, min_attempts])[0][0])
        if min_attempts:
            return int(self._in_states("COUNT(*)", "notifications", states,
                                       f" {'AND' if states else 'WHERE'} attempts >= ?",
                                       [min_attempts])[0][0])
        return int(self._in_states("COUNT(*)", "notifications", states)[0][0])

    def _change_incident(self, incident_id: int, sql: str, params: Sequence[Any],
                         action: str) -> Incident:
        with self._transaction(action) as conn:
            changed = conn.execute(sql, params).rowcount
        current = self.incident(incident_id)
        if current is None:
            msg = f"there is no incident {incident_id}; `careflow incidents list` shows them"
            raise RefusedError(msg)
        if not changed:
            msg = f"incident {incident_id} is {current.state}; nothing to {action}"
            raise RefusedError(msg)
        return current

    def acknowledge_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Mark an open incident acknowledged (compare-and-set: only from open)."""
        return self._change_incident(
            incident_id, f"UPDATE incidents SET state = '{_I.ACKNOWLEDGED}', acknowledged_ms = ?, "
            f"acknowledged_by = ? WHERE id = ? AND state = '{_I.OPEN}'", (at_ms, by, incident_id),
            "acknowledge")

    def resolve_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Resolve an open or acknowledged incident by hand."""
        return self._change_incident(
            incident_id, f"UPDATE incidents SET state = '{_I.RESOLVED}', resolved_ms = ?, "
            f"resolved_by = ? WHERE id = ? AND state != '{_I.RESOLVED}'", (at_ms, by, incident_id),
            "resolve")

    def incidents(self, *, states: Sequence[str] | None = None,
                  limit: int = 50) -> list[Incident]:
        """Newest first, optionally only in some states."""
        return [_incident(row) for row in self._in_states(
            _INCIDENT_COLUMNS, "incidents", states, " ORDER BY id DESC LIMIT ?", [limit])]

    def count_incidents(self, *, states: Sequence[str] | None = None) -> int:
        """How many incidents are in these states."""
        return int(self._in_states("COUNT(*)", "incidents", states)[0][0])

    def incident_triggers(self, *, rule: str, gateway: str, device: str,
                          since_ms: int) -> list[int]:
        """When this rule fired for this source since a moment (for flapping detection)."""
        return [int(row[0]) for row in self._read(
            "SELECT triggered_ms FROM incidents WHERE rule = ? AND gateway = ? AND device = ? "
            "AND triggered_ms >= ?", (rule, gateway, device, since_ms))]

    def incident(self, incident_id: int) -> Incident | None:
        """One incident."""
        rows = self._read(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?",
                          (incident_id,))
        return _incident(rows[0]) if rows else None

    def add_silence(self, *, gateway: str, device: str, rule: str, starts_ms: int, ends_ms: int,
                    created_by: str, comment: str) -> Silence:
        """Record a silence."""
        with self._transaction("add a silence") as conn:
            cursor = conn.execute(
                "INSERT INTO silences (gateway, device, rule, starts_ms, ends_ms, created_by, "
                "comment) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (gateway, device, rule, starts_ms, ends_ms, created_by, comment))
        assert cursor.lastrowid is not None
        return Silence(cursor.lastrowid, gateway, device, rule, starts_ms, ends_ms, created_by,
                       comment)

    def silences(self, *, active_at_ms: int | None = None) -> list[Silence]:
        """Silences, newest first; only those active at a moment when given."""
        sql, params = "SELECT * FROM silences", []
        if active_at_ms is not None:
            sql += " WHERE starts_ms <= ? AND ends_ms > ?"
            params = [active_at_ms, active_at_ms]
        return [Silence(*row) for row in self._read(sql + " ORDER BY id DESC", params)]

    def expire_silence(self, silence_id: int, *, now_ms: int) -> bool:
        """End a silence now; False if there is no such active silence."""
        with self._transaction("expire a silence") as conn:
            return conn.execute("UPDATE silences SET ends_ms = ? WHERE id = ? AND ends_ms > ?",
                                (now_ms, silence_id, now_ms)).rowcount == 1

    def presence(self) -> dict[str, PresenceRecord]:
        """The last accepted presence of every gateway."""
        return {row[0]: PresenceRecord(*row) for row in self._read("SELECT * FROM presence")}

    def _judge(self, accepted: Accepted) -> tuple[Verdict, str]:
        ev = accepted.event
        key = ev.position
        by_id = self._one("WHERE id = ?", (ev.id,))
        if by_id is not None and by_id.body == accepted.body:  # the same text: nothing to read
            return Verdict.DUPLICATE, "already stored"
        by_key = self._one("WHERE gateway = ? AND device = ? AND boot = ? AND seq = ?", key)
        candidate = _candidate(ev.id, key, ev.type, ev.time, accepted.data)
        try:
            return judge(candidate,
                         _stored_candidate(by_id) if by_id else None,
                         _stored_candidate(by_key) if by_key else None)
        except (ContractError, ValueError, RecursionError) as exc:
            stored = by_id or by_key
            assert stored is not None  # only a stored copy is read back
            return Verdict.CONFLICT, (
                f"the stored event {stored.id} at the same id or position cannot be read back to "
                f"compare ({exc}); kept as a conflict rather than judged a repeat")

    def _one(self, where: str, params: Sequence[Any]) -> StoredEvent | None:
        row = self._conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events {where}", params).fetchone()
        return _stored(row) if row else None

    def _fold(self, events: Sequence[tuple[StoredEvent, Mapping[str, Any]]]
              ) -> tuple[SourceGap, ...]:
        """Update the registry; return the touched sources that still miss events."""
        if not events:
            return ()
        devices, sources = summarize(events)
        # One UPSERT per set of facts carried: a device row merges only the facts its events
        # had (a heartbeat carries 1-3 of the 8), not 8 CASE/MAX pairs of NULLs.
        by_facts: dict[tuple[str, ...], list[DeviceUpdate]] = {}
        for update in devices:
            by_facts.setdefault(tuple(n for n in FACTS if n in update.facts), []).append(update)
        for names, group in by_facts.items():
            self._conn.executemany(_upsert_device(names),
                                   [_device_params(d, names) for d in group])
        self._conn.executemany(_UPSERT_SOURCE, [_source_params(s) for s in sources])
        gaps: list[SourceGap] = []
        for start in range(0, len(sources), _GAP_QUERY_CHUNK):
            chunk = sources[start:start + _GAP_QUERY_CHUNK]
            rows = self._conn.execute(
                "SELECT gateway, device, boot, max_seq - received FROM sources "
                "WHERE max_seq > received AND (gateway, device, boot) IN (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(chunk)) + ")",
                [value for s in chunk for value in (s.gateway, s.device, s.boot)]).fetchall()
            gaps += [SourceGap(*row) for row in rows]
        return tuple(gaps)

    def reset_registry(self) -> int:
        """Empty the registry; return the log position it must be rebuilt up to.

        Events after that position are folded by the live hub, so a rebuild never counts an
        event twice even while ingest goes on.
        """
        self._registered.clear()
        with self._transaction("reset the registry") as conn:
            conn.execute("DELETE FROM devices")
            conn.execute("DELETE FROM sources")
            last = conn.execute("SELECT COALESCE(MAX(pos), 0) FROM events").fetchone()[0]
        return int(last)

    def fold_registry(self, events: Sequence[StoredEvent]) -> None:
        """Fold stored events into the registry (used by replay)."""
        with self._transaction("update the registry"):
            self._fold([(ev, ev.data) for ev in events])

    def write_health(self, report: dict[str, Any]) -> None:
        """Replace the single health row."""
        self._write("INSERT OR REPLACE INTO health (id, written_ms, report) VALUES (1, ?, ?)",
                    (_now_ms(), json.dumps(report)))

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            msg = f"cannot write to the event store at {self.path}: {exc}"
            raise StoreError(msg) from exc

    # -- reading ----------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            msg = f"cannot read the event store at {self.path}: {exc}"
            raise StoreError(msg) from exc

    def query(self, flt: EventFilter, *, limit: int | None = None,
              newest_first: bool = True) -> list[StoredEvent]:
        """Events matching ``flt`` by event time."""
        where, params = _where(flt)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_EVENT_COLUMNS} FROM events{where} ORDER BY time_ms {order}, pos {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_stored(row) for row in self._read(sql, params)]

    def count(self, flt: EventFilter) -> int:
        """How many events match ``flt``."""
        where, params = _where(flt)
        return int(self._read(f"SELECT COUNT(*) FROM events{where}", params)[0][0])

    def iter_log(self, flt: EventFilter, *, chunk: int = 1000, up_to_pos: int | None = None,
                 after_pos: int = 0) -> Iterator[list[StoredEvent]]:
        """Matching events in arrival order, ``chunk`` at a time (keyset pagination on pos)."""
        where, params = _where(flt)
        joiner = " AND " if where else " WHERE "
        limit_pos = up_to_pos if up_to_pos is not None else 2**62
        after = after_pos
        while True:
            rows = self._read(
                f"SELECT {_EVENT_COLUMNS} FROM events{where}{joiner}pos > ? AND pos <= ? "
                "ORDER BY pos LIMIT ?",
                [*params, after, limit_pos, chunk],
            )
            if not rows:
                return
            events = [_stored(row) for row in rows]
            after = events[-1].pos
            yield events

    def _device(self, row: sqlite3.Row | tuple[Any, ...]) -> DeviceRecord:
        facts: dict[str, Any] = {}
        for index, name in enumerate(FACTS):
            value = row[10 + 2 * index]
            if value is not None:
                facts[name] = json.loads(value) if name in JSON_FACTS else value
        gaps = int(row[-1])
        return DeviceRecord(
            gateway=row[0], device=row[1], first_seen_ms=row[2], last_seen_ms=row[3],
            events=row[4], last_time_ms=row[5], last_type=row[6], boot=row[7], seq=row[8],
            skew_ms=row[9], gaps=gaps, facts=facts)

    def devices(self, *, gateway: str | None = None) -> list[DeviceRecord]:
        """Registry entries, by gateway then device."""
        sql = _DEVICES_WITH_GAPS
        params: list[Any] = []
        if gateway is not None:
            sql += " WHERE d.gateway = ?"
            params.append(gateway)
        return [self._device(row)
                for row in self._read(sql + " ORDER BY d.gateway, d.device", params)]

    def device(self, gateway: str, device: str) -> DeviceRecord | None:
        """One registry entry."""
        rows = self._read(_DEVICES_WITH_GAPS + " WHERE d.gateway = ? AND d.device = ?",
                          (gateway, device))
        return self._device(rows[0]) if rows else None

    def total_gaps(self) -> int:
        """Missing events across every source and boot."""
        return int(self._read("SELECT COALESCE(SUM(max_seq - received), 0) FROM sources")[0][0])

    def dead_letters(self, *, limit: int = 50, code: str | None = None) -> list[DeadLetter]:
        """Newest first."""
        sql = ("SELECT pos, received_ms, topic, code, reason, payload, payload_size, batch_index "
               "FROM dead_letters")
        params: list[Any] = []
        if code is not None:
            sql += " WHERE code = ?"
            params.append(code)
        sql += " ORDER BY pos DESC LIMIT ?"
        params.append(limit)
        return [DeadLetter(*row) for row in self._read(sql, params)]

    def dead_letters_after(self, after_pos: int, *, code: str, limit: int = 1000,
                           placed_only: bool = False) -> list[DeadLetter]:
        """Dead letters of one code after a position, oldest first (a consumer's cursor);
        ``placed_only``: only those placed in the event log (care alarms among refusals)."""
        placed = " AND log_pos IS NOT NULL" if placed_only else ""
        rows = self._read(
            "SELECT pos, received_ms, topic, code, reason, payload, payload_size, batch_index, "
            f"log_pos FROM dead_letters WHERE pos > ? AND code = ?{placed} ORDER BY pos LIMIT ?",
            (after_pos, code, limit))
        return [DeadLetter(*row) for row in rows]

    def dead_letter_count(self) -> int:
        """How many dead letters are kept."""
        return int(self._read("SELECT COUNT(*) FROM dead_letters")[0][0])

    def read_health(self) -> tuple[int, dict[str, Any]] | None:
        """The last health report and when it was written."""
        rows = self._read("SELECT written_ms, report FROM health WHERE id = 1")
        if not rows:
            return None
        return int(rows[0][0]), json.loads(rows[0][1])

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _device_params(update: DeviceUpdate, names: Sequence[str]) -> tuple[Any, ...]:
    facts: list[Any] = []
    for name in names:
        value, at_ms = update.facts[name]
        if name in JSON_FACTS and value is not None:
            value = json.dumps(value, sort_keys=True)
        facts.extend((value, at_ms))
    return (update.gateway, update.device, update.first_seen_ms, update.last_seen_ms,
            update.events, update.last_time_ms, update.last_type, update.boot, update.seq,
            update.skew_ms, *facts)


def _source_params(update: SourceUpdate) -> tuple[Any, ...]:
    return (update.gateway, update.device, update.boot, update.max_seq, update.received,
            update.first_seen_ms)
