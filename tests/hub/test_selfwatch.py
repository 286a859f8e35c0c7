"""The hub watches itself, and a dead man's switch lets the outside notice a dead hub."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.selfwatch import (
    ALERT_LAG_BOUND_MS,
    ALERT_LAG_GRACE_MS,
    DeadMansSwitch,
    lagging_since,
    self_problems,
)
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver, heartbeat, wait_until
from tests.hub.conftest import batch_of

ROOT = Path(__file__).parents[2]
M = 60_000


def test_it_says_which_channel_fails_and_why() -> None:
    problems = self_problems(now_ms=100 * M, connected=True, disconnected_since_ms=None,
                             last_event_ms=99 * M, started_ms=0, failed_notifications=1,
                             store_errors_recent=0,
                             failing_channels={"oncall": "SMTP 535 5.7.8 Authentication failed"})
    assert "oncall: SMTP 535 5.7.8 Authentication failed" in problems["hub-notifications-failing"]


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


@given(st.lists(st.integers(0, 60_000), min_size=1, max_size=20))
def test_it_counts_lagging_time_only_while_every_check_lags(lags: list[int]) -> None:
    since: int | None = None
    for second, lag in enumerate(lags):
        since = lagging_since(since, lag_ms=lag, now_ms=second * 1000)
        run = 0
        while run <= second and lags[second - run] > ALERT_LAG_BOUND_MS:
            run += 1
        assert since == (None if run == 0 else (second - run + 1) * 1000)


def test_it_raises_an_alert_when_rule_evaluation_falls_behind_ingest(tmp_path: Path) -> None:
    """The stage measures how late it judges events (arrival to evaluation) and clock ticks; a
    lag beyond the bound for longer than the grace becomes `hub-alerts-lagging`."""
    store = SqliteStore(tmp_path / "db")
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    stage = AlertStage(store, load_rules([ROOT / "rules"]), channels)
    healthy = dict(connected=True, disconnected_since_ms=None, started_ms=0,
                   failed_notifications=0, store_errors_recent=0)

    def check(now_ms: int) -> dict[str, str]:
        lag, since = stage.lag(now_ms)
        problems = self_problems(now_ms=now_ms, last_event_ms=now_ms, alert_lag_ms=lag,
                                 alert_lagging_since_ms=since, **healthy)  # type: ignore[arg-type]
        stage.check_self(problems, now_ms)
        return problems

    t0 = 100 * M
    door = Stamper(gateway="gw", device="door")
    for second in range(0, 41):  # events judged 15 s after they arrived, for 40 s
        now = t0 + second * 1000
        stored = store.append(batch_of([heartbeat(door)], received_ms=now - 15_000)).stored
        stage.handle(stored, now_ms=now)
        stage.tick(now)
        problems = check(now)
        if second < ALERT_LAG_GRACE_MS // 1000:
            assert problems == {}
    assert "15s" in problems["hub-alerts-lagging"]
    (incident,) = store.incidents()
    assert (incident.rule, incident.severity) == ("hub-alerts-lagging", "critical")
    assert [n.channel for n in store.notifications()] == ["oncall"]

    now = t0 + 41_000
    stage.tick(now)
    assert check(now) == {}  # caught up: resolved
    assert store.incident(incident.id).state == "resolved"  # type: ignore[union-attr]
    stage.tick(now + 12_000)  # a tick 12 s late judges absences 12 s late: lagging again
    assert stage.lag(now + 12_000)[1] == now + 12_000


def test_it_withholds_the_dead_mans_ping_while_the_alert_loop_is_stuck(
    http_receiver: HttpReceiver,
) -> None:
    stuck = [True]
    switch = DeadMansSwitch(f"http://127.0.0.1:{http_receiver.port}/ping/abc", interval_s=0.1,
                            healthy=lambda: not stuck[0])
    switch.start()
    try:
        wait_until(lambda: switch.withheld >= 3, timeout_s=5, what="withheld pings")
        assert http_receiver.requests == []
        stuck[0] = False
        wait_until(lambda: len(http_receiver.requests) >= 1, timeout_s=5, what="pings again")
    finally:
        switch.stop()


def test_it_reports_how_long_the_alert_loop_has_not_ticked(tmp_path: Path) -> None:
    stage = AlertStage(SqliteStore(tmp_path / "db"), load_rules([ROOT / "rules"]))
    assert stage.stalled_ms(5 * M) == 0  # not started
    stage.tick(5 * M)
    assert stage.stalled_ms(5 * M + 250) == 250
