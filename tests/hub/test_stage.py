"""The stages after a commit: live ingest and `careflow replay` drive the one protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from careflow.edge.stamper import Stamper
from careflow.hub import replay as replay_module
from careflow.hub.app import HubService
from careflow.hub.ingest.ingress import IncomingMessage
from careflow.hub.replay import replay
from careflow.hub.stage import Committed
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import heartbeat, make_settings
from tests.hub.conftest import RecordingIngress, batch_of

T0 = 1_800_000_000_000


class Recording:
    """A stage that records what it is handed (and, told to, fails as a bug would)."""

    needs_whole_log = False

    def __init__(self, name: str, *, fails: bool = False) -> None:
        self.name = name
        self.fails = fails
        self.seen: list[tuple[list[str], int]] = []

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        self.seen.append(([event.id for event in commit.events], now_ms))
        if self.fails:
            raise RuntimeError("a bug")

    def begin(self, store: Any) -> int | None:
        return None

    def summary(self) -> list[str]:
        return [f"{self.name}: {sum(len(ids) for ids, _ in self.seen)} event(s)"]


def test_each_commit_reaches_every_stage_in_order_and_a_failing_one_holds_none(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store, clock=lambda: T0)
    service.ingress = RecordingIngress(store)  # type: ignore[assignment]
    alerts, sink = Recording("alerts", fails=True), Recording("influx")
    service.alerts, service.sink = alerts, sink  # type: ignore[assignment]
    assert [stage.name for stage in service.stages] == ["alerts", "influx"]
    events = [heartbeat(Stamper(gateway="gw-1", device="s-1")) for _ in range(3)]
    service.inbox.put(IncomingMessage("careflow/v1/gw-1/batch", json.dumps(events).encode(),
                                      1, 1, 0))
    service._step(timeout_s=0.0)
    ids = [event["id"] for event in events]
    assert alerts.seen == sink.seen == [(ids, T0)]  # the sink's turn came all the same
    assert service.counters.alert_errors == 1 and service.counters.events_stored == 3
    store.close()


def test_replay_hands_the_log_to_the_same_after_commit_on_the_logs_own_clock(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    store = SqliteStore(tmp_path / "db")
    source = Stamper(gateway="gw-1", device="s-1")
    for at in (T0, T0 + 1_000):
        store.append(batch_of([heartbeat(source) for _ in range(2)], received_ms=at))
    target = Recording("recording")
    monkeypatch.setitem(replay_module.STAGES, "recording", lambda: target)
    report = replay(store, EventFilter(), ["recording"])
    logged = [event.id for chunk in store.iter_log(EventFilter()) for event in chunk]
    assert [event_id for ids, _ in target.seen for event_id in ids] == logged
    assert target.seen[-1][1] == T0 + 1_000
    assert report.notes == ("recording: 4 event(s)",)
    store.close()
