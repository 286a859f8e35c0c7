"""Rules evaluated inside a live hub against a real Mosquitto open and resolve incidents."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.rules import load_rules
from tests.conftest import Mosquitto, RunningHub, careflow_cmd, wait_until
from tests.hub.conftest import publish

pytestmark = pytest.mark.broker

RULES = """
rules:
  - name: gateway-offline
    kind: absence
    only_gateways: true
    grace: 2
    severity: critical
    summary: "Gateway {gateway} has gone silent"
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
    for: 1s
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    summary: "CARE ALARM {device}"
"""


def active(hub: RunningHub) -> dict[str, str]:
    return {i.rule: i.state for i in hub.store.incidents(states=("open", "acknowledged"))}


def test_it_opens_and_resolves_incidents_from_live_events(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], tmp_path: Path,
) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    hub = hub_factory(mosquitto.url, rules=load_rules([tmp_path / "rules.yaml"]))
    gateway = Stamper(gateway="gw-a")
    door = Stamper(gateway="gw-a", device="door-1")
    fall = Stamper(gateway="gw-a", device="fall-1")
    publish(mosquitto, [gateway.stamp("heartbeat", {"interval_s": 1}),
                        door.stamp("status", {"state": "degraded", "battery_pct": 9}),
                        fall.stamp("alert", {"kind": "fall", "state": "raised"})])
    wait_until(lambda: active(hub).get("care-alarm") == "open", what="care alarm incident")
    wait_until(lambda: active(hub).get("battery-low") == "open", what="battery after for: 1s")
    wait_until(lambda: active(hub).get("gateway-offline") == "open", timeout_s=10,
               what="gateway silent for 2 x 1 s")
    offline = next(i for i in hub.store.incidents() if i.rule == "gateway-offline")
    assert offline.summary == "Gateway gw-a has gone silent" and offline.severity == "critical"

    publish(mosquitto, [gateway.stamp("heartbeat", {"interval_s": 60}),
                        door.stamp("status", {"state": "ok", "battery_pct": 95})])
    wait_until(lambda: "gateway-offline" not in active(hub) and "battery-low" not in active(hub),
               what="conditions cleared")
    resolved = {i.rule: i for i in hub.store.incidents(states=("resolved",))}
    assert resolved["battery-low"].resolved_by == "careflow (condition cleared)"

    env = {**os.environ, "CAREFLOW_DATA_DIR": str(hub.settings.data_dir)}
    alarm = next(i for i in hub.store.incidents() if i.rule == "care-alarm")
    acked = subprocess.run(careflow_cmd("incidents", "ack", str(alarm.id), "--by", "nurse-kari",
                                        "--json"), env=env, capture_output=True, text=True,
                           check=True, timeout=30)
    row = json.loads(acked.stdout)
    assert row["state"] == "acknowledged" and row["acknowledged_by"] == "nurse-kari"
    assert row["time_to_acknowledge_s"] >= 0
    again = subprocess.run(careflow_cmd("incidents", "ack", str(alarm.id)), env=env,
                           capture_output=True, text=True, check=False, timeout=30)
    assert again.returncode == 1 and "acknowledged" in again.stderr  # refused
    time.sleep(0.1)
    listed = subprocess.run(careflow_cmd("incidents", "list", "--json"), env=env,
                            capture_output=True, text=True, check=True, timeout=30)
    assert [json.loads(line)["rule"] for line in listed.stdout.splitlines()] == ["care-alarm"]
