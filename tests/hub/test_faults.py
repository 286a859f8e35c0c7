"""A dead broker and a failing store: the hub recovers and nothing is lost or acknowledged early."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from careflow.core.errors import StoreError
from careflow.hub.app import HubService
from careflow.hub.store.records import AppendResult, EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import Mosquitto, RunningHub, make_settings, wait_until
from tests.hub.conftest import fleet_events, publish

pytestmark = pytest.mark.broker


def test_it_reconnects_after_the_broker_restarts(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    events = fleet_events(gateways=1, devices=2, per_device=50)
    publish(mosquitto, events[:50])
    wait_until(lambda: hub.store.count(EventFilter()) == 50, what="first half")
    mosquitto.stop()
    wait_until(lambda: not hub.service.ingress.connected, what="hub notices the broker is gone")
    mosquitto.start()
    wait_until(lambda: hub.service.ingress.connected, timeout_s=30, what="hub reconnects")
    publish(mosquitto, events[50:])
    wait_until(lambda: hub.store.count(EventFilter()) == 100, what="second half")
    assert hub.store.total_gaps() == 0


class FailingStore(SqliteStore):
    """The real SQLite store, with writes made to fail on demand (a full or broken disk)."""

    failing = True

    def append(self, batch: IncomingBatch) -> AppendResult:
        if self.failing:
            raise StoreError("disk I/O error (injected by the test)")
        return super().append(batch)


@pytest.mark.parametrize("decode_worker", [False, True], ids=["in-process", "decode-worker"])
def test_it_acknowledges_nothing_while_the_store_fails(mosquitto: Mosquitto, tmp_path: Path,
                                                       decode_worker: bool) -> None:
    settings = make_settings(tmp_path / "data", mosquitto.url)
    broken = FailingStore(settings.db_path)
    service = HubService(settings, broken, decode_worker=decode_worker)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    wait_until(lambda: service.ingress.connected, what="hub connected")
    # the worker takes batches only; single-event messages are decoded in-process
    publish(mosquitto, fleet_events(gateways=1, devices=1, per_device=20), batch=decode_worker)
    wait_until(lambda: service.counters.store_errors >= 3, what="store failures retried")
    assert service.counters.events_stored == 0
    service.stop()
    runner.join(timeout=20)
    assert not runner.is_alive()
    broken.close()

    # A healthy hub with the same client id gets every message again from the broker.
    healthy = RunningHub(settings).start()
    try:
        wait_until(lambda: healthy.store.count(EventFilter()) == 20, what="redelivered events")
    finally:
        healthy.stop()
