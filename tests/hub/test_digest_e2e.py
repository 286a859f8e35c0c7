"""A status digest reaches a real HTTP receiver through a running hub (real Mosquitto): the
care alarm published before it is listed, and it goes through the sender like any
notification."""

from __future__ import annotations

from pathlib import Path

import pytest

from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.digest_scheduler import cursor_name
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import NotificationKind
from tests.conftest import HttpReceiver, Mosquitto, RunningHub, make_settings, wait_until
from tests.hub.conftest import publish

pytestmark = pytest.mark.broker

RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
    summary: "CARE ALARM from {device} at {gateway}"
routing:
  digests:
    - name: morning
      at: "07:00"
      timezone: Europe/Berlin
      channel: ops
"""

DAY_MS = 86_400_000


def test_a_digest_reaches_its_channel_late_after_downtime(
        mosquitto: Mosquitto, tmp_path: Path, http_receiver: HttpReceiver) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "rules.yaml"])
    channels = load_channels({f"CAREFLOW_CHANNEL_{name.upper()}": f"json://127.0.0.1:"
                              f"{http_receiver.port}/{name}" for name in ("oncall", "ops")})
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url), rules, channels=channels)
    digests = hub.hub.digests
    assert digests is not None
    digests.check_s = 0.1  # look often, so the test need not wait
    hub.start()
    try:
        (morning,) = rules.routing.digests
        wait_until(lambda: hub.store.cursor(cursor_name(morning)) > 0,
                   what="the digest scheduled at start")
        assert not [r for r in http_receiver.requests if r[1] == "/ops"]  # not due at start
        publish(mosquitto, [Stamper(gateway="gw-d", device="fall-1").stamp(
            "alert", {"kind": "fall", "state": "raised"})])
        wait_until(lambda: [r for r in http_receiver.requests if r[1] == "/oncall"],
                   what="the care alarm announced")
        (alarm,) = hub.store.incidents()
        # as if the hub had been down since two days ago: the 07:00 digest is owed, once
        hub.store.set_cursor(cursor_name(morning), clock.now_ms() - 2 * DAY_MS)
        wait_until(lambda: [r for r in http_receiver.requests if r[1] == "/ops"],
                   what="the digest delivered")
        wait_until(lambda: hub.store.notifications(states=("sent",), limit=5)[0].kind
                   == NotificationKind.DIGEST, what="the digest recorded as sent")
        (note,) = [n for n in hub.store.notifications() if n.kind == NotificationKind.DIGEST]
    finally:
        hub.stop()
    (digest,) = [body for _, path, body, _ in http_receiver.requests if path == "/ops"]
    assert digest["title"] == ("[STATUS] morning: 1 open and unacknowledged, 0 gateway(s) "
                               "offline, 0 low batteries")
    message = digest["message"]
    assert f"- #{alarm.id} [CRITICAL] CARE ALARM from fall-1 at gw-d (gw-d/fall-1)" in message
    assert "late: it was due at" in message
    assert f"#{alarm.id} opened: CARE ALARM from fall-1 at gw-d" in message
    assert (note.incident_id, note.channel, note.state, note.attempts) == (0, "ops", "sent", 1)
    assert f"Ref: careflow-n{note.id}" in message
