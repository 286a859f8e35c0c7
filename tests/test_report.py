"""The management summary's pure core (careflow.hub.report.summary): uptime walking, mean times, days."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.report.html_page import format_duration, nice_ceiling
from careflow.hub.report.summary import DAY_MS, build_report, day_starts, online_ms, sites_of
from careflow.hub.store.records import DeviceRecord, Incident, PresenceChange, StoredEvent

H = 3_600_000
START, END = 10 * DAY_MS, 17 * DAY_MS  # a week, on UTC midnights


def change(gateway: str, state: str, at_ms: int, pos: int = 0) -> PresenceChange:
    return PresenceChange(pos, gateway, state, 1, "boot-1", at_ms, None)


def provision(gateway: str, device: str, at_ms: int, pos: int, **data: object) -> StoredEvent:
    body = {"type": "provision", "data": {"action": "added", **data}}
    return StoredEvent(pos, f"ev-{pos}", gateway, device, "provision", "", at_ms, at_ms,
                       "boot-1", pos, json.dumps(body))


def device(gateway: str, name: str, last_seen_ms: int) -> DeviceRecord:
    return DeviceRecord(gateway, name, 0, last_seen_ms, 1, last_seen_ms, "heartbeat", "b", 1, 0, 0)


def incident(id_: int, rule: str, at_ms: int, ack_s: float | None = None,
             resolve_s: float | None = None, severity: str = "warning") -> Incident:
    return Incident(id_, rule, "gw-1", "gw-1", severity, "open", "", "", at_ms,
                    at_ms + int(ack_s * 1000) if ack_s is not None else None, None,
                    at_ms + int(resolve_s * 1000) if resolve_s is not None else None, None)


@pytest.mark.parametrize(("changes", "expected"), [
    ([], (0, 0)),  # never announced: unknown, not down
    ([(0, True)], (7 * DAY_MS, 7 * DAY_MS)),  # online since before the window
    ([(0, False)], (0, 7 * DAY_MS)),
    ([(0, True), (START + DAY_MS, False), (START + 2 * DAY_MS, True)], (6 * DAY_MS, 7 * DAY_MS)),
    ([(START + DAY_MS, True)], (6 * DAY_MS, 6 * DAY_MS)),  # installed mid-window
    ([(START, True), (END, False)], (7 * DAY_MS, 7 * DAY_MS)),  # a change at the end is outside
    ([(END + 1, False), (0, True)], (7 * DAY_MS, 7 * DAY_MS)),  # order does not matter
])
def test_it_walks_presence_intervals_within_the_window(
        changes: list[tuple[int, bool]], expected: tuple[int, int]) -> None:
    assert online_ms(changes, start_ms=START, end_ms=END) == expected


@given(st.lists(st.tuples(st.integers(0, 30 * DAY_MS), st.booleans()), max_size=30),
       st.integers(0, 30 * DAY_MS), st.integers(1, 10 * DAY_MS))
def test_it_keeps_uptime_between_0_and_100_percent(
        changes: list[tuple[int, bool]], start_ms: int, length_ms: int) -> None:
    up, known = online_ms(changes, start_ms=start_ms, end_ms=start_ms + length_ms)
    assert 0 <= up <= known <= length_ms
    if changes and min(at for at, _ in changes) <= start_ms:
        assert known == length_ms  # the state is known throughout once it was known at the start


@given(st.lists(st.integers(0, 30 * DAY_MS), min_size=1, max_size=30),
       st.integers(0, 30 * DAY_MS), st.integers(1, 10 * DAY_MS))
def test_it_reads_100_percent_when_every_change_says_online(
        times: list[int], start_ms: int, length_ms: int) -> None:
    up, known = online_ms([(at, True) for at in times], start_ms=start_ms,
                          end_ms=start_ms + length_ms)
    assert up == known


@given(st.lists(st.tuples(st.integers(0, 30 * DAY_MS), st.booleans()), max_size=30),
       st.integers(0, 20 * DAY_MS), st.integers(1, 5 * DAY_MS), st.integers(1, 5 * DAY_MS))
def test_it_adds_up_over_adjacent_windows(changes: list[tuple[int, bool]], start_ms: int,
                                          first_ms: int, second_ms: int) -> None:
    middle, end = start_ms + first_ms, start_ms + first_ms + second_ms
    a = online_ms(changes, start_ms=start_ms, end_ms=middle)
    b = online_ms(changes, start_ms=middle, end_ms=end)
    assert online_ms(changes, start_ms=start_ms, end_ms=end) == (a[0] + b[0], a[1] + b[1])


def test_it_takes_each_gateways_newest_declared_site() -> None:
    sites = sites_of([
        provision("gw-1", "gw-1", 100, 1, labels={"site": "oslo-12"}),
        provision("gw-1", "door-1", 300, 3, labels={"site": "bergen-3"}),  # moved: newest wins
        provision("gw-1", "fall-1", 200, 2, labels={"site": "oslo-12"}),
        provision("gw-2", "gw-2", 100, 4, kind="gateway"),  # no labels: unassigned later
    ])
    assert sites == {"gw-1": "bergen-3"}


def test_it_builds_the_summary_of_a_week() -> None:
    changes = [change("gw-1", "online", 0, 1), change("gw-2", "online", 0, 2),
               change("gw-3", "online", 0, 3), change("gw-3", "offline", START + 3 * DAY_MS + DAY_MS // 2, 4)]
    provisions = [provision("gw-1", "gw-1", START + H, 1, kind="gateway", labels={"site": "oslo"}),
                  provision("gw-2", "gw-2", 0, 2, kind="gateway", labels={"site": "oslo"}),
                  provision("gw-3", "gw-3", 0, 3, kind="gateway", labels={"site": "bergen"}),
                  provision("gw-1", "door-1", START + 2 * H, 4, kind="door-sensor")]
    devices = [device("gw-1", "gw-1", END - 1), device("gw-1", "door-1", END - 1),
               device("gw-2", "gw-2", END - 1), device("gw-3", "gw-3", START + 4 * DAY_MS),
               device("gw-4", "gw-4", START - 1), device("gw-4", "old-1", START - 1)]
    incidents = [incident(1, "error-burst", START + H, ack_s=120, resolve_s=1800),
                 incident(2, "gateway-offline", START + 3 * DAY_MS, ack_s=300, resolve_s=3600,
                          severity="critical"),
                 incident(3, "error-burst", START + 5 * DAY_MS),
                 incident(4, "error-burst", START - DAY_MS, ack_s=60, resolve_s=DAY_MS / 1000 + 60)]
    report = build_report(start_ms=START, end_ms=END, changes=changes, incidents=incidents,
                          provisions=provisions, devices=devices)

    sites = {s.site: s.pct for s in report.sites}
    assert sites["oslo"] == 100
    assert sites["bergen"] == pytest.approx(50)
    assert sites["unassigned"] is None  # gw-4 never announced its presence
    assert report.uptime_pct == pytest.approx(100 * 2.5 / 3)
    assert [(i.rule, i.severity, i.count) for i in report.incidents] == [
        ("error-burst", "warning", 2), ("gateway-offline", "critical", 1)]
    assert report.incidents_total == 3
    assert report.mtta_s == pytest.approx((120 + 300) / 2)  # #4 was acknowledged before
    assert report.mttr_s == pytest.approx((1800 + 3600 + DAY_MS / 1000 + 60) / 3)
    assert len(report.per_day) == 7
    assert [d.incidents for d in report.per_day] == [1, 0, 0, 1, 0, 1, 0]
    assert report.per_day[3].critical == 1 and report.per_day[3].mttr_s == 3600
    assert report.provisioned == {"door-sensor": 1, "gateway": 1}
    assert (report.devices_total, report.devices_active) == (6, 4)
    assert json.loads(json.dumps(report.as_dict()))["sites"][0]["site"] == "bergen"


def test_it_counts_days_that_overlap_the_window() -> None:
    assert day_starts(START + H, START + H + 1) == [START]
    assert day_starts(START, END) == [START + n * DAY_MS for n in range(7)]
    assert day_starts(START + H, END + H) == [START + n * DAY_MS for n in range(8)]


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (42, "42 s"), (150, "2 min"), (3600, "1 h"), (3 * 3600 + 1200, "3 h 20 min"),
    (50 * 3600, "2 d 2 h"), (3 * 86400, "3 d"),
])
def test_it_says_durations_the_way_people_do(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("value", "top"), [(0, 1), (0.3, 0.5), (1, 1), (4, 5), (384, 500),
                                            (2100, 2500), (99, 100)])
def test_it_rounds_axis_tops_up_to_nice_numbers(value: float, top: float) -> None:
    assert nice_ceiling(value) == pytest.approx(top)
