"""Grouping, repeats and routing by site on the real store, sender and HTTP receiver, with an
injected clock (the stage's `now_ms` and the sender's `deliver_due(now_ms)`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from careflow.core import clock
from careflow.core.errors import ConfigError
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import NotificationSender, load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import StoredEvent
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver
from tests.hub.conftest import batch_of

RULES = """
rules:
  - name: gateway-offline
    kind: absence
    only_gateways: true
    grace: 2
    severity: critical
  - name: device-silent
    kind: absence
    grace: 2
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
"""
S, M, H = 1000, 60_000, 3_600_000


def hook(receiver: HttpReceiver, path: str) -> str:
    return f"json://127.0.0.1:{receiver.port}/{path}"


def setup(tmp_path: Path, receiver: HttpReceiver, rules: str = RULES,
          **extra: str) -> tuple[SqliteStore, AlertStage, NotificationSender]:
    (tmp_path / "r.yaml").write_text(rules)
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": hook(receiver, "oncall"),
                              "CAREFLOW_CHANNEL_OPS": hook(receiver, "ops"), **extra})
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), channels)
    return store, stage, NotificationSender(SqliteStore(tmp_path / "db"), channels)


def feed(store: SqliteStore, stage: AlertStage, events: list[dict[str, object]],
         at_ms: int) -> list[StoredEvent]:
    stored = store.append(batch_of(events, received_ms=at_ms)).stored
    assert len(stored) == len(events), "an event of the test was refused"
    stage.handle(stored, now_ms=at_ms)
    return stored


def paths(receiver: HttpReceiver) -> list[str]:
    return [path for _, path, _, _ in receiver.requests]


def test_it_announces_a_gateway_outage_with_50_devices_in_one_message(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    store, stage, sender = setup(tmp_path, http_receiver)
    t0 = clock.now_ms() + 5 * S  # the events, stamped now, are in its past
    gateway = Stamper(gateway="gw-1", device="gw-1")
    devices = [Stamper(gateway="gw-1", device=f"dev-{n:02}") for n in range(50)]
    feed(store, stage, [s.stamp("heartbeat", {"interval_s": 60}) for s in (gateway, *devices)],
         t0)
    stage.tick(t0 + 121 * S)  # two missed heartbeats of the gateway and all 50 devices
    assert store.count_incidents() == 52  # every silence is recorded (the gateway: twice)
    for offset in (121 * S, 160 * S, 10 * M):  # past group_wait, and well after
        sender.deliver_due(t0 + offset)
    assert paths(http_receiver) == ["/oncall"]  # one message: the gateway; the devices inhibited
    assert "gw-1" in http_receiver.bodies[0]["title"]


def test_it_holds_a_second_wave_for_group_interval_and_repeats_after_repeat_interval(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    store, stage, sender = setup(tmp_path, http_receiver)
    t0 = clock.now_ms() + 5 * S  # the events, stamped now, are in its past
    doors = [Stamper(gateway="gw-1", device=f"door-{n:02}") for n in range(53)]
    feed(store, stage, [d.stamp("status", {"state": "ok", "battery_pct": 5})
                        for d in doors[:50]], t0)
    assert sender.deliver_due(t0 + 29_999) == 0  # group_wait (30 s, the default)
    assert sender.deliver_due(t0 + 30 * S) == 50
    (first,) = http_receiver.bodies
    assert first["title"].startswith("[50 alerts] gw-1")
    last_sent = max(n.sent_ms or 0 for n in store.notifications(states=("sent",), limit=100))

    feed(store, stage, [d.stamp("status", {"state": "ok", "battery_pct": 4})
                        for d in doors[50:]], t0 + M)
    fall = Stamper(gateway="gw-1", device="fall-1")
    feed(store, stage, [fall.stamp("alert", {"kind": "fall", "state": "raised"})], t0 + M)
    assert sender.deliver_due(t0 + M) == 1  # the care alarm never waits, even in a held group
    assert paths(http_receiver) == ["/ops", "/oncall"]
    held = store.notifications(states=("pending",))
    assert len(held) == 3 and {n.next_attempt_ms for n in held} == {last_sent + 5 * M}
    assert sender.deliver_due(last_sent + 5 * M - 1) == 0
    assert sender.deliver_due(last_sent + 5 * M) == 3
    assert paths(http_receiver) == ["/ops", "/oncall", "/ops"]
    assert http_receiver.bodies[-1]["title"].startswith("[3 alerts] gw-1")

    acked = next(i for i in store.incidents(limit=100) if i.device == "door-00")
    store.acknowledge_incident(acked.id, by="kari", at_ms=t0 + 2 * M)
    store.resolve_incident(next(i.id for i in store.incidents(limit=100) if i.device == "fall-1"),
                           by="kari", at_ms=t0 + 2 * M)
    stage.tick(t0 + 4 * H - 1)
    assert sender.deliver_due(t0 + 4 * H - 1) == 0
    stage.tick(t0 + 4 * H)  # 49 open and unacknowledged of the first wave are due
    stage.tick(t0 + 4 * H + 250)  # each repeat is recorded once
    assert sender.deliver_due(t0 + 4 * H + 250) == 49
    repeat = http_receiver.bodies[-1]
    assert repeat["title"].startswith("[49 alerts] gw-1: [WARNING] STILL OPEN, NOT ACKNOWLEDGED")
    assert "door-00" not in repeat["message"]  # acknowledged: no repeat
    stage.tick(t0 + 4 * H + M)  # the second wave's turn
    assert sender.deliver_due(t0 + 4 * H + M) == 3
    stage.tick(t0 + 8 * H + M)
    assert sender.deliver_due(t0 + 8 * H + M) == 52  # every 4 h while open: both waves now
    assert len(http_receiver.requests) == 6  # 2 waves, 1 care alarm, 3 rounds of repeats


ROUTED = RULES + """
routing:
  routes:
    - match: {site: "north-*", severity: critical}
      channels: [north]
      escalation: north-duty
    - match: {kind: door-contact}
      channels: [facility]
      escalation: none
