"""Alert latency: from an event reaching the broker to its notification reaching the channel,
and from a heartbeat deadline to the absence notification.

    .venv/bin/python bench/alert_latency.py [--alarms 50] [--absences 10]

A private Mosquitto, the hub (in this process, with its rules, alert stage and notification
sender) and a real HTTP receiver as a json:// channel. Targets from the alerting issue:
p99 <= 250 ms for care alarms, <= 1 s from a heartbeat deadline to the absence alert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.config import parse_broker_url
from careflow.edge.publish import publish_events
from careflow.edge.stamper import Stamper
from careflow.hub.alerting import AlertStage
from careflow.hub.notify import NotificationSender, load_channels
from careflow.hub.rules import load_rules
from careflow.hub.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver, Mosquitto, RunningHub, make_settings
from tests.hub.test_alerting_e2e import RULES  # the same rules the end-to-end test uses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alarms", type=int, default=50)
    parser.add_argument("--absences", type=int, default=10)
    args = parser.parse_args()
    receiver = HttpReceiver()
    hook = f"json://127.0.0.1:{receiver.port}/bench"

    def arrived(title: str) -> float | None:
        return next((at for _, _, body, at in receiver.requests
                     if body and body.get("title") == title), None)

    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": hook, "CAREFLOW_CHANNEL_OPS": hook})
    tmp = Path(tempfile.mkdtemp(prefix="careflow-alert-bench-"))
    (tmp / "rules.yaml").write_text(RULES)
    broker = Mosquitto(tmp)
    broker.start()
    settings = make_settings(tmp / "data", broker.url, CAREFLOW_SQLITE_SYNC="full")
    hub = RunningHub(settings)
    hub.service.alerts = AlertStage(hub.store, load_rules([tmp / "rules.yaml"]), channels)
    hub.start()
    sender = NotificationSender(SqliteStore(settings.db_path), channels)
    hub.service.alerts.on_queued = sender.wake
    sender.start()
    url = parse_broker_url(broker.url)
    try:
        alarm_ms: list[float] = []
        for i in range(args.alarms):
            device = Stamper(gateway="gw-bench", device=f"fall-{i}")
            event = device.stamp("alert", {"kind": "fall", "state": "raised"})
            start = time.time()
            publish_events(url, [event], client_id=f"bench-{i}")
            title = f"[CRITICAL] CARE ALARM fall-{i}"
            while arrived(title) is None and time.time() - start < 10:
                time.sleep(0.002)
            alarm_ms.append(((arrived(title) or float("nan")) - start) * 1000)
        absence_ms: list[float] = []
        for i in range(args.absences):
            gateway = Stamper(gateway=f"gw-silent-{i}")
            publish_events(url, [gateway.stamp("heartbeat", {"interval_s": 1})],
                           client_id=f"bench-hb-{i}")
            stored = None
            while stored is None:
                record = hub.store.device(f"gw-silent-{i}", f"gw-silent-{i}")
                stored = record.last_seen_ms if record else None
                time.sleep(0.005)
            deadline = stored / 1000 + 2.0
            title = f"[CRITICAL] Gateway gw-silent-{i} has gone silent"
            while arrived(title) is None and time.time() - deadline < 10:
                time.sleep(0.005)
            absence_ms.append(((arrived(title) or float("nan")) - deadline) * 1000)
        result = {
            "care_alarm_ms": {"p50": round(statistics.median(alarm_ms), 1),
                              "p99": round(percentile(alarm_ms, 0.99), 1),
                              "max": round(max(alarm_ms), 1), "n": len(alarm_ms)},
            "absence_after_deadline_ms": {"p50": round(statistics.median(absence_ms), 1),
                                          "max": round(max(absence_ms), 1),
                                          "n": len(absence_ms)},
        }
        print(json.dumps(result, indent=2))
    finally:
        sender.stop()
        hub.stop()
        broker.stop()
        receiver.close()


if __name__ == "__main__":
    main()
