"""SQLite adapter of the store (:class:`~careflow.hub.store.interface.Store`): WAL, one
transaction per batch; one module per port (``_events``, ``_fleet``, ``_incidents``,
``_outbox``, ``_mutes``, ``_cursors``, ``_health``, ``_web``, ``_ops``) over one connection
(``_base``) and one versioned schema (``_schema``).

sqlite3 errors become :class:`StoreError` here. ``synchronous=FULL`` (the default) makes a commit
survive power loss; ``normal`` survives a crash of the process but may lose the last commits on
power loss, and is faster.
"""

from __future__ import annotations

from careflow.hub.store.sqlite_store._cursors import SqliteCursors
from careflow.hub.store.sqlite_store._events import SqliteEventLog
from careflow.hub.store.sqlite_store._health import SqliteHealth
from careflow.hub.store.sqlite_store._incidents import SqliteIncidents
from careflow.hub.store.sqlite_store._mutes import SqliteMutes
from careflow.hub.store.sqlite_store._ops import SqliteOps
from careflow.hub.store.sqlite_store._outbox import SqliteOutbox
from careflow.hub.store.sqlite_store._web import SqliteWeb

__all__ = ["SqliteStore"]


class SqliteStore(SqliteEventLog, SqliteIncidents, SqliteOutbox, SqliteMutes, SqliteCursors,
                  SqliteHealth, SqliteWeb, SqliteOps):
    """The store on one SQLite file: every port of :class:`careflow.hub.store.interface.Store`
    (the fleet's through the event log, whose commits fold it)."""
