"""SQLite helpers shared by the hub's event store and the gateway's outbox."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from careflow.errors import StoreError

__all__ = ["immediate_transaction", "open_wal"]


def open_wal(path: Path, *, synchronous: str, schema: str, timeout_s: float = 30.0
             ) -> sqlite3.Connection:
    """An autocommit connection in WAL mode (readers never block the writer) with ``schema``
    applied. ``synchronous`` "full": a commit survives power loss; "normal": a process crash.
    Raises sqlite3.Error/OSError for the caller to translate with what it was opening."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.executescript(schema)
    return conn


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection, failure: str) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT on an autocommit connection.

    Any exception rolls back; sqlite3 errors become :class:`StoreError` reading
    ``"{failure}: {error}"``, so callers say what could not be done.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            msg = f"{failure}: {exc}"
            raise StoreError(msg) from exc
        raise