escalation:
  - name: north-duty
    steps: [{after: 1m, channels: [north_lead]}]
  - severity: critical
    steps: [{after: 5m, channels: [ops]}]
"""


def test_it_routes_and_escalates_by_site_and_kind(tmp_path: Path,
                                                  http_receiver: HttpReceiver) -> None:
    routed = {f"CAREFLOW_CHANNEL_{n.upper()}": hook(http_receiver, n)
              for n in ("north", "north_lead", "facility")}
    store, stage, sender = setup(tmp_path, http_receiver, ROUTED, **routed)
    t0 = clock.now_ms() + 5 * S  # the events, stamped now, are in its past
    north = Stamper(gateway="gw-n", device="gw-n")
    door = Stamper(gateway="gw-s", device="door-1")
    site = {"action": "added", "kind": "gateway"}
    old = north.stamp("provision", {**site, "labels": {"site": "south-9"}})
    old["time"] = "2020-01-01T00:00:00.000Z"  # an older declaration replayed late loses
    feed(store, stage, [north.stamp("provision", {**site, "labels": {"site": "north-3"}}), old,
                        door.stamp("provision", {"action": "added", "kind": "door-contact"})],
         t0)
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), stage.channels)  # a restart
    alarms = [Stamper(gateway=g, device="fall-1").stamp("alert", {"kind": "fall",
                                                                  "state": "raised"})
              for g in ("gw-n", "gw-s")]
    feed(store, stage, [*alarms, door.stamp("status", {"state": "ok", "battery_pct": 3})], t0 + S)
    for now in (t0 + S, t0 + 40 * S, t0 + 2 * M, t0 + 6 * M):
        stage.tick(now)
        sender.deliver_due(now)
    assert sorted(paths(http_receiver)) == sorted([
        "/north", "/oncall", "/facility",  # site north-3 (newest); default; door-contact
        "/north_lead",  # the north-duty policy after 1 m
        "/ops",  # gw-s's alarm walks the default critical policy after 5 m
    ])
    facility = next(b for _, p, b, _ in http_receiver.requests if p == "/facility")
    assert "door-1" in facility["message"]


def test_it_refuses_to_start_when_a_route_has_no_channel_url(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    with pytest.raises(ConfigError, match=r"route 1 \(.*r.yaml:\d+\) sends to channel 'north', "
                                          r"which has no URL: set CAREFLOW_CHANNEL_NORTH"):
        setup(tmp_path, http_receiver, ROUTED,
              CAREFLOW_CHANNEL_NORTH_LEAD=hook(http_receiver, "lead"))
