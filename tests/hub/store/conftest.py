"""The store conformance suite: each store protocol's behaviour, run against every adapter.

The tests name no adapter: they get a :class:`Store` from the ``adapter`` fixture, which is
parametrised over :data:`ADAPTERS`. A second database joins the suite by adding its entry there
(for PostgreSQL: a server started on a free port, as ``tests/conftest.py`` starts InfluxDB).
Builders of what the hub hands a store (refusals, presence, incidents) live here too; events
and decoded batches come from ``tests/conftest.py`` and ``tests/hub/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import PresenceUpdate, Rejected
from careflow.hub.store.interface import Store
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore

T0 = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


class Adapter(Protocol):
    """Opens connections to fresh databases of one kind, and closes them after the test."""

    def open(self, database: str = "careflow", **limits: int) -> Store:
        """A new connection to ``database`` (made empty on first use in a test); ``limits``:
        max_devices_per_gateway, dead_letter_max_rows, dead_letter_max_bytes."""
        ...

    def close(self) -> None:
        """Close every connection opened."""
        ...


class SqliteAdapter:
    """SQLite: one file per database in the test's directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.opened: list[Store] = []

    def open(self, database: str = "careflow", **limits: int) -> Store:
        store = SqliteStore(self.dir / f"{database}.db", synchronous="normal", **limits)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


ADAPTERS = [pytest.param(SqliteAdapter, id="sqlite")]


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    made: Adapter = request.param(tmp_path)
    yield made
    made.close()


@pytest.fixture
def store(adapter: Adapter) -> Store:
    return adapter.open()


def source(gateway: str = "gw-1", device: str | None = None, boot: str = "b1",
           next_seq: int = 1) -> Stamper:
    """A device (the gateway itself when ``device`` is None) in one boot."""
    return Stamper(gateway=gateway, device=device or gateway, boot=boot, next_seq=next_seq)


def refused(count: int, *, code: str = "not_json", size: int = 10, received_ms: int = 1_000,
            retained: bool = False) -> IncomingBatch:
    """``count`` distinct refusals of one code."""
    return IncomingBatch([], [(Rejected("careflow/v1/gw-1/s/heartbeat", code, "why",
                                        b"%08d" % i + b"x" * size, retained=retained),
                               received_ms) for i in range(count)])


def presence(gateway: str, state: str, conn: int, boot: str, at_ms: int,
             reason: str | None = None) -> IncomingBatch:
    """One presence message of a gateway (``online``, or its Will's ``offline``)."""
    return IncomingBatch([], [], [(PresenceUpdate(gateway, state, conn, boot, reason), at_ms)])


def at(minutes: float) -> datetime:
    """An event time, ``minutes`` after a fixed start."""
    return datetime.fromtimestamp(T0.timestamp() + minutes * 60, tz=UTC)


OUT = ("oncall", "fired", "body")  # one notification to the oncall channel


def opener(store: Store) -> Callable[..., int]:
    """Open an incident with defaults; its id (it must open)."""
    def open_(rule: str = "r", gateway: str = "gw-1", device: str = "gw-1", *,
              severity: str = "warning", at_ms: int = 1_000, **kwargs: Any) -> int:
        incident_id = store.open_incident(rule=rule, gateway=gateway, device=device,
                                          severity=severity, summary=f"{rule} {device}",
                                          detail="d", at_ms=at_ms, **kwargs)
        assert incident_id is not None
        return incident_id
    return open_
