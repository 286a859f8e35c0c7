"""Routing and grouping decisions (pure, hypothesis) and the rules' `routing:` section."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.core.errors import ConfigError
from careflow.hub.alerting.routing import (
    DEFAULT_ROUTE,
    Reminder,
    decide,
    firing_send_at,
    reachable_channels,
    reminder_due,
)
from careflow.hub.alerting.rules import Route, RouteMatch, Routing, load_rules

LABELS = ("severity", "rule", "site", "gateway", "device", "kind")
values = st.sampled_from(["critical", "warning", "north-1", "south-2", "gw-1", "door-1", ""])
patterns = st.one_of(st.just("*"), values.filter(bool), st.sampled_from(["north-*", "*-1", "gw-?"]))
matches = st.builds(RouteMatch, **{name: patterns for name in LABELS})
routes = st.builds(Route, match=matches,
                   channels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)
                   .map(tuple), escalation=st.sampled_from([None, "none", "p"]))


@given(st.lists(routes, max_size=6), st.fixed_dictionaries({n: values for n in LABELS}))
def test_it_picks_the_first_matching_route_or_the_default(routes: list[Route],
                                                          labels: dict[str, str]) -> None:
    decision = decide(Routing(routes=tuple(routes)), labels, {"p": (), "critical": ()})
    expected = next((i for i, r in enumerate(routes) if all(
        fnmatch.fnmatchcase(labels[n], getattr(r.match, n)) for n in LABELS)), DEFAULT_ROUTE)
    assert decision.route == expected
    if expected == DEFAULT_ROUTE:  # today's behaviour, unchanged
        assert decision.channels == (("oncall",) if labels["severity"] == "critical"
                                     else ("ops",))
        assert decision.escalation == ("critical" if labels["severity"] == "critical" else None)
    else:
        route = routes[expected]
        assert decision.channels == route.channels
        assert decision.escalation == {"none": None, None: (
            "critical" if labels["severity"] == "critical" else None)}.get(
                route.escalation, route.escalation)
    assert (decision.group_wait_ms, decision.group_interval_ms,
            decision.repeat_interval_ms) == (30_000, 300_000, 4 * 3_600_000)


@given(now=st.integers(0, 10**7), critical=st.booleans(), wait=st.integers(0, 60_000),
       interval=st.integers(1, 600_000), last=st.none() | st.integers(0, 10**7),
       pending=st.none() | st.integers(0, 10**7))
def test_it_never_sends_a_group_more_often_than_its_interval(
    now: int, critical: bool, wait: int, interval: int, last: int | None, pending: int | None
) -> None:
    at = firing_send_at(now_ms=now, critical=critical, group_wait_ms=wait,
                        group_interval_ms=interval, last_sent_ms=last, pending_at_ms=pending)
    if critical:
        assert at == now  # care alarms never wait
        return
    assert at >= now
    if pending is not None:
        assert at == max(now, pending)  # joins the batch that waits: one message
    elif last is not None and now - last < interval:
        assert at == last + interval
    else:
        assert at == now + wait


@given(steps=st.lists(st.integers(0, 10_000), max_size=3).map(lambda s: tuple(sorted(s))),
       state=st.sampled_from(["open", "acknowledged", "resolved"]), sent=st.integers(0, 8),
       elapsed=st.integers(0, 200_000), repeat=st.integers(0, 50_000))
def test_it_reminds_only_open_incidents_and_never_in_a_burst(
    steps: tuple[int, ...], state: str, sent: int, elapsed: int, repeat: int
) -> None:
    due = reminder_due(steps, sent=sent, state=state, triggered_ms=0, now_ms=elapsed,
                       repeat_interval_ms=repeat)
    if state != "open":
        assert due is None
    elif sent < len(steps):  # the escalation policy covers it: no repeats meanwhile
        assert due == (Reminder.ESCALATE if elapsed >= steps[sent] else None)
    elif due is Reminder.REPEAT:
        base = steps[-1] if steps else 0
        done = sent - len(steps)
        # the (done+1)-th repeat slot has come, and the next one has not: one message a slot
        assert base + (done + 1) * repeat <= elapsed < base + (done + 2) * repeat
    elif due is Reminder.SKIP:
        assert repeat > 0
    else:
        assert due is None and (repeat == 0 or elapsed < (steps[-1] if steps else 0) + (
            sent - len(steps) + 1) * repeat)


ROUTING = """
rules:
  - name: care-alarm
    kind: event
routing:
  group_wait: 10s
  routes:
    - match: {site: "north-*", severity: critical}
      channels: [north]
      escalation: north-duty
    - match: {severity: warning}
      channels: [facility]
      repeat_interval: 1h
escalation:
  - name: north-duty
    steps: [{after: 1m, channels: [north_lead]}]
"""


def test_it_loads_routes_with_their_lines_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(ROUTING)
    rules = load_rules([tmp_path])
    assert rules.routing.group_wait == 10_000 and rules.routing.group_interval == 300_000
    assert [r.channels for r in rules.routing.routes] == [("north",), ("facility",)]
    assert rules.route_origins == (f"{tmp_path}/r.yaml:8", f"{tmp_path}/r.yaml:11")
    assert set(rules.escalation) == {"north-duty"}
    # warning has a catch-all route: ops (the default) is not needed for it; critical may
    # still fall through to the default route (oncall)
    assert reachable_channels(rules.routing, "warning") == {"facility": "route 2"}
    assert reachable_channels(rules.routing, "critical") == {
        "north": "route 1", "oncall": "the default route"}


@pytest.mark.parametrize(("text", "problem"), [
    (ROUTING.replace("escalation: north-duty", "escalation: nobody"),
     r"r.yaml:8: route names escalation policy 'nobody'"),
    (ROUTING.replace("channels: [facility]", "channels: [Facility-1]"),
     r"r.yaml:11: routing: routes.1.channels.0"),
    (ROUTING.replace("group_wait: 10s", "group_wait: soon"), r"r.yaml:5: routing: group_wait"),
    (ROUTING.replace("  - name: north-duty", "  - name: north-duty\n    severity: critical"),
     r"either `severity:`"),
])
def test_it_names_file_and_line_of_a_bad_route(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_rules([tmp_path])


def test_it_refuses_two_routing_sections(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ROUTING)
    (tmp_path / "b.yaml").write_text("routing:\n  group_wait: 1s\n")
    with pytest.raises(ConfigError, match=r"b.yaml:1: `routing:` is already declared at .*a.yaml"):
        load_rules([tmp_path])
