"""Fleet on SQLite: the registry folded from the log, presence, maintenance windows."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from careflow.hub.fleet.device_registry import (
    FACTS,
    JSON_FACTS,
    DeviceUpdate,
    SourceUpdate,
    summarize,
)
from careflow.hub.fleet.presence import PresenceRecord, supersedes
from careflow.hub.store.records import (
    DeviceRecord,
    IncomingBatch,
    PresenceChange,
    SourceGap,
    StoredEvent,
)
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteFleet"]

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


class SqliteFleet(SqliteBase):
    """The registry, presence and maintenance tables."""

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

    def total_gaps(self) -> int:
        """Missing events across every source and boot."""
        return int(self._read("SELECT COALESCE(SUM(max_seq - received), 0) FROM sources")[0][0])

    def presence(self) -> dict[str, PresenceRecord]:
        """The last accepted presence of every gateway."""
        return {row[0]: PresenceRecord(*row) for row in self._read("SELECT * FROM presence")}

    def presence_changes(self, *, after_pos: int = 0, limit: int = 1000) -> list[PresenceChange]:
        """Accepted presence changes in the order they were recorded."""
        rows = self._read("SELECT pos, gateway, state, conn, boot, changed_ms, reason "
                          "FROM presence_log WHERE pos > ? ORDER BY pos LIMIT ?",
                          (after_pos, limit))
        return [PresenceChange(*row) for row in rows]

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
