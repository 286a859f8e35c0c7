"""careflow/sqlite.py: the files that hold care data are their owner's only."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.edge.agent import load_agent_config
from careflow.hub.store.sqlite_store import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most systems run services with, under which files are 0644 by default."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
def test_it_creates_the_database_0600_in_a_0700_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        store.write_health({"connected": True})  # a write: the -wal and -shm files exist now
        assert mode(data_dir) == 0o700
        for name in ("careflow.db", "careflow.db-wal", "careflow.db-shm"):
            assert mode(data_dir / name) == 0o600, name
    finally:
        store.close()


@pytest.mark.usefixtures("usual_umask")
def test_it_restricts_an_existing_open_database_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    old = sqlite3.connect(data_dir / "careflow.db")  # as an older careflow made it: 0644
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.close()
    assert mode(data_dir / "careflow.db") == 0o644 and mode(data_dir) == 0o755
    with caplog.at_level(logging.WARNING, logger="careflow.core.sqlite"):
        store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        store.write_health({"connected": True})
        assert mode(data_dir) == 0o700
        for name in ("careflow.db", "careflow.db-wal", "careflow.db-shm"):
            assert mode(data_dir / name) == 0o600, name
        restricted = {getattr(r, "path", "") for r in caplog.records
                      if "restricted the permissions" in r.getMessage()}
        assert {str(data_dir), str(data_dir / "careflow.db")} <= restricted
    finally:
        store.close()


def test_the_gateway_reads_its_broker_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "edge-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = load_agent_config(None, {"gateway": "gw-1", "broker": "mqtt://127.0.0.1:1883",
                                      "data_dir": tmp_path / "edge"},
                               env={"CAREFLOW_EDGE_USERNAME": "gw-1",
                                    "CAREFLOW_EDGE_PASSWORD_FILE": str(secret)})
    assert (config.username, config.password) == ("gw-1", "s3cret")


def test_opening_the_database_again_keeps_this_process_s_sqlite_locks(tmp_path: Path) -> None:
    """SQLite's locks are POSIX locks: closing ANY descriptor of the database file in a process
    drops all of that process's locks on it. Opening a second store must never do that, or
    another process (``careflow status``) takes itself for the last user, checkpoints and
    deletes the WAL under the hub, and what the hub commits next is lost."""
    path = tmp_path / "data" / "careflow.db"
    first = SqliteStore(path, synchronous="normal")
    second = SqliteStore(path, synchronous="normal")  # as the hub opens several
    try:
        first.write_health({"n": 1})
        peek = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                "print(c.execute('SELECT report FROM health').fetchone()[0]); c.close()")
        subprocess.run([sys.executable, "-c", peek, str(path)], check=True, timeout=60)
        first.write_health({"n": 2})
        read = subprocess.run([sys.executable, "-c", peek, str(path)], check=True, timeout=60,
                              capture_output=True, text=True)
        assert json.loads(read.stdout) == {"n": 2}
    finally:
        second.close()
        first.close()
