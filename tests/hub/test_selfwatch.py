"""The hub watches itself, and a dead man's switch lets the outside notice a dead hub."""

from __future__ import annotations

from pathlib import Path

from careflow.hub.alerting import AlertStage
from careflow.hub.notify import load_channels
from careflow.hub.rules import load_rules
from careflow.hub.selfwatch import DeadMansSwitch, self_problems
from careflow.hub.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver, wait_until

ROOT = Path(__file__).parents[2]
M = 60_000


def test_it_names_each_problem_of_the_hub_itself() -> None:
    healthy = dict(now_ms=100 * M, connected=True, disconnected_since_ms=None,
                   last_event_ms=99 * M, started_ms=0, failed_notifications=0,
                   store_errors_recent=0)
    assert self_problems(**healthy) == {}
    assert set(self_problems(**{**healthy, "connected": False,
                                "disconnected_since_ms": 98 * M})) == {"hub-broker-down"}
    assert self_problems(**{**healthy, "connected": False,
                            "disconnected_since_ms": 100 * M - 1000}) == {}  # within grace
    assert set(self_problems(**{**healthy, "last_event_ms": 80 * M})) == {"hub-no-events"}
    assert set(self_problems(**{**healthy, "failed_notifications": 2})) == {
        "hub-notifications-failing"}
    assert set(self_problems(**{**healthy, "store_errors_recent": 1})) == {"hub-store-failing"}
    assert set(self_problems(**{**healthy, "influx_failing_since_ms": 94 * M})) == {
        "hub-influx-failing"}
    assert self_problems(**{**healthy, "influx_failing_since_ms": 99 * M}) == {}  # grace


def test_it_raises_and_clears_its_own_incidents_with_notifications(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    stage = AlertStage(store, load_rules([ROOT / "rules"]), channels)
    stage.check_self({"hub-broker-down": "disconnected for 90s"}, now_ms=10 * M)
    stage.check_self({"hub-broker-down": "disconnected for 91s"}, now_ms=10 * M + 1000)
    (incident,) = store.incidents()
    assert (incident.gateway, incident.rule, incident.state) == ("careflow-hub",
                                                                   "hub-broker-down", "open")
    assert [n.channel for n in store.notifications()] == ["oncall"]
    stage.check_self({}, now_ms=11 * M)
    assert store.incident(incident.id).state == "resolved"  # type: ignore[union-attr]


def test_it_pings_a_dead_mans_switch_on_an_interval(http_receiver: HttpReceiver) -> None:
    switch = DeadMansSwitch(f"http://127.0.0.1:{http_receiver.port}/ping/abc", interval_s=0.2)
    switch.start()
    try:
        wait_until(lambda: len(http_receiver.requests) >= 3, timeout_s=5, what="three pings")
    finally:
        switch.stop()
    assert switch.failures == 0
    assert {(method, path) for method, path, _, _ in http_receiver.requests} == {
        ("GET", "/ping/abc")}
