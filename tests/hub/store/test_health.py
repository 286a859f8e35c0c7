"""Health: the hub's last report, for `careflow status` in another process."""

from __future__ import annotations

from careflow.core import clock
from tests.hub.store.conftest import Adapter


def test_it_keeps_the_last_health_report_with_when_it_was_written(adapter: Adapter) -> None:
    hub, status = adapter.open(), adapter.open()
    assert status.read_health() is None
    before = clock.now_ms()
    hub.write_health({"connected": True, "events_stored": 1})
    hub.write_health({"connected": False, "events_stored": 2})
    health = status.read_health()
    assert health is not None
    written_ms, report = health
    assert report == {"connected": False, "events_stored": 2}
    assert before <= written_ms <= clock.now_ms()
