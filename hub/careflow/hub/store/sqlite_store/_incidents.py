"""Incidents on SQLite: each change and its notifications in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from careflow.core.errors import RefusedError
from careflow.hub.store.records import (
    Incident,
    IncidentState,
    NotificationKind,
    NotificationState,
    Outgoing,
    Severity,
)
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteIncidents"]

# the state words, each spelled once in careflow.hub.store.records
_I, _N, _K, _S = IncidentState, NotificationState, NotificationKind, Severity

# Named, not *: a database made before a column existed has its columns in another order.
_INCIDENT_COLUMNS = ("id, rule, gateway, device, severity, state, summary, detail, triggered_ms, "
                     "acknowledged_ms, acknowledged_by, resolved_ms, resolved_by, escalation_sent, "
                     "raises, first_raised_ms, last_raised_ms, follows_id, next_due_ms")


def _incident(row: Sequence[Any]) -> Incident:
    """An incident from its row (columns as ``_INCIDENT_COLUMNS``), its words as enums."""
    return Incident(row[0], row[1], row[2], row[3], _S(row[4]), _I(row[5]), *row[6:])


class SqliteIncidents(SqliteBase):
    """The incidents table; changes are compare-and-set."""

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

    def incident(self, incident_id: int) -> Incident | None:
        """One incident."""
        rows = self._read(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?",
                          (incident_id,))
        return _incident(rows[0]) if rows else None

    def incidents(self, *, states: Sequence[str] | None = None,
                  source: tuple[str, str] | None = None, limit: int = 50) -> list[Incident]:
        """Newest first, optionally only in some states, of one (gateway, device)."""
        return [_incident(row) for row in self._in_states(
            _INCIDENT_COLUMNS, "incidents", states, " ORDER BY id DESC LIMIT ?", [limit],
            match={"gateway": source[0], "device": source[1]} if source else None)]

    def count_incidents(self, *, states: Sequence[str] | None = None) -> int:
        """How many incidents are in these states."""
        return int(self._in_states("COUNT(*)", "incidents", states)[0][0])

    def incident_counts(self, *, states: Sequence[str] | None = None) -> dict[tuple[str, str], int]:
        """How many incidents per (severity, state), only in some states when given."""
        rows = self._in_states("severity, state, COUNT(*)", "incidents", states,
                               " GROUP BY severity, state")
        return {(str(severity), str(state)): int(count) for severity, state, count in rows}

    def incidents_changed(self, *, since_ms: int, after_id: int = 0,
                          limit: int = 1000) -> list[Incident]:
        """Incidents opened, acknowledged or resolved at or after a moment, by id."""
        rows = self._read(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id > ? AND MAX(triggered_ms, "
            "COALESCE(acknowledged_ms, 0), COALESCE(resolved_ms, 0)) >= ? ORDER BY id LIMIT ?",
            (after_id, since_ms, limit))
        return [_incident(row) for row in rows]

    def incident_triggers(self, *, rule: str, gateway: str, device: str,
                          since_ms: int) -> list[int]:
        """When this rule fired for this source since a moment (for flapping detection)."""
        return [int(row[0]) for row in self._read(
            "SELECT triggered_ms FROM incidents WHERE rule = ? AND gateway = ? AND device = ? "
            "AND triggered_ms >= ?", (rule, gateway, device, since_ms))]

    def group_timing(self, *, channel: str, group_key: str) -> tuple[int | None, int | None]:
        """When the group's last firing message went out, and when its waiting batch goes."""
        row = self._read(
            "SELECT (SELECT MAX(sent_ms) FROM notifications WHERE channel = ?1 AND "
            f"group_key = ?2 AND kind = '{_K.FIRING}' AND state = '{_N.SENT}'), (SELECT "
            "MIN(next_attempt_ms) FROM notifications WHERE channel = ?1 AND group_key = ?2 AND "
            f"kind = '{_K.FIRING}' AND state = '{_N.PENDING}' AND attempts = 0)", (channel, group_key))[0]
        return row[0], row[1]
