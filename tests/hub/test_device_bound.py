"""A gateway cannot grow the registry and the rules' state without end: new devices beyond
CAREFLOW_MAX_DEVICES_PER_GATEWAY are dead-lettered with their reason, and the hub alerts about
itself; a care alarm among them is announced, never silently dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.selfwatch import (
    HUB_DEVICE,
    HUB_GATEWAY,
    OVER_BOUND_WINDOW_MS,
    self_problems,
    tally_refusals,
)
from careflow.hub.fleet.device_registry import beyond_bound
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver, Mosquitto, RunningHub, make_settings, wait_until
from tests.hub.conftest import batch_of, publish
from tests.hub.test_alerting_e2e import RULES

T0 = 1_800_000_000_000
names = st.sampled_from(["gw-a", "gw-b", "d1", "d2", "d3", "d4", "d5", "d6"])


@given(new=st.dictionaries(st.sampled_from(["gw-a", "gw-b"]),
                           st.lists(names, unique=True, max_size=8), max_size=2),
       registered=st.dictionaries(st.sampled_from(["gw-a", "gw-b"]), st.integers(0, 8)),
       bound=st.integers(0, 6))
def test_it_admits_the_first_newcomers_into_the_room_left_and_never_the_gateway_itself(
    new: dict[str, list[str]], registered: dict[str, int], bound: int,
) -> None:
    refused = beyond_bound(new, registered, bound=bound)
    for gateway, devices in new.items():
        assert (gateway, gateway) not in refused
        others = [d for d in devices if d != gateway]
        admitted = [d for d in others if (gateway, d) not in refused]
        room = max(0, bound - registered.get(gateway, 0))
        assert admitted == others[:room]  # first come, and never beyond the bound
    assert all(device in new[gateway] for gateway, device in refused)


def _events(gateway: str, devices: list[str]) -> list[dict[str, object]]:
    return [Stamper(gateway=gateway, device=d).stamp("heartbeat", {"interval_s": 60})
            for d in devices]


def test_the_store_dead_letters_new_devices_beyond_the_bound_with_the_reason(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "db", max_devices_per_gateway=3)
    sos = Stamper(gateway="gw", device="sos-9").stamp("alert", {"kind": "sos", "state": "raised"})
    result = store.append(batch_of([*_events("gw", ["gw", "d1", "d2", "d3", "d4"]), sos,
                                    *_events("gw-other", ["d1", "d2", "d3"])]))
    assert sorted((d.gateway, d.device) for d in store.devices()) == [
        ("gw", "d1"), ("gw", "d2"), ("gw", "d3"), ("gw", "gw"),
        ("gw-other", "d1"), ("gw-other", "d2"), ("gw-other", "d3")]
    assert [(o.gateway, o.device, o.type, o.alarm) for o in result.over_bound] == [
        ("gw", "d4", "heartbeat", False), ("gw", "sos-9", "alert", True)]
    assert {e.device for e in result.stored} == {"gw", "d1", "d2", "d3"}
    assert result.dead_lettered == 2
    letters = store.dead_letters(code="too_many_devices")
    assert len(letters) == 2
    assert "CAREFLOW_MAX_DEVICES_PER_GATEWAY=3" in letters[0].reason
    assert "'gw'" in letters[0].reason
    assert b'"sos-9"' in letters[0].payload  # the refused alarm itself is kept

    # known devices go on; a restarted hub (a new store) counts the registry, not its memory
    again = SqliteStore(tmp_path / "db", max_devices_per_gateway=3)
    later = again.append(batch_of(_events("gw", ["d1", "d5"]), received_ms=2_000))
    assert [e.device for e in later.stored] == ["d1"]
    assert [o.device for o in later.over_bound] == ["d5"]


def test_the_self_alert_lasts_while_refusals_go_on_and_names_refused_alarms() -> None:
    tally = tally_refusals(None, ["gw-x", "gw-x"], alarms=1, now_ms=T0)
    problems = self_problems(now_ms=T0 + 1000, connected=True, disconnected_since_ms=None,
                             last_event_ms=T0, started_ms=T0, failed_notifications=0,
                             store_errors_recent=0, refusals=tally, max_devices_per_gateway=1000)
    detail = problems["hub-devices-over-bound"]
    assert "2 event(s)" in detail and "gw-x" in detail and "1 of them CARE ALARMS" in detail
    assert "CAREFLOW_MAX_DEVICES_PER_GATEWAY" in detail and "1000" in detail
    quiet = T0 + OVER_BOUND_WINDOW_MS
    assert "hub-devices-over-bound" not in self_problems(
        now_ms=quiet, connected=True, disconnected_since_ms=None, last_event_ms=quiet,
        started_ms=T0, failed_notifications=0, store_errors_recent=0, refusals=tally,
        max_devices_per_gateway=1000)
    fresh = tally_refusals(tally, ["gw-y"], alarms=0, now_ms=quiet)
    assert fresh is not None and (fresh.since_ms, fresh.events, fresh.alarms) == (quiet, 1, 0)


@pytest.mark.broker
def test_a_live_hub_refuses_an_invented_device_and_announces_its_care_alarms(
    mosquitto: Mosquitto, tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """Mosquitto, the hub, its notification sender and a real HTTP receiver (json://): a care
    alarm from a device beyond the bound is dead-lettered, never registered nor evaluated, and
    on-call hears of it; a second one is announced again at once."""
    channels = load_channels({
        "CAREFLOW_CHANNEL_ONCALL": f"json://127.0.0.1:{http_receiver.port}/oncall",
        "CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/ops"})
    (tmp_path / "r.yaml").write_text(RULES.replace("kind: event\n", "kind: event\n"
                                                   "    severity: critical\n"))
    rules = load_rules([tmp_path / "r.yaml"])
    settings = make_settings(tmp_path / "data", mosquitto.url,
                             CAREFLOW_MAX_DEVICES_PER_GATEWAY="2")
    hub = RunningHub(settings, rules, channels=channels).start()
    try:
        publish(mosquitto, _events("gw-z", ["gw-z", "door-1", "door-2"]))
        wait_until(lambda: len(hub.store.devices()) == 3, what="the gateway and two devices")
        sos = Stamper(gateway="gw-z", device="sos-3")
        publish(mosquitto, [sos.stamp("alert", {"kind": "sos", "state": "raised"})])
        wait_until(lambda: any("hub-devices-over-bound" in b["title"]
                               for b in http_receiver.bodies), what="the hub's own alert")
        (alert,) = [b for b in http_receiver.bodies if "hub-devices-over-bound" in b["title"]]
        assert alert["title"].startswith("[CRITICAL]")
        assert "1 of them CARE ALARMS" in alert["message"]
        (letter,) = hub.store.dead_letters(code="too_many_devices")
        assert b"sos-3" in letter.payload
        assert [d.device for d in hub.store.devices()] == ["door-1", "door-2", "gw-z"]
        assert not [i for i in hub.store.incidents(states=None) if i.rule == "care-alarm"]
        assert ("gw-z", "sos-3") not in {subject for _, subject, _ in hub.alerts.evaluator.active()}

        other = Stamper(gateway="gw-z", device="sos-4")
        publish(mosquitto, [other.stamp("alert", {"kind": "sos", "state": "raised"})])
        wait_until(lambda: any("RAISED AGAIN" in b["title"] for b in http_receiver.bodies),
                   what="the second refused alarm announced again")
        again = next(b for b in http_receiver.bodies if "RAISED AGAIN" in b["title"])
        assert "2 of them CARE ALARMS" in again["message"]
        assert http_receiver.requests[-1][1] == "/oncall"
        own = hub.store.unresolved_incident(rule="hub-devices-over-bound", gateway=HUB_GATEWAY,
                                            device=HUB_DEVICE)
        assert own is not None and own.raises == 2
    finally:
        hub.stop()


def test_a_refused_care_alarm_is_announced_after_a_kill_before_the_self_check(
    tmp_path: Path,
) -> None:
    """The hub stores an over-bound care alarm as a dead letter and acknowledges it; the self
    check that announces it runs up to a second later. Killed in between, the restarted hub
    (a new store, a new stage, no memory of the refusal) still announces it, once."""
    store = SqliteStore(tmp_path / "db", max_devices_per_gateway=1)
    rules = load_rules([])
    AlertStage(store, rules)  # the hub ran with its alert stage (its cursors are set)
    sos = Stamper(gateway="gw", device="sos-9").stamp("alert", {"kind": "sos", "state": "raised"})
    result = store.append(batch_of([*_events("gw", ["gw", "d1"]), sos]))
    assert [o.alarm for o in result.over_bound] == [True]  # committed and acknowledged; killed
    store.close()

    store = SqliteStore(tmp_path / "db", max_devices_per_gateway=1)
    stage = AlertStage(store, rules)
    stage.check_self({}, T0)  # the restarted hub's first self-check: all well, as it knows
    own = store.unresolved_incident(rule="hub-devices-over-bound", gateway=HUB_GATEWAY,
                                    device=HUB_DEVICE)
    assert own is not None and "CARE ALARM" in own.detail and "sos-9" in own.detail
    stage.check_self({}, T0 + 1000)  # still open while such refusals are recent; not twice
    assert store.incident(own.id).state == "open"  # type: ignore[union-attr]
    AlertStage(store, rules).check_self({}, T0 + 2000)  # killed again: nothing new to say
    ours = [i for i in store.incidents(states=None) if i.rule == "hub-devices-over-bound"]
    assert [(i.id, i.raises) for i in ours] == [(own.id, own.raises)]


def test_a_flood_of_invented_devices_neither_grows_the_dead_letters_nor_hides_an_alarm(
    tmp_path: Path,
) -> None:
    """Thousands of heartbeats from invented devices stay within the dead-letter bounds (only
    refused care alarms wait for their announcement), and an alarm behind them is announced
    at the next self-check."""
    store = SqliteStore(tmp_path / "db", max_devices_per_gateway=1, dead_letter_max_rows=100)
    stage = AlertStage(store, load_rules([]))
    store.append(batch_of(_events("gw", ["gw", "d1"])))
    for start in range(0, 3000, 500):
        store.append(batch_of(_events("gw", [f"x{n}" for n in range(start, start + 500)])))
    sos = Stamper(gateway="gw", device="sos-9").stamp("alert", {"kind": "sos", "state": "raised"})
    store.append(batch_of([sos]))
    store.append(batch_of(_events("gw", [f"y{n}" for n in range(500)])))
    assert store.dead_letter_count() <= 100 + 500 + 1  # the bound, a commit, the alarm
    stage.check_self({}, T0)
    own = store.unresolved_incident(rule="hub-devices-over-bound", gateway=HUB_GATEWAY,
                                    device=HUB_DEVICE)
    assert own is not None and "sos-9" in own.detail


def test_the_self_check_reads_refused_alarms_without_reading_every_other_refusal(
    tmp_path: Path,
) -> None:
    """The self-check looks for refused care alarms after its cursor once a second. Thousands
    of refused heartbeats after that cursor (they stay up to the dead-letter bound) must not be
    read again at every check: the work is counted in SQLite VM steps, not timed."""
    store = SqliteStore(tmp_path / "db", max_devices_per_gateway=1)
    store.append(batch_of(_events("gw", ["gw", "d1"])))

    def steps_to_read_alarms() -> int:
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        store._conn.set_progress_handler(count, 1)  # real SQLite's own count of its work
        try:
            assert store.dead_letters_after(0, code="too_many_devices", placed_only=True) == []
        finally:
            store._conn.set_progress_handler(None, 1)
        return steps

    store.append(batch_of(_events("gw", [f"x{n}" for n in range(10)])))
    few = steps_to_read_alarms()
    for start in range(10, 5000, 1000):
        store.append(batch_of(_events("gw", [f"x{n}" for n in range(start, start + 1000)])))
    assert store.dead_letter_count() > 4000
    assert steps_to_read_alarms() < 2 * few + 100
