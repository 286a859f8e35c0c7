"""Cursors and the sink queue on SQLite."""

from __future__ import annotations

from collections.abc import Sequence

from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteCursors"]


class SqliteCursors(SqliteBase):
    """Consumers' positions, and lines kept for sinks."""

    def cursor(self, name: str, *, missing: int = 0) -> int:
        """A consumer's saved position (``missing`` when it never saved one)."""
        rows = self._read("SELECT value FROM cursors WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else missing

    def set_cursor(self, name: str, value: int) -> None:
        """Save a consumer's position once what it read is safely elsewhere."""
        with self._transaction("save a cursor"):
            self._conn.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (name, value))

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
