"""SQLite helpers shared by the hub's event store and the gateway's outbox."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from careflow.core.errors import StoreError

__all__ = ["DIR_MODE", "FILE_MODE", "immediate_transaction", "open_wal", "private_dir"]

log = logging.getLogger(__name__)

DIR_MODE = 0o700  # the data directory holds care data: its owner only
FILE_MODE = 0o600
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _tighten(path: Path, mode: int) -> None:
    """Make ``path`` no more open than ``mode``, saying so when it was (an older careflow made
    the database 0644 in a 0755 directory); a path we may not change is left, with a warning."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode == 0:
        return
    try:
        path.chmod(current & mode)
    except OSError as exc:
        log.warning("cannot restrict the permissions of a care data file",
                    extra={"path": str(path), "mode": oct(current), "error": exc.strerror})
        return
    log.warning("restricted the permissions of a care data file to its owner",
                extra={"path": str(path), "was": oct(current), "now": oct(current & mode)})


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) for its owner only, or restrict it if it is open.

    A sticky directory such as /tmp is shared by design and left as it is, with a warning."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & stat.S_ISVTX:
        log.warning("the data directory is a shared directory; give careflow a directory of "
                    "its own (CAREFLOW_DATA_DIR)", extra={"path": str(path)})
        return
    _tighten(path, DIR_MODE)


def open_wal(path: Path, *, synchronous: str, schema: str, timeout_s: float = 30.0
             ) -> sqlite3.Connection:
    """An autocommit connection in WAL mode (readers never block the writer) with ``schema``
    applied. ``synchronous`` "full": a commit survives power loss; "normal": a process crash.

    The database holds care data: its directory is 0700 and the file 0600. A new file is
    created 0600 before SQLite opens it, and SQLite gives its -wal and -shm files the
    database's mode; an existing one is only chmod-ed, never opened here.
    Raises sqlite3.Error/OSError for the caller to translate with what it was opening."""
    private_dir(path.parent)
    for suffix in _SIDE_FILES:
        _tighten(path.with_name(path.name + suffix), FILE_MODE)
    # Only a file that does not exist yet is touched: SQLite's locks are POSIX locks, and
    # closing any descriptor of an open database in this process would drop them all (another
    # process would then take itself for the last user and delete the WAL under us).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
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
