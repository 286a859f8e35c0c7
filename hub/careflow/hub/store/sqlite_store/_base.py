"""The connection every part of the adapter shares: opening, transactions, reads."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from careflow.core.config import (
    DEFAULT_DEAD_LETTER_MAX_MB,
    DEFAULT_DEAD_LETTER_MAX_ROWS,
    DEFAULT_MAX_DEVICES_PER_GATEWAY,
)
from careflow.core.errors import StoreError
from careflow.core.sqlite import immediate_transaction, open_wal
from careflow.hub.fleet.device_registry import FACTS
from careflow.hub.store.interface import MAX_DEAD_LETTER_PAYLOAD
from careflow.hub.store.sqlite_store._schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

__all__ = ["SqliteBase"]


@contextlib.contextmanager
def _joined(conn: sqlite3.Connection, failure: str) -> Iterator[sqlite3.Connection]:
    """A write inside a transaction someone else opened: errors translated, no commit (the
    owner of the transaction rolls it all back)."""
    try:
        yield conn
    except sqlite3.Error as exc:
        msg = f"{failure}: {exc}"
        raise StoreError(msg) from exc


class SqliteBase:
    """The store's one connection (WAL mode, so readers never block the writer), its
    transactions, and the state its parts share."""

    def __init__(self, path: Path, *, synchronous: str = "full",
                 max_devices_per_gateway: int = DEFAULT_MAX_DEVICES_PER_GATEWAY,
                 dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS,
                 dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_MAX_MB << 20) -> None:
        """Open (or create) the store. Dead-letter retention: the newest rows are kept within
        both bounds (CAREFLOW_DEAD_LETTER_MAX_ROWS / _MB)."""
        self.path = path
        self._dead_letter_bounds = (dead_letter_max_rows, dead_letter_max_bytes)
        # Pruning scans the table, so it runs after every 1% of either bound (and at the first
        # dead letter after opening, so that lowered bounds apply at once), never per message.
        self._prune_every = (max(1, min(1000, dead_letter_max_rows // 100)),
                             max(MAX_DEAD_LETTER_PAYLOAD, dead_letter_max_bytes // 100))
        self._dead_since_prune = self._prune_every
        self._atomic = False  # inside atomically()
        # A gateway that invents devices must not grow the registry and the rules' state
        # without end: beyond this many, a new device's events are dead-lettered.
        self.max_devices_per_gateway = max_devices_per_gateway
        self._registered: set[tuple[str, str]] = set()  # (gateway, device) known registered
        try:
            self._conn = open_wal(path, synchronous=synchronous, schema="")
            self._refuse_newer()  # before anything below changes a layout this code cannot read
            self._conn.executescript(SCHEMA)
            self._add_fact_columns()  # at every open: the facts follow the contract
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            msg = (f"cannot open the event store at {path}: {exc}. Check that the directory is "
                   "writable (set CAREFLOW_DATA_DIR or --data-dir to choose another).")
            raise StoreError(msg) from exc

    def _add_fact_columns(self) -> None:
        """A database made before a fact existed gains its columns (facts only ever grow)."""
        known = {row[1] for row in self._conn.execute("PRAGMA table_info(devices)")}
        for name in FACTS:
            for column in (name, f"{name}_ms"):
                if column not in known:
                    self._conn.execute(f"ALTER TABLE devices ADD COLUMN {column}")

    def _refuse_newer(self) -> None:
        """Refuse, untouched, a database made by a later careflow: its layout may mean what this
        code does not know, and may lack on purpose what this code's schema would create."""
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            msg = (f"the event store at {self.path} has schema version {version}, newer than this "
                   f"careflow knows ({SCHEMA_VERSION}): upgrade careflow, or point "
                   "CAREFLOW_DATA_DIR / --data-dir at another directory")
            raise StoreError(msg)

    def _migrate(self) -> None:
        """Bring a database made by an earlier careflow up to :data:`SCHEMA_VERSION`, one step
        per version, in one transaction."""
        if self._schema_version() == SCHEMA_VERSION:
            return
        with immediate_transaction(self._conn, "upgrade the event store's schema") as conn:
            # read again inside the lock: the hub and a CLI command may both be upgrading
            self._refuse_newer()
            for step in range(self._schema_version(), SCHEMA_VERSION):
                MIGRATIONS[step](conn)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def _schema_version(self) -> int:
        if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                  "name = 'meta'").fetchone():
            return 1  # a new database: the schema is not applied yet
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 1  # new, or made before the version was written

    def _transaction(self, action: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        failure = f"cannot {action} in the event store at {self.path}"
        if self._atomic:  # inside atomically(): join its transaction, commit nothing yet
            return _joined(self._conn, failure)
        return immediate_transaction(self._conn, failure)

    @contextlib.contextmanager
    def atomically(self, action: str) -> Iterator[None]:
        """Every write inside commits together (one transaction, one fsync), or none does.

        The alert stage records incident changes, their notifications and its cursor this way,
        so a crash or a refused write never leaves one without the others. One thread only.
        """
        if self._atomic:
            yield
            return
        with self._transaction(action):
            self._atomic = True
            try:
                yield
            finally:
                self._atomic = False

    def _in_states(self, what: str, table: str, states: Sequence[str] | None,
                   tail: str = "", params: Sequence[Any] = (), *,
                   match: Mapping[str, str] | None = None) -> list[Any]:
        """Rows (or a count) of incidents/notifications, optionally only in some states and
        with some columns equal to values (``match``: column names are ours, never input)."""
        where: list[str] = []
        bound: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            bound += states
        for column, value in (match or {}).items():
            where.append(f"{column} = ?")
            bound.append(value)
        sql = f"SELECT {what} FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._read(sql + tail, [*bound, *params])

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        try:
            self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            msg = f"cannot write to the event store at {self.path}: {exc}"
            raise StoreError(msg) from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            msg = f"cannot read the event store at {self.path}: {exc}"
            raise StoreError(msg) from exc

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
