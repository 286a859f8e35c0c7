"""SQLite helpers shared by the hub's event store and the gateway's outbox."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from careflow.errors import StoreError

__all__ = ["immediate_transaction"]


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
