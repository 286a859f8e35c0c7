"""How the writer groups waiting messages into commits."""

from __future__ import annotations

from pathlib import Path

from careflow.hub import service as service_module
from careflow.hub.mqtt import IncomingMessage
from careflow.hub.service import HubService, _worth_a_worker
from careflow.hub.sqlite_store import SqliteStore
from tests.conftest import make_settings


def waiting(service: HubService, sizes: list[int]) -> None:
    for mid, size in enumerate(sizes, start=1):
        service.inbox.put(IncomingMessage("careflow/v1/gw-1/batch", b"x" * size, mid, 1, 0))


def test_a_commit_stops_at_its_byte_bound_and_the_rest_waits_in_order(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    bound = service_module.MAX_BYTES_PER_COMMIT
    waiting(service, [bound // 3 + 1] * 7)
    first = service._take(0.0)
    assert [m.mid for m in first] == [1, 2, 3]  # the third reaches the bound
    assert [m.mid for m in service._take(0.0)] == [4, 5, 6]
    assert [m.mid for m in service._take(0.0)] == [7]
    store.close()


def test_one_message_over_the_bound_is_still_a_commit_of_its_own(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    bound = service_module.MAX_BYTES_PER_COMMIT
    waiting(service, [bound * 2, 10, 10])
    assert [m.mid for m in service._take(0.0)] == [1]
    assert [m.mid for m in service._take(0.0)] == [2, 3]
    store.close()


def test_the_decode_worker_takes_batches_and_leaves_single_events_here() -> None:
    def messages(size: int, count: int) -> list[IncomingMessage]:
        return [IncomingMessage("careflow/v1/gw-1/batch", b"x" * size, mid, 1, 0)
                for mid in range(1, count + 1)]

    bound = service_module.WORKER_MIN_MESSAGE_BYTES
    assert not _worth_a_worker(messages(210, 500))  # one heartbeat per message
    assert _worth_a_worker(messages(21_000, 20))  # batches of a hundred
    assert _worth_a_worker(messages(bound, 3))
    assert not _worth_a_worker(messages(bound - 1, 3))
