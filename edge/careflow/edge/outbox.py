"""The gateway's durable outbox: every event waits on disk until the hub confirms it stored it.

Not the broker's PUBACK: a broker that crashes loses its queues, so only the hub's confirmation
(``careflow/v1/{gateway}/ack``) lets an event go. Stamping (id, boot, seq) and enqueueing happen
in one transaction, so an event is stamped exactly once and keeps its identity through resends.

The bound: when the outbox holds ``max_events`` events, the oldest heartbeats are dropped first,
then the oldest status, error and provision events; care alarms (``alert``) are never dropped,
nor the reports of care alarms the contract refused (see :mod:`careflow.edge.refusal`), nor the
gateway's newest heartbeat (so an outbox full of alarms may hold one event more: without it the
hub would declare offline a gateway flooding it with alarms).
Drops are counted by type and reported once connected (an ``error`` event, E_OUTBOX_OVERFLOW).

Care alarms go first: :meth:`Outbox.due` returns every due alert before anything else, so a new
alarm never waits behind a backlog (up to ``max_events`` heartbeats after an outage).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from careflow.core.errors import ContractError, StoreError
from careflow.core.sqlite import immediate_transaction, open_wal
from careflow.edge.refusal import encode_event
from careflow.edge.stamper import new_event_id
from careflow.schemas import CONTRACT_VERSION, format_rfc3339, parse_event

__all__ = ["DROP_ORDER", "Outbox", "Pending"]

# Which events make room when the outbox is full, in order; alerts are never dropped.
DROP_ORDER = ("heartbeat", "status", "provision", "error")
# Nor the report of a care alarm the contract refused (the body as json.dumps writes it; inside
# a string, as in a refused line's excerpt, the quotes are escaped and do not match).
_REFUSED_ALARM = '%"refused_type": "alert"%'

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    device TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    sent_ms INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_by_type ON outbox (type, n);
CREATE TABLE IF NOT EXISTS sequences (
    device TEXT PRIMARY KEY,
    boot TEXT NOT NULL,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """An event waiting for the hub's confirmation."""

    n: int
    id: str
    type: str
    body: str
    sent_ms: int | None


