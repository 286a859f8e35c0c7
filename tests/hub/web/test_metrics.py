"""/metrics scraped from a running hub (real Mosquitto) and parsed by prometheus-client's own
text parser, as Prometheus would read it."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.web.metrics import StoreCounts, families
from tests.conftest import HttpReceiver, Mosquitto, RunningHub, make_settings, wait_until
from tests.hub.conftest import publish, publish_raw

pytestmark = pytest.mark.broker

RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
    summary: "CARE ALARM {device}"
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[str, Samples, dict[str, str]]:
    """The body, every sample by (name, sorted labels), and each family's type."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples, types


def test_it_exposes_the_hubs_counts_to_prometheus(mosquitto: Mosquitto, tmp_path: Path,
                                                 http_receiver: HttpReceiver) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    channels = load_channels({f"CAREFLOW_CHANNEL_{name}": f"json://127.0.0.1:"
                              f"{http_receiver.port}/{name}" for name in ("ONCALL", "OPS")})
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url),
                     load_rules([tmp_path / "rules.yaml"]), channels=channels, web=True).start()
    try:
        assert hub.hub.web is not None
        url = hub.hub.web.url
        gateway = Stamper(gateway="gw-m")
        beat = gateway.stamp("heartbeat", {"interval_s": 60})
        alarms = [Stamper(gateway="gw-m", device=f"fall-{n}").stamp(
            "alert", {"kind": "fall", "state": "raised"}) for n in (1, 2)]
        publish(mosquitto, [beat, beat, *alarms])  # the heartbeat twice: one duplicate
        publish_raw(mosquitto, [("careflow/v1/gw-m/gw-m/heartbeat", b"{not json")])
        wait_until(lambda: hub.store.count_incidents(states=("open",)) == 2,
                   what="two care alarm incidents")
        first = min(i.id for i in hub.store.incidents())
        hub.store.acknowledge_incident(first, by="ana", at_ms=1)

        def counted() -> bool:
            samples = scrape(url)[1]
            return samples.get(("careflow_messages_received_total", ()), 0) == 5 and samples.get(
                ("careflow_notifications", (("channel", "oncall"), ("state", "sent")))) == 2
        wait_until(counted, what="five messages counted and both alarms announced")
        text, samples, types = scrape(url)
    finally:
        hub.stop()

    assert samples[("careflow_hub_up", ())] == 1
    assert samples[("careflow_broker_connected", ())] == 1
    assert samples[("careflow_ready", (("check", "broker"),))] == 1
    assert samples[("careflow_ready", (("check", "store"),))] == 1
    assert samples[("careflow_events_stored_total", ())] == 3
    assert samples[("careflow_events_duplicate_total", ())] == 1
    assert samples[("careflow_dead_letters_total", (("code", "not_json"),))] == 1
    assert samples[("careflow_dead_letters_kept", ())] == 1
    assert samples[("careflow_ingress_queue_messages", ())] == 0
    assert samples[("careflow_ingress_queue_capacity_messages", ())] == 20_000
    assert 0 <= samples[("careflow_commit_latency_seconds", ())] < 5
    assert 0 <= samples[("careflow_alert_lag_seconds", ())] < 5
    assert samples[("careflow_incidents_opened_total", ())] == 2
    assert samples[("careflow_incidents_unresolved",
                    (("severity", "critical"), ("state", "open")))] == 1
    assert samples[("careflow_incidents_unresolved",
                    (("severity", "critical"), ("state", "acknowledged")))] == 1
    assert samples[("careflow_incidents_unresolved",
                    (("severity", "warning"), ("state", "open")))] == 0
    assert [key for key in samples if key[0] == "careflow_notifications"] == [
        ("careflow_notifications", (("channel", "oncall"), ("state", "sent")))]
    assert samples[("careflow_store_read_ok", ())] == 1
    assert types["careflow_events_stored"] == "counter"
    assert types["careflow_ingress_queue_messages"] == "gauge"
    assert "careflow_influx" not in text  # no InfluxDB configured
    for name in {n for n, _ in samples}:
        assert name.startswith("careflow_"), name


