"""Rule evaluation as a pure function of (rules, observations, ticks, now)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from careflow.core.errors import ConfigError
from careflow.hub.alerting.evaluate import Evaluator, Observation, Transition
from careflow.hub.alerting.rules import (
    AbsenceRule,
    EventRule,
    RateRule,
    ThresholdRule,
    load_rules,
)

ROOT = Path(__file__).parents[2]
S = 1000
M = 60 * S


def obs(t_ms: int, type_: str = "heartbeat", device: str = "d1", received_ms: int | None = None,
        **data: Any) -> Observation:
    return Observation("gw", device, type_, t_ms, t_ms if received_ms is None else received_ms,
                       data)


def statuses(transitions: list[Transition]) -> list[str]:
    return [f"{t.rule}:{t.status}" for t in transitions]


ABSENCE = AbsenceRule(kind="absence", name="silent", grace=2)
BATTERY = ThresholdRule.model_validate({"kind": "threshold", "name": "battery", "field":
                                        "battery_pct", "op": "<", "value": 20, "for": "10m"})
BURST = RateRule.model_validate({"kind": "rate", "name": "burst", "type": "error",
                                 "more_than": 3, "within": "5m"})
ALARM = EventRule(kind="event", name="alarm", where={"state": "raised"})


def test_it_fires_an_absence_after_grace_times_the_declared_interval_and_resolves() -> None:
    ev = Evaluator((ABSENCE,))
    ev.observe(obs(0, interval_s=60), now_ms=0)
    assert ev.tick(119 * S) == []
    assert statuses(ev.tick(121 * S)) == ["silent:firing"]
    assert ev.tick(200 * S) == []  # once
    assert statuses(ev.observe(obs(201 * S, "status", state="ok"), 201 * S)) == ["silent:resolved"]


def test_absence_keeps_one_deadline_per_source_however_many_events_arrive() -> None:
    """Memory stays proportional to the fleet, not to the event rate."""
    ev = Evaluator((ABSENCE,))
    for i in range(5000):  # a heartbeat every 10 ms for 50 s, ticking along
        ev.observe(obs(i * 10, interval_s=60), now_ms=i * 10)
        if i % 100 == 0:
            assert ev.tick(i * 10) == []
    assert len(ev._deadlines) == 1
    last = 4999 * 10
    assert ev.tick(last + 120 * S) == []  # exactly at the deadline: not yet
    assert statuses(ev.tick(last + 120 * S + 1)) == ["silent:firing"]


def test_a_shorter_interval_brings_the_absence_deadline_forward() -> None:
    ev = Evaluator((ABSENCE,))
    ev.observe(obs(0, interval_s=600), now_ms=0)  # deadline 1200 s
    ev.observe(obs(10 * S, interval_s=60), now_ms=10 * S)  # now 130 s
    assert statuses(ev.tick(131 * S)) == ["silent:firing"]


def test_it_judges_liveness_by_arrival_not_by_a_skewed_device_clock() -> None:
    ev = Evaluator((ABSENCE,))
    ev.observe(obs(-3600 * S, interval_s=60, received_ms=0), now_ms=0)  # clock an hour behind
    assert ev.tick(60 * S) == []


def test_it_fires_a_threshold_only_after_its_for_window() -> None:
    ev = Evaluator((BATTERY,))
    assert ev.observe(obs(0, "status", battery_pct=15), now_ms=0) == []
    assert ev.tick(9 * M) == []
    assert statuses(ev.tick(10 * M)) == ["battery:firing"]
    assert statuses(ev.observe(obs(11 * M, "status", battery_pct=80), 11 * M)) == [
        "battery:resolved"]


def test_it_ignores_old_readings_replayed_late() -> None:
    ev = Evaluator((BATTERY,))
    ev.observe(obs(0, "status", battery_pct=15), now_ms=0)
    assert statuses(ev.tick(10 * M)) == ["battery:firing"]
    # a reading from before the breach, delivered late, must not resolve it
    assert ev.observe(obs(-5 * M, "status", battery_pct=90), now_ms=11 * M) == []
    assert ("battery", ("gw", "d1")) in ev.firing


def test_it_counts_a_burst_within_its_window_and_lets_it_expire() -> None:
    ev = Evaluator((BURST,))
    out = [t for i in range(4) for t in ev.observe(obs(i * S, "error", code="E"), i * S)]
    assert statuses(out) == ["burst:firing"]
    assert statuses(ev.tick(6 * M)) == ["burst:resolved"]


def test_it_fires_a_care_alarm_at_once_every_time_and_clears_it() -> None:
    ev = Evaluator((ALARM,))
    assert statuses(ev.observe(obs(0, "alert", kind="fall", state="raised"), 0)) == [
        "alarm:firing"]
    assert statuses(ev.observe(obs(S, "alert", kind="fall", state="raised"), S)) == [
        "alarm:firing"]
    late = ev.observe(obs(0, "alert", device="d2", kind="sos", state="raised"), 10 * M)
    assert "delivered late" in late[0].detail
    assert statuses(ev.observe(obs(2 * S, "alert", kind="fall", state="cleared"), 2 * S)) == [
        "alarm:resolved"]


def test_it_only_watches_selected_sources() -> None:
    rule = AbsenceRule.model_validate({"kind": "absence", "name": "gw-only", "after": "1m",
                                       "select": {"gateway": "site-a-*"}})
    ev = Evaluator((rule,))
    ev.observe(Observation("site-b-1", "site-b-1", "heartbeat", 0, 0, {}), 0)
    assert ev.tick(10 * M) == []


def test_it_loads_the_shipped_rules() -> None:
    names = {r.name for r in load_rules([ROOT / "rules"]).rules}
    assert {"gateway-offline", "battery-low", "error-burst", "care-alarm"} <= names


def test_it_names_file_and_line_of_a_bad_rule(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("rules:\n  - name: ok\n    kind: event\n"
                                     "  - name: broken\n    kind: threshold\n    op: '<'\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4: rule 'broken': .*field"):
        load_rules([tmp_path])


steps = st.lists(st.one_of(
    st.tuples(st.just("obs"), st.sampled_from(["heartbeat", "status", "error", "alert"]),
              st.sampled_from(["d1", "d2"]), st.integers(-5, 30), st.integers(0, 100),
              st.sampled_from(["raised", "cleared"])),
    st.tuples(st.just("tick"), st.integers(1, 20)),
), max_size=60)


@settings(max_examples=200)
@given(steps)
def test_it_alternates_firing_and_resolved_and_never_fires_early(program: list[Any]) -> None:
    ev = Evaluator((ABSENCE, BATTERY, BURST))
    now = 0
    last: dict[tuple[str, str], str] = {}
    breach_seen: dict[str, int] = {}
    heard: dict[str, int] = {}
    for step in program:
        if step[0] == "tick":
            now += step[1] * M
            out = ev.tick(now)
        else:
            _, type_, device, offset_min, battery, _state = step
            data: dict[str, Any] = {"interval_s": 60} if type_ == "heartbeat" else {}
            if type_ == "status":
                data["battery_pct"] = battery
                if battery < 20:
                    breach_seen.setdefault(device, now + offset_min * M)
            out = ev.observe(obs(now + offset_min * M, type_, device, received_ms=now, **data),
                             now)
            heard[device] = now
        for t in out:
            key = (t.rule, t.device)
            assert last.get(key, "resolved") != t.status, f"{t.status} twice for {key}"
            last[key] = t.status
            if t.rule == "battery" and t.status == "firing":
                assert t.device in breach_seen  # never fires without a breaching reading
            if t.rule == "silent" and t.status == "firing":  # never while heard from lately
                assert now - heard[t.device] > 2 * 60 * S
