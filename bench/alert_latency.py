"""Alert latency: from an event reaching the broker to its notification reaching the channel,
and from a heartbeat deadline to the absence notification.

    .venv/bin/python bench/alert_latency.py [--alarms 50] [--absences 10]
    .venv/bin/python bench/alert_latency.py --burst 12 [--warnings 12]

A private Mosquitto, the hub (in this process, with its rules, alert stage and notification
sender) and a real HTTP receiver as a json:// channel. Targets from the alerting issue:
p99 <= 250 ms for care alarms, <= 1 s from a heartbeat deadline to the absence alert.

``--burst N``: N care alarms from N gateways published at once, with as many warnings from the
same gateways on another channel; the alarms go to a real SMTP server (aiosmtpd) as email, the
warnings to the HTTP receiver. Prints, per channel, p50/p99/max from the publish to the arrival
of each notification (the max is the last delivery). Targets from the safety issue: 12 alarms
all delivered <= 2 s; the other channel <= 0.5 s.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.core.config import parse_broker_url
from careflow.edge.publish import publish_events
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.notify import Channel, load_channels
from careflow.hub.alerting.rules import load_rules
from tests.conftest import HttpReceiver, Mosquitto, RunningHub, free_port, make_settings
from tests.hub.test_alerting_e2e import RULES  # the same rules the end-to-end test uses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


BURST_RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
    summary: "CARE ALARM {device}"
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
    severity: warning
    summary: "BATTERY LOW {device}"
routing:
  group_wait: 0s
"""


class TimedMailbox:
    """A real SMTP server on loopback that keeps each mail's text with its arrival time."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mails: list[tuple[float, str]] = []
        mailbox = self

        class Handler:
            async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
                raw = envelope.content.decode("utf-8", "replace")
                message = email.message_from_string(raw, policy=email.policy.default)
                assert isinstance(message, EmailMessage)
                body = message.get_body(preferencelist=("plain", "html"))
                text = body.get_content() if body is not None else raw
                text = f"{message['subject']}\n{text}".replace("\r\n", "\n")
                mailbox.mails.append((time.time(), text))
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)


def summary(latencies_ms: list[float]) -> dict[str, float | int]:
    return {"p50": round(statistics.median(latencies_ms), 1),
            "p99": round(percentile(latencies_ms, 0.99), 1),
            "max": round(max(latencies_ms), 1), "n": len(latencies_ms)}


def start_hub(prefix: str, rules: str, channels: dict[str, Channel],
              ) -> tuple[Mosquitto, RunningHub]:
    """A real broker and a hub alerting by ``rules`` on ``channels`` (SQLite synchronous=full,
    as in production), its notification sender woken by every queued notification."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "rules.yaml").write_text(rules)
    broker = Mosquitto(tmp)
    broker.start()
    settings = make_settings(tmp / "data", broker.url, CAREFLOW_SQLITE_SYNC="full")
    hub = RunningHub(settings, load_rules([tmp / "rules.yaml"]), channels=channels).start()
    return broker, hub


def stop_hub(broker: Mosquitto, hub: RunningHub) -> None:
    """Stop what start_hub started."""
    hub.stop()
    broker.stop()


def burst(alarms: int, warnings: int) -> None:
    """N simultaneous care alarms by email (SMTP), warnings on another channel (HTTP)."""
    mailbox = TimedMailbox()
    mailbox.controller.start()
    receiver = HttpReceiver()
    channels = load_channels({
        "CAREFLOW_CHANNEL_ONCALL": f"mailto://127.0.0.1:{mailbox.port}?from=careflow@example.org"
                                   "&to=oncall@example.org",
        "CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{receiver.port}/ops"})
    broker, hub = start_hub("careflow-burst-bench-", BURST_RULES, channels)
    try:
        events = [Stamper(gateway=f"gw-burst-{i}", device=f"fall-{i}").stamp(
            "alert", {"kind": "fall", "state": "raised"}) for i in range(alarms)]
        events += [Stamper(gateway=f"gw-burst-{i % max(1, alarms)}", device=f"door-{i}").stamp(
            "status", {"state": "ok", "battery_pct": 5}) for i in range(warnings)]
        start = time.time()
        publish_events(parse_broker_url(broker.url), events, client_id="bench-burst")

        def mailed(device: str) -> float | None:
            return next((at for at, text in list(mailbox.mails) if f"CARE ALARM {device}\n"
                         in text or text.startswith(f"[CRITICAL] CARE ALARM {device}\n")), None)

        def posted(device: str) -> float | None:
            return next((at for _, _, body, at in list(receiver.requests)
                         if body and f"BATTERY LOW {device}\n" in f"{body['title']}\n"
                                                               f"{body['message']}"), None)

        while time.time() - start < 90 and not (
                all(mailed(f"fall-{i}") for i in range(alarms))
                and all(posted(f"door-{i}") for i in range(warnings))):
            time.sleep(0.005)
        alarm_ms = [((mailed(f"fall-{i}") or float("nan")) - start) * 1000
                    for i in range(alarms)]
        warning_ms = [((posted(f"door-{i}") or float("nan")) - start) * 1000
                      for i in range(warnings)]
        result = {"burst_alarms_by_email_ms": summary(alarm_ms), "emails": len(mailbox.mails),
                  "warnings_other_channel_ms": summary(warning_ms) if warnings else None,
                  "webhook_posts": len(receiver.requests)}
        print(json.dumps(result, indent=2))
    finally:
        stop_hub(broker, hub)
        receiver.close()
        mailbox.controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alarms", type=int, default=50)
    parser.add_argument("--absences", type=int, default=10)
    parser.add_argument("--burst", type=int, default=0,
                        help="N simultaneous care alarms over SMTP (and --warnings over HTTP)")
    parser.add_argument("--warnings", type=int, default=None,
                        help="warnings on the other channel in a burst [default: as many]")
    args = parser.parse_args()
    if args.burst:
        burst(args.burst, args.burst if args.warnings is None else args.warnings)
        return
    receiver = HttpReceiver()
    hook = f"json://127.0.0.1:{receiver.port}/bench"

    def arrived(title: str) -> float | None:
        return next((at for _, _, body, at in receiver.requests
                     if body and body.get("title") == title), None)

    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": hook, "CAREFLOW_CHANNEL_OPS": hook})
    broker, hub = start_hub("careflow-alert-bench-", RULES, channels)
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
        stop_hub(broker, hub)
        receiver.close()


if __name__ == "__main__":
    main()
