"""EventLog on SQLite: events once each, dead letters, and what one commit does."""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from careflow.core.errors import ContractError
from careflow.hub.fleet.device_registry import beyond_bound
from careflow.hub.ingest.decode import Accepted, Rejected
from careflow.hub.ingest.dedupe import Candidate, Verdict, judge
from careflow.hub.store.interface import (
    CONFLICTS_CURSOR,
    MAX_DEAD_LETTER_PAYLOAD,
    OVER_BOUND_CURSOR,
)
from careflow.hub.store.records import (
    AppendResult,
    DeadLetter,
    EventFilter,
    IncomingBatch,
    OverBound,
    StoredEvent,
)
from careflow.hub.store.sqlite_store._fleet import SqliteFleet
from careflow.schemas import check_depth

__all__ = ["SqliteEventLog"]

# The dead-letter codes this store gives a meaning to (ingest's vocabulary).
CONFLICT = "conflict"

TOO_MANY_DEVICES = "too_many_devices"

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


class SqliteEventLog(SqliteFleet):
    """The event log and the dead letters; a commit folds the registry and presence (the
    fleet's tables) in the same transaction."""

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

    def last_pos(self) -> int:
        """The newest event's place in the log (0 when empty)."""
        row = self._read("SELECT COALESCE(MAX(pos), 0) FROM events")[0]
        return int(row[0])

    def count_after(self, after_pos: int) -> int:
        """How many events the log holds after a position: here a difference of positions, as
        they are rowids of a table no row is ever deleted from, given out one writer at a time
        (consecutive; a rolled-back insert takes none)."""
        return max(self.last_pos() - after_pos, 0)

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