class Outbox:
    """SQLite-backed outbox of one gateway (one agent process owns it)."""

    def __init__(self, path: Path, *, gateway: str, boot: str, max_events: int = 100_000,
                 synchronous: str = "full") -> None:
        self.gateway = gateway
        self.boot = boot
        self.max_events = max_events
        self._lock = threading.Lock()  # the agent's threads share one connection
        try:
            # FULL: a queued event survives power loss. The simulator uses NORMAL (crash-safe).
            self._conn = open_wal(path, synchronous=synchronous, schema=_SCHEMA, timeout_s=5.0)
            # Messages "in flight" before a restart are not known to have arrived: resend them.
            self._conn.execute("UPDATE outbox SET sent_ms = NULL")
        except (sqlite3.Error, OSError) as exc:
            msg = f"cannot open the outbox at {path}: {exc}"
            raise StoreError(msg) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One writer at a time, all-or-nothing; sqlite3 errors become StoreError."""
        with self._lock, immediate_transaction(self._conn, "the gateway outbox cannot be written"):
            yield

    # -- adding -------------------------------------------------------------------------------

    def add(self, device: str, event_type: str, data: dict[str, Any], *,
            at_ms: int | None = None, mark: tuple[str, str] | None = None) -> dict[str, Any]:
        """Stamp an event and keep it durably, in one transaction; return the envelope.

        ``mark`` (name, value) is saved in the same transaction, so an input can remember how far
        it got (a spool file's line) without ever enqueueing a line twice.

        Raises:
            ContractError: the event would break the contract, its size or depth limits
                (``oversized``, ``too_deep``) included; nothing is stored, no seq is used.
        """
        with self._transaction():
            envelope = self._insert(device, event_type, data, at_ms=at_ms)
            if mark is not None:
                self._conn.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", mark)
            self._enforce_bound()
        return envelope

    def _insert(self, device: str, event_type: str, data: dict[str, Any], *,
                at_ms: int | None) -> dict[str, Any]:
        """Stamp and store one event; the caller holds the transaction."""
        moment = time.time() if at_ms is None else at_ms / 1000
        try:
            at = format_rfc3339(datetime.fromtimestamp(moment, tz=UTC))
        except (ValueError, OverflowError, OSError) as exc:
            msg = f"time: {at_ms} ms is outside the calendar ({exc})"
            raise ContractError("schema", msg) from exc
        envelope: dict[str, Any] = {
            "v": CONTRACT_VERSION, "id": new_event_id(), "type": event_type,
            "gateway": self.gateway, "device": device, "time": at, "boot": self.boot,
            "seq": 1, "data": data,
        }
        parse_event(envelope)  # never queue what the hub would refuse (depth and names too)
        row = self._conn.execute("SELECT boot, next_seq FROM sequences WHERE device = ?",
                                 (device,)).fetchone()
        seq = envelope["seq"] = row[1] if row and row[0] == self.boot else 1
        body = encode_event(envelope)  # size and NaN: never queue a poison pill
        self._conn.execute(
            "INSERT INTO sequences (device, boot, next_seq) VALUES (?, ?, ?) "
            "ON CONFLICT (device) DO UPDATE SET boot = excluded.boot, "
            "next_seq = excluded.next_seq", (device, self.boot, seq + 1))
        self._conn.execute(
            "INSERT INTO outbox (id, type, device, boot, seq, body) VALUES (?, ?, ?, ?, ?, ?)",
            (envelope["id"], event_type, device, self.boot, seq, body))
        return envelope

    def replace_with_report(self, item: Pending, report: dict[str, Any]) -> dict[str, Any]:
        """Take out a stored event that can never be delivered and queue the ``error`` event
        that reports it, in one transaction (the report is the gateway's own event)."""
        with self._transaction():
            self._conn.execute("DELETE FROM outbox WHERE n = ?", (item.n,))
            return self._insert(self.gateway, "error", report, at_ms=None)

    def _enforce_bound(self) -> None:
        over = self._count() - self.max_events
        for event_type in DROP_ORDER:
            if over <= 0:
                return
            victims = self._conn.execute(
                "SELECT n FROM outbox WHERE type = ? AND body NOT LIKE ? AND n IS NOT ("
                " SELECT MAX(n) FROM outbox WHERE type = 'heartbeat' AND device = ?)"
                " ORDER BY n LIMIT ?",
                (event_type, _REFUSED_ALARM, self.gateway, over)).fetchall()
            if victims:
                self._conn.executemany("DELETE FROM outbox WHERE n = ?", victims)
                self._conn.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "value = value + excluded.value", (f"dropped.{event_type}", len(victims)))
                over -= len(victims)

    def _count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # -- sending and confirming ---------------------------------------------------------------

    def due(self, *, now_ms: int, resend_after_ms: int, limit: int,
            max_bytes: int | None = None) -> list[Pending]:
        """Unconfirmed events never sent, or sent longer ago than ``resend_after_ms``: care
        alarms first, then the rest, each in order; at most ``limit`` of each, and of each no
        more than it takes to pass ``max_bytes`` of bodies (at least one), so a backlog of large
        events is never loaded whole to send one message's worth."""
        stale = now_ms - resend_after_ms
        due: list[Pending] = []
        with self._lock:
            for op in ("=", "!="):  # care alarms, then the rest
                used = 0
                rows = self._conn.execute(  # read lazily: only what is kept is loaded
                    "SELECT n, id, type, body, sent_ms FROM outbox WHERE type "
                    f"{op} 'alert' AND (sent_ms IS NULL OR sent_ms <= ?) ORDER BY n LIMIT ?",
                    (stale, limit))
                for row in rows:
                    if max_bytes is not None and used >= max_bytes:
                        break
                    due.append(Pending(*row))
                    used += len(row[3])
                rows.close()
        return due

    def mark_sent(self, items: Iterable[Pending], *, now_ms: int) -> None:
        """Remember when these were handed to the broker."""
        with self._transaction():
            self._conn.executemany("UPDATE outbox SET sent_ms = ? WHERE n = ?",
                                   [(now_ms, item.n) for item in items])

    def resend_all(self) -> None:
        """After a reconnect nothing in flight is known to have arrived: send it again."""
        self.resend()

    def resend(self, *, device: str | None = None, boot: str | None = None,
               from_seq: int | None = None, to_seq: int | None = None) -> int:
        """Send again, at once, the unconfirmed events that match (the hub saw a gap there)."""
        clauses = ["1 = 1"]
        params: list[Any] = []
        for column, value, op in (("device", device, "="), ("boot", boot, "="),
                                  ("seq", from_seq, ">="), ("seq", to_seq, "<=")):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        with self._transaction():
            cursor = self._conn.execute(
                f"UPDATE outbox SET sent_ms = NULL WHERE {' AND '.join(clauses)}", params)
            return cursor.rowcount

    def confirm(self, ids: Sequence[str]) -> int:
        """The hub has these durably: let them go. Returns how many were still here."""
        with self._transaction():
            before = self._conn.total_changes
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            return self._conn.total_changes - before

    # -- reading ------------------------------------------------------------------------------

    def size(self) -> int:
        """Events waiting for confirmation."""
        with self._lock:
            return self._count()

    def take_dropped(self) -> dict[str, int]:
        """Counts of events dropped for room since the last call (and reset them)."""
        with self._transaction():
            rows = self._conn.execute(
                "SELECT name, value FROM counters WHERE name LIKE 'dropped.%' AND value > 0"
            ).fetchall()
            self._conn.execute("UPDATE counters SET value = 0 WHERE name LIKE 'dropped.%'")
        return {name.removeprefix("dropped."): int(value) for name, value in rows}

    def mark(self, name: str) -> str | None:
        """A value saved with :meth:`add`."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def marks(self, prefix: str) -> dict[str, str]:
        """Every saved mark whose name starts with ``prefix``."""
        with self._lock:
            rows = self._conn.execute("SELECT name, value FROM marks WHERE name LIKE ?",
                                      (prefix + "%",)).fetchall()
        return {str(name): str(value) for name, value in rows}

    def set_mark(self, name: str, value: str) -> None:
        """Save a mark on its own (an input's progress over lines that queued nothing)."""
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (name, value))

    def clear_mark(self, name: str) -> None:
        """Forget a mark (its input is finished)."""
        with self._transaction():
            self._conn.execute("DELETE FROM marks WHERE name = ?", (name,))

    def next_counter(self, name: str) -> int:
        """Increment and return a durable counter (the connection counter of presence)."""
        with self._transaction():
            self._conn.execute(
                "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET "
                "value = value + 1", (name,))
            return int(self._conn.execute("SELECT value FROM counters WHERE name = ?",
                                          (name,)).fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()


