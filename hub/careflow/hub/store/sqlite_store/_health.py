"""Health on SQLite: one row."""

from __future__ import annotations

import json
from typing import Any

from careflow.core import clock
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteHealth"]


class SqliteHealth(SqliteBase):
    """The health row."""

    def write_health(self, report: dict[str, Any]) -> None:
        """Replace the single health row."""
        self._write("INSERT OR REPLACE INTO health (id, written_ms, report) VALUES (1, ?, ?)",
                    (clock.now_ms(), json.dumps(report)))

    def read_health(self) -> tuple[int, dict[str, Any]] | None:
        """The last health report and when it was written."""
        rows = self._read("SELECT written_ms, report FROM health WHERE id = 1")
        if not rows:
            return None
        return int(rows[0][0]), json.loads(rows[0][1])
