"""SIGKILL the `careflow hub` process (not a thread) in both crash windows of the outbox.

What careflow guarantees, and this test proves on a real hub process, a real Mosquitto and a
real HTTP receiver:

* Killed after a notification is written but before it is sent (here: a warning held by
  group_wait): the restarted hub sends it exactly once.
* Killed while a channel is receiving it (the receiver holds its answer, so the kill lands
  mid-send): nothing is lost, and the restarted hub sends it again — at least once, because no
  sender can know whether a request it never saw answered was acted on. The duplicate carries
  the same ``Ref: careflow-n<id>``, so a receiver that remembers refs drops it. Only this window
  can produce a duplicate, and only one per kill.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HubProcess, JsonReceiver, Mosquitto, wait_until
from tests.hub.conftest import publish

pytestmark = [pytest.mark.broker]

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
routing:
  group_wait: 3s
"""


def ref(body: dict[str, Any]) -> str:
    match = re.search(r"Ref: (careflow-n[\d+n]+)", body["message"])
    assert match is not None, body
    return match[1]


def test_it_loses_nothing_and_marks_the_only_possible_duplicate_when_killed_mid_send(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    receiver = JsonReceiver(hold_path="/oncall", hold_first_only=True)
    hub_process = HubProcess(tmp_path, mosquitto.url, RULES, receiver.port)
    data_dir, log, start = hub_process.data_dir, hub_process.log, hub_process.start

    hub = start()
    try:
        wait_until((data_dir / "careflow.db").exists, what="store created")
        store = SqliteStore(data_dir / "careflow.db")
        wait_until(lambda: (store.read_health() or (0, {}))[1].get("connected") is True,
                   what="hub connected")
        publish(mosquitto, [
            Stamper(gateway="gw-1", device="fall-1").stamp("alert", {"kind": "fall",
                                                                     "state": "raised"}),
            Stamper(gateway="gw-1", device="door-1").stamp("status", {"state": "ok",
                                                                      "battery_pct": 5}),
        ])
        wait_until(lambda: receiver.to("/oncall") and store.count_notifications() == 2,
                   what="the care alarm mid-send, the battery warning written and held")
        hub.send_signal(signal.SIGKILL)
        hub.wait(timeout=10)
        states = {n.channel: n.state for n in store.notifications()}
        assert states == {"oncall": "sending", "ops": "pending"}, log.read_text()[-2000:]
        assert receiver.to("/ops") == []
        receiver.release.set()  # the held answer goes to a dead socket

        hub = start()
        wait_until(lambda: len(store.notifications(states=("sent",))) == 2, timeout_s=30,
                   what="both notifications recorded as sent after the restart")
        wait_until(lambda: len(receiver.to("/oncall")) == 2, what="the resent care alarm")
        (battery,) = receiver.to("/ops")  # written, not sent, when killed: exactly once
        assert "door-1" in battery["message"]
        first, again = receiver.to("/oncall")  # in flight when killed: at least once,
        assert ref(first) == ref(again)  # and the duplicate says so
        assert "fall-1" in first["message"]
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=20) == 0, log.read_text()[-2000:]
        receiver.close()
    assert len(receiver.requests) == 3  # nothing else arrived while the hub shut down
