"""One hub per data directory: an exclusive lock held for the hub's lifetime.

Two hubs on one data directory share one database and, by default, one MQTT client id: each
takes the other's broker session over, every second, and events end up split between their
acknowledgements. The second hub therefore refuses to start, naming the first.

``flock`` is released by the kernel when the process ends, however it ends, so a crashed hub
never leaves a stale lock behind; the file's text (who holds it) is only for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from careflow.core import clock
from careflow.core.errors import HubRunningError, StoreError
from careflow.core.sqlite import FILE_MODE, private_dir

__all__ = ["LOCK_NAME", "DataDirLock", "describe_holder"]

LOCK_NAME = "hub.lock"


def describe_holder(text: str) -> str:
    """Who holds the lock, from the lock file's text, for people: pid, host, since when."""
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process (it did not say which)"
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')}, running "
            f"`{holder.get('command', 'careflow hub')}` since {holder.get('started', '?')}")


class DataDirLock:
    """The data directory's hub lock; :meth:`acquire` before opening anything in it."""

    def __init__(self, data_dir: Path, *, command: str = "careflow hub") -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise HubRunningError naming its holder and what to do."""
        try:
            private_dir(self.data_dir)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            msg = f"cannot create the hub lock {self.path}: {exc.strerror or exc}"
            raise StoreError(msg) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            held_by = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            msg = (f"another hub already runs on the data directory {self.data_dir}: "
                   f"{describe_holder(held_by)}. Two hubs on one data directory would take "
                   "each other's broker session over. Stop that one first, or give this hub "
                   "a data directory of its own (--data-dir) and its own "
                   "CAREFLOW_HUB_CLIENT_ID.")
            raise HubRunningError(msg) from exc
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(UTC).isoformat(timespec="seconds"),
                  "started_ms": clock.now_ms(),
                  "command": self.command, "argv": sys.argv[1:]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next hub in (the kernel does it too when the process ends)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
