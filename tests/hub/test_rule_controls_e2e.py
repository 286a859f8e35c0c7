"""A live hub against a real Mosquitto honours `careflow rules mute/unmute/disable/enable` run as
real processes while it runs: no restart, within about a second."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from tests.conftest import (
    HttpReceiver,
    Mosquitto,
    RunningHub,
    careflow_cmd,
    make_settings,
    wait_until,
)
from tests.hub.conftest import publish

pytestmark = pytest.mark.broker

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
    summary: "Battery of {device} is low"
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
    summary: "CARE ALARM {device}"
routing:
  group_wait: 0s
"""


@pytest.fixture
def hub(mosquitto: Mosquitto, http_receiver: HttpReceiver, tmp_path: Path,
        ) -> Iterator[RunningHub]:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rules.yaml").write_text(RULES)
    url = f"json://127.0.0.1:{http_receiver.port}"
    running = RunningHub(make_settings(tmp_path / "data", mosquitto.url),
                         load_rules([tmp_path / "rules"]),
                         channels=load_channels({"CAREFLOW_CHANNEL_OPS": f"{url}/ops",
                                                 "CAREFLOW_CHANNEL_ONCALL": f"{url}/oncall"}))
    running.start()
    yield running
    running.stop()


def _cli(hub: RunningHub, *args: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(hub.settings.data_dir),
           "CAREFLOW_RULES_DIR": str(hub.settings.data_dir.parent / "rules")}
    done = subprocess.run(careflow_cmd(*args, "--by", "ana"), env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def _said(receiver: HttpReceiver, path: str) -> list[str]:
    return [f"{body.get('title')}\n{body.get('message')}" for _, at, body, _ in
            list(receiver.requests) if at == path and isinstance(body, dict)]


def _incidents(hub: RunningHub, rule: str) -> set[str]:
    return {i.device for i in hub.store.incidents(states=("open",)) if i.rule == rule}


def test_a_live_hub_mutes_and_announces_when_unmuted(
        hub: RunningHub, mosquitto: Mosquitto, http_receiver: HttpReceiver) -> None:
    _cli(hub, "rules", "mute", "battery-low", "--for", "1h", "--reason", "cells swapped")
    wait_until(lambda: bool(hub.alerts and hub.alerts.in_force(0).muted), timeout_s=5,
               what="the hub reads the mute")
    wait_until(lambda: any("battery-low muted until" in line and "cells swapped" in line
                           for line in hub.service.health()["rules_in_force"]),
               what="its health report (the console's health page) says so")
    door = Stamper(gateway="gw-a", device="door-1")
    sos = Stamper(gateway="gw-a", device="sos-1")
    publish(mosquitto, [door.stamp("status", {"state": "ok", "battery_pct": 5}),
                        sos.stamp("alert", {"kind": "sos", "state": "raised"})])
    wait_until(lambda: any("CARE ALARM sos-1" in said for said in _said(http_receiver,
                                                                        "/oncall")),
               what="the care alarm announced, mute or not")
    assert _incidents(hub, "battery-low") == {"door-1"}  # recorded
    battery = {i.id for i in hub.store.incidents() if i.rule == "battery-low"}
    assert [n for n in hub.store.notifications() if n.incident_id in battery] == []
    assert _said(http_receiver, "/ops") == []  # nothing announced
    _cli(hub, "rules", "unmute", "battery-low")
    wait_until(lambda: any("battery-low is announced again" in said and "gw-a/door-1" in said
                           for said in _said(http_receiver, "/ops")), timeout_s=10,
               what="what is still open announced when the mute ends")


def test_a_live_hub_stops_and_resumes_evaluating_a_disabled_rule(
        hub: RunningHub, mosquitto: Mosquitto, http_receiver: HttpReceiver) -> None:
    _cli(hub, "rules", "disable", "battery-low", "--reason", "firmware 2.3")
    wait_until(lambda: bool(hub.alerts and hub.alerts.in_force(0).disabled), timeout_s=5,
               what="the hub reads the disable")
    door = Stamper(gateway="gw-a", device="door-2")
    sos = Stamper(gateway="gw-a", device="sos-2")
    publish(mosquitto, [door.stamp("status", {"state": "ok", "battery_pct": 5}),
                        sos.stamp("alert", {"kind": "sos", "state": "raised"})])
    wait_until(lambda: _incidents(hub, "care-alarm") == {"sos-2"}, what="the care alarm")
    assert _incidents(hub, "battery-low") == set()  # evaluated after it: nothing opened
    _cli(hub, "rules", "enable", "battery-low")
    wait_until(lambda: _incidents(hub, "battery-low") == {"door-2"}, timeout_s=10,
               what="the battery still low fires once the rule is enabled")
    wait_until(lambda: any("Battery of door-2 is low" in said
                           for said in _said(http_receiver, "/ops")),
               what="and is announced")
