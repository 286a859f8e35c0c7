"""How the writer groups waiting messages into commits."""

from __future__ import annotations

import json
from pathlib import Path

from careflow.edge.stamper import Stamper
from careflow.hub import app as service_module
from careflow.hub.app import HubService, _worth_a_worker
from careflow.hub.ingest.ingress import IncomingMessage
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import heartbeat, make_settings
from tests.hub.conftest import RecordingIngress


def waiting(service: HubService, sizes: list[int]) -> None:
    for mid, size in enumerate(sizes, start=1):
        service.inbox.put(IncomingMessage("careflow/v1/gw-1/batch", b"x" * size, mid, 1, 0))


def test_a_commit_stops_at_its_byte_bound_and_the_rest_waits_in_order(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    bound = service_module.MAX_BYTES_PER_COMMIT
    waiting(service, [bound // 3 + 1] * 7)
    first, size = service._take(0.0)
    assert [m.mid for m in first] == [1, 2, 3]  # the third reaches the bound
    assert size == 3 * (bound // 3 + 1)  # what the worker decision reads
    assert [m.mid for m in service._take(0.0)[0]] == [4, 5, 6]
    assert [m.mid for m in service._take(0.0)[0]] == [7]
    store.close()


def test_one_message_over_the_bound_is_still_a_commit_of_its_own(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    bound = service_module.MAX_BYTES_PER_COMMIT
    waiting(service, [bound * 2, 10, 10])
    assert [m.mid for m in service._take(0.0)[0]] == [1]
    assert [m.mid for m in service._take(0.0)[0]] == [2, 3]
    store.close()


def test_the_decode_worker_takes_batches_and_leaves_single_events_here() -> None:
    bound = service_module.WORKER_MIN_MESSAGE_BYTES
    assert not _worth_a_worker(500, 500 * 210)  # one heartbeat per message
    assert _worth_a_worker(20, 20 * 21_000)  # batches of a hundred
    assert _worth_a_worker(3, 3 * bound)
    assert not _worth_a_worker(3, 3 * bound - 1)


def test_worker_and_in_process_groups_commit_and_ack_in_the_order_taken(tmp_path: Path) -> None:
    """Batches go to the decode worker and small messages are decoded here, group by group;
    the log keeps arrival order and each message is acknowledged only after its commit."""
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store, decode_worker=True)
    ingress = RecordingIngress(store)
    service.ingress = ingress  # type: ignore[assignment]
    decoder = service._decoder
    assert decoder is not None
    decoder.start()
    handed_over: list[int] = []
    submit = decoder.submit
    decoder.submit = lambda items: (handed_over.append(len(items)), submit(items))[1]  # type: ignore[method-assign]
    source = Stamper(gateway="gw-1", device="s-1", boot="b1")
    mid, order = 0, []
    try:
        for step in range(30):
            per_message = 20 if step % 2 == 0 else 1  # a batch (worker), then single events
            for _ in range(1 + step % 3):
                mid += 1
                events = [heartbeat(source) for _ in range(per_message)]
                order += [event["id"] for event in events]
                service.inbox.put(IncomingMessage("careflow/v1/gw-1/batch",
                                                  json.dumps(events).encode(), mid, 1, 0))
            service._step(timeout_s=0.0)
        while service._held or not service.inbox.empty():
            service._step(timeout_s=0.0)
    finally:
        decoder.stop()
    assert [event.id for chunk in store.iter_log(EventFilter()) for event in chunk] == order
    assert 0 < len(handed_over) < 30  # both paths were taken
    assert ingress.acks == list(range(1, mid + 1))
    store.close()


def test_it_judges_its_own_health_by_the_clock_it_is_given(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    now = [1_800_000_000_000]
    service = HubService(settings, store, clock=lambda: now[0])
    assert service.health()["started_ms"] == now[0]
    assert "hub-broker-down" not in service._self_problems()  # disconnected from now on
    now[0] += 600_000
    assert service._self_problems()["hub-broker-down"].endswith("for 600s")
    store.close()
