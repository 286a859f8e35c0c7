"""Silences and inhibition: recorded, not announced — and never a silenced subject notified."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.mute import Silence, flapping, inhibited_by, silenced_by
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.sqlite_store import SqliteStore
from tests.hub.conftest import batch_of

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
  - name: device-silent
    kind: absence
    grace: 2
"""
CHANNELS = {"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x",
            "CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/y"}
names = st.sampled_from(["gw-1", "gw-2", "door-1", "fall-1"])
patterns = st.one_of(names, st.sampled_from(["*", "gw-*", "*-1", "door-?"]))


@given(st.lists(st.builds(Silence, id=st.integers(1, 9), gateway=patterns, device=patterns,
                          rule=st.sampled_from(["*", "battery-*", "device-silent"]),
                          starts_ms=st.integers(0, 100), ends_ms=st.integers(0, 200),
                          created_by=st.just("t"), comment=st.just("c")), max_size=4),
       st.sampled_from(["battery-low", "device-silent"]), names, names, st.integers(0, 200))
def test_it_matches_silences_exactly_by_pattern_and_window(
    silences: list[Silence], rule: str, gateway: str, device: str, now: int
) -> None:
    found = silenced_by(silences, rule, gateway, device, now)
    expected = [s for s in silences if s.starts_ms <= now < s.ends_ms and all(
        matches(pattern, value)
        for pattern, value in ((s.rule, rule), (s.gateway, gateway), (s.device, device)))]
    assert (found is not None) == bool(expected)


def matches(pattern: str, value: str) -> bool:
    """A hand-written reference for the few pattern shapes generated above."""
    if pattern in ("*", value):
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return pattern == "door-?" and value.startswith("door-") and len(value) == 6


def test_it_inhibits_device_silence_behind_an_offline_gateway_only() -> None:
    assert inhibited_by(rule_kind="absence", gateway="gw", device="d", gateway_offline=True)
    assert not inhibited_by(rule_kind="absence", gateway="gw", device="gw", gateway_offline=True)
    assert not inhibited_by(rule_kind="threshold", gateway="gw", device="d",
                            gateway_offline=True)
    assert not inhibited_by(rule_kind="absence", gateway="gw", device="d", gateway_offline=False)
    # the gateway's own silence under a device rule: said already by the gateway rule
    assert inhibited_by(rule_kind="absence", gateway="gw", device="gw", gateway_offline=True,
                        gateway_announced_by="gateway-offline")


def test_it_records_a_silenced_incident_without_announcing_it(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    now = 10**13
    store.add_silence(gateway="gw-1", device="*", rule="battery-*", starts_ms=now - 1,
                      ends_ms=now + 60_000, created_by="ola", comment="battery swap")
    quiet = Stamper(gateway="gw-1", device="door-1")
    loud = Stamper(gateway="gw-2", device="door-1")
    for source in (quiet, loud):
        stored = store.append(batch_of([source.stamp("status", {"state": "ok",
                                                                 "battery_pct": 5})]))
        stage.handle(stored.stored, now_ms=now)
    assert {i.gateway for i in store.incidents()} == {"gw-1", "gw-2"}
    announced = {store.incident(n.incident_id).gateway  # type: ignore[union-attr]
                 for n in store.notifications()}
    assert announced == {"gw-2"}
    assert stage.muted == 1


def test_it_announces_the_gateway_not_each_device_behind_it(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    gateway = Stamper(gateway="gw-x")
    devices = [Stamper(gateway="gw-x", device=f"d{i}") for i in range(50)]
    stored = store.append(batch_of([s.stamp("heartbeat", {"interval_s": 60})
                                    for s in (gateway, *devices)]))
    t0 = stored.stored[0].received_ms
    stage.handle(stored.stored, now_ms=t0)
    stage.tick(t0 + 200_000)  # everyone silent for more than 2 x 60 s
    incidents = store.incidents(limit=100)
    assert len(incidents) == 51  # every silence is recorded...
    notes = store.notifications(limit=100)
    assert [store.incident(n.incident_id).device for n in notes] == ["gw-x"]  # type: ignore[union-attr]


def test_it_stops_announcing_a_flapping_condition(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))
    door = Stamper(gateway="gw-f", device="door-1")
    t = 10**13
    for swing in range(6):  # low, ok, low, ok ... every minute
        for battery in (5, 90):
            stored = store.append(batch_of([door.stamp("status", {"state": "ok",
                                                                   "battery_pct": battery})]))
            stage.handle(stored.stored, now_ms=t + swing * 60_000)
        for n in range(20):  # newer, unrelated history must not hide this source's swings
            store.open_incident(rule="battery-low", gateway="gw-other", device=f"d{swing}-{n}",
                                severity="warning", summary="s", detail="d", at_ms=t)
            store.resolve_incidents(rule="battery-low", gateway="gw-other",
                                    device=f"d{swing}-{n}", at_ms=t, by="test")
    assert store.count_incidents(states=None) == 6 + 6 * 20  # every swing is still recorded
    firing = [n for n in store.notifications(limit=100) if n.kind == "firing"]
    assert len(firing) == 3  # the fourth swing within 30 minutes is flapping
    assert stage.muted >= 3


@given(st.lists(st.integers(0, 3_600_000), max_size=10), st.integers(0, 3_600_000))
def test_it_calls_flapping_only_with_enough_recent_triggers(triggers: list[int], now: int) -> None:
    recent = [t for t in triggers if 0 <= now - t < 30 * 60_000]
    assert flapping(triggers, now_ms=now) == (len([t for t in triggers
                                                    if now - t < 30 * 60_000]) + 1 >= 4)
    if len(recent) < 3:
        assert not flapping(recent, now_ms=now)