def test_it_names_every_family_as_prometheus_asks() -> None:
    health = {"connected": True, "started_ms": 1_000, "messages": 5, "events_stored": 3,
              "duplicates": 1, "conflicts": 2, "rejects_by_code": {"not_json": 1},
              "queue_depth": 0, "queue_bound": 10, "commit_latency_ms": 2.5, "event_age_ms": None,
              "store_errors": 0, "resend_requests": 0, "alert_errors": 0, "alert_lag_ms": 0,
              "incidents_opened": 1, "alerts_unrecorded": 0,
              "influx": {"backlog_events": 7, "points_written": 9, "points_rejected": 0,
                         "write_errors": 1, "snapshots_dropped": 0, "failing_since_ms": 5}}
    made = families(health, {"broker": None, "store": "stale"}, StoreCounts())
    by_name = {family.name: family for family in made}
    for family in made:
        assert family.name.startswith("careflow_")
        if family.type == "counter":  # prometheus-client adds _total to the samples
            assert all(s.name == f"{family.name}_total" for s in family.samples)
    dead = {s.labels["code"]: s.value for s in by_name["careflow_dead_letters"].samples}
    assert dead == {"conflict": 2, "not_json": 1}
    assert by_name["careflow_commit_latency_seconds"].samples[0].value == 0.0025
    assert by_name["careflow_hub_start_time_seconds"].samples[0].value == 1.0  # ms as s
    assert "careflow_event_age_seconds" not in by_name  # nothing stored yet: no sample
    assert by_name["careflow_influx_backlog_events"].samples[0].value == 7
    assert by_name["careflow_influx_failing"].samples[0].value == 1
    assert {s.labels["check"]: s.value for s in by_name["careflow_ready"].samples} == {
        "broker": 1, "store": 0}
    unreadable = {family.name for family in families(health, {}, None)}
    assert "careflow_notifications" not in unreadable
    assert "careflow_store_read_ok" in unreadable
    assert {f.name for f in families({}, {}, StoreCounts())} >= {"careflow_hub_up"}
    assert [s.value for s in by_name["careflow_hub_up"].samples] == [1]


DIGEST_RULES = RULES + """
routing:
  digests:
    - {name: morning, at: "07:00", timezone: Europe/Berlin, channel: ops}
"""


def test_it_shows_status_digests_that_cannot_be_queued(mosquitto: Mosquitto, tmp_path: Path,
                                                      http_receiver: HttpReceiver) -> None:
    """The digests' thread logs a failure and tries again; the health report (careflow
    status) and /metrics say so, or no one would notice the handovers stopped."""
    (tmp_path / "rules.yaml").write_text(DIGEST_RULES)
    channels = load_channels({f"CAREFLOW_CHANNEL_{name}": f"json://127.0.0.1:"
                              f"{http_receiver.port}/{name}" for name in ("ONCALL", "OPS")})
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url),
                     load_rules([tmp_path / "rules.yaml"]), channels=channels, web=True)
    digests = hub.hub.digests
    assert digests is not None and hub.hub.web is not None
    digests.check_s = 0.05
    hub.start()
    try:
        url = hub.hub.web.url
        wait_until(lambda: scrape(url)[1].get(("careflow_digests_failing", ())) == 0,
                   what="the digests reported working")
        assert scrape(url)[1][("careflow_digest_errors_total", ())] == 0
        digests.store.close()  # its connection fails from here on: every check fails
        wait_until(lambda: scrape(url)[1].get(("careflow_digests_failing", ())) == 1,
                   what="the digests reported failing")
        samples, types = scrape(url)[1:]
        assert samples[("careflow_digest_errors_total", ())] >= 1
        assert types["careflow_digest_errors"] == "counter"
        report = hub.service.last_health["digests"]
        assert report["failing_since_ms"] is not None
        assert "closed" in report["last_error"]
    finally:
        hub.stop()
