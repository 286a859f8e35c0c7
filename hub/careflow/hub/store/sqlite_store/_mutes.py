"""Mutes on SQLite: the silences table."""

from __future__ import annotations

from careflow.hub.alerting.mute import Silence
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteMutes"]


class SqliteMutes(SqliteBase):
    """The silences table."""

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
