"""Which store the hub opens: the one place that names a store adapter.

Today that is SQLite, at ``CAREFLOW_DATA_DIR``/careflow.db. A second adapter (PostgreSQL, for
several hubs sharing their state) is chosen here from the settings; everything else types
against the protocols of ``careflow.hub.store.interface`` and never learns which one it got.
"""

from __future__ import annotations

from careflow.core.config import Settings
from careflow.hub.store.interface import Store
from careflow.hub.store.sqlite_store import SqliteStore

__all__ = ["open_store"]


def open_store(settings: Settings) -> Store:
    """A new connection to the hub's store, as configured.

    Each thread or process that uses the store opens its own (the writer, the notification
    senders, the InfluxDB sink, each CLI command). The bounds on devices per gateway and on
    kept dead letters apply to the connection that appends.

    Raises:
        StoreError: it cannot be opened (the message says what to check).
    """
    return SqliteStore(settings.db_path, synchronous=settings.sqlite_synchronous,
                       max_devices_per_gateway=settings.max_devices_per_gateway,
                       dead_letter_max_rows=settings.dead_letter_max_rows,
                       dead_letter_max_bytes=settings.dead_letter_max_bytes)
