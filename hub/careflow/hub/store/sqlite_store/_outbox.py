"""Outbox on SQLite: notifications claimed by compare-and-set, one commit per claim."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from careflow.hub.store.interface import MAX_GROUP_CLAIM
from careflow.hub.store.records import Notification, NotificationKind, NotificationState, Severity
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteOutbox"]

# the state words, each spelled once in careflow.hub.store.records
_N, _K, _S = NotificationState, NotificationKind, Severity


def _notification(row: Sequence[Any]) -> Notification:
    """A notification from its row (every column, in table order), its words as enums."""
    return Notification(row[0], row[1], row[2], _K(row[3]), row[4], row[5], _N(row[6]),
                        *row[7:])


class SqliteOutbox(SqliteBase):
    """The notifications table, as the senders use it."""

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

    def release_claimed_notifications(self, channel: str | None = None) -> int:
        """Claimed by a sender that died (or by one channel's sender that failed mid-way):
        pending again (it may go out twice, never zero)."""
        only = "" if channel is None else " AND channel = ?"
        with self._transaction("release notifications") as conn:
            return conn.execute(f"UPDATE notifications SET state = '{_N.PENDING}' "
                                f"WHERE state = '{_N.SENDING}'{only}",
                                () if channel is None else (channel,)).rowcount

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

    def notification_counts(self) -> dict[tuple[str, str], int]:
        """How many notifications per (channel, state)."""
        rows = self._read("SELECT channel, state, COUNT(*) FROM notifications "
                          "GROUP BY channel, state")
        return {(str(channel), str(state)): int(count) for channel, state, count in rows}

    def queue_notification(self, channel: str, *, kind: str, title: str, body: str,
                           at_ms: int) -> int:
        """A notification of no incident (id 0: a status digest), due at ``at_ms``."""
        with self._transaction("queue a notification") as conn:
            cursor = conn.execute(
                "INSERT INTO notifications (incident_id, channel, kind, title, body, "
                "next_attempt_ms, created_ms) VALUES (0, ?, ?, ?, ?, ?, ?)",
                (channel, _K(kind), title, body, at_ms, at_ms))
            assert cursor.lastrowid is not None
            return cursor.lastrowid
