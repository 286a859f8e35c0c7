"""GET /metrics: the hub in Prometheus exposition format, computed at scrape time.

A custom collector on a registry of its own (never prometheus-client's global one, which would
mix in whatever else the process registers): each scrape reads the hub's last health report
(the same one `careflow status` shows) and a few counts from the web's store connection, and
turns them into metric families (:func:`families`, pure). Names follow Prometheus' rules:
``careflow_`` first, counters end in ``_total``, units (``_seconds``, ``_messages``, ``_events``)
in the name.

/metrics needs no login, as /healthz and /readyz: the operators' Prometheus scrapes it. It is
served on the same listener as the console and the links (CAREFLOW_HTTP_LISTEN); a reverse proxy
that puts the web on the internet should not pass /metrics through (it tells the fleet's size
and the incidents' counts to anyone who asks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from careflow.core.errors import StoreError
from careflow.hub.store.records import UNRESOLVED, Severity

if TYPE_CHECKING:
    from careflow.hub.web.app import WebDeps

__all__ = ["HubCollector", "StoreCounts", "families", "routes"]

log = logging.getLogger(__name__)

# The classic text format, which every Prometheus reads (our names are all plain ASCII, so
# generate_latest's output is the same in it); newer prometheus-client releases announce 1.0.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """What a scrape reads from the store."""

    notifications: Mapping[tuple[str, str], int] = field(default_factory=dict)  # channel, state
    incidents: Mapping[tuple[str, str], int] = field(default_factory=dict)  # severity, state
    dead_letters_kept: int = 0


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(name, doc, value=value)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _number(report: Mapping[str, Any], key: str) -> float | None:
    """A number of the report (None when it lacks one: a hub that has not reported yet)."""
    value = report.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _ingest(health: Mapping[str, Any]) -> Iterator[Metric]:
    """What the writer loop reports: messages in, events stored, refusals, queue, latencies."""
    h = health
    yield from _counter("careflow_messages_received", "MQTT messages taken in by the hub "
                        "(a gateway's batch of events is one message)", _number(h, "messages"))
    yield from _counter("careflow_events_stored", "Distinct events stored in the log",
                        _number(h, "events_stored"))
    yield from _counter("careflow_events_duplicate", "Events received again and skipped "
                        "(already stored: same id, or same source position and content)",
                        _number(h, "duplicates"))
    if "rejects_by_code" in h or "conflicts" in h:
        dead = CounterMetricFamily("careflow_dead_letters", "Input refused and kept as a dead "
                                   "letter, by reason code", labels=["code"])
        codes = dict(h.get("rejects_by_code") or {})
        if h.get("conflicts"):
            codes["conflict"] = codes.get("conflict", 0) + h["conflicts"]
        for code, count in sorted(codes.items()):
            dead.add_metric([str(code)], float(count))
        yield dead
    yield from _gauge("careflow_ingress_queue_messages", "Messages received and waiting to be "
                      "committed", _number(h, "queue_depth"))
    yield from _gauge("careflow_ingress_queue_capacity_messages", "The bound of that queue "
                      "(when full, the broker holds back what comes)", _number(h, "queue_bound"))
    yield from _gauge("careflow_commit_latency_seconds", "From the arrival of the oldest message "
                      "of the last commit to its commit", _seconds(_number(h, "commit_latency_ms")))
    yield from _gauge("careflow_event_age_seconds", "How old (by its own time) the newest event "
                      "of the last commit was when stored", _seconds(_number(h, "event_age_ms")))
    yield from _gauge("careflow_alert_lag_seconds", "How far rule evaluation ran behind ingest "
                      "(worst of the last second)", _seconds(_number(h, "alert_lag_ms")))
    yield from _gauge("careflow_alert_backlog_events", "Stored events whose rule evaluation is "
                      "not recorded yet", _number(h, "alerts_unrecorded"))
    yield from _counter("careflow_incidents_opened", "Incidents opened since the hub started",
                        _number(h, "incidents_opened"))
    yield from _counter("careflow_alert_errors", "Failures of the alert stage",
                        _number(h, "alert_errors"))
    yield from _counter("careflow_store_errors", "Commits the store refused (retried, never "
                        "acknowledged)", _number(h, "store_errors"))
    yield from _counter("careflow_resend_requests", "Requests to gateways to resend what the "
                        "hub is missing", _number(h, "resend_requests"))


def _influx(status: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The InfluxDB sink's part (nothing when no InfluxDB is configured)."""
    if not status:
        return
    yield from _gauge("careflow_influx_backlog_events", "Stored events not yet written to "
                      "InfluxDB", _number(status, "backlog_events"))
    yield from _counter("careflow_influx_points_written", "Points InfluxDB accepted",
                        _number(status, "points_written"))
    yield from _counter("careflow_influx_points_rejected", "Points InfluxDB refused for good",
                        _number(status, "points_rejected"))
    yield from _counter("careflow_influx_write_errors", "Writes to InfluxDB that failed "
                        "(retried)", _number(status, "write_errors"))
    yield from _counter("careflow_influx_snapshots_dropped", "Device-status snapshots dropped "
                        "(the queue for InfluxDB was full)", _number(status, "snapshots_dropped"))
    yield from _gauge("careflow_influx_failing", "1 while writes to InfluxDB fail",
                      float(status.get("failing_since_ms") is not None))


def _digests(status: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The status digests' scheduler (nothing when no digest is configured)."""
    if not status:
        return
    yield from _counter("careflow_digest_errors", "Checks of the status digests that failed "
                        "(each tried again 15 s later; the hub log says why)",
                        _number(status, "errors"))
    yield from _gauge("careflow_digests_failing", "1 while the status digests cannot be queued "
                      "(none goes out)", float(status.get("failing_since_ms") is not None))


def families(health: Mapping[str, Any], readiness: Mapping[str, str | None],
             counts: StoreCounts | None) -> list[Metric]:
    """Every metric family of one scrape, from the hub's last health report, its readiness
    checks and what the store counts (None: the store could not be read; its families are left
    out and ``careflow_store_read_ok`` says 0). Pure: the collector gathers, this decides."""
    out: list[Metric] = []
    out += _gauge("careflow_hub_up", "1 when the hub's ingest loop has reported its health",
                  float(bool(health)))
    out += _gauge("careflow_broker_connected", "1 while the hub is connected to the broker",
                  float(bool(health.get("connected"))))
    ready = GaugeMetricFamily("careflow_ready", "1 when a readiness check passes (as /readyz)",
                              labels=["check"])
    for check, problem in sorted(readiness.items()):
        ready.add_metric([check], float(problem is None))
    out.append(ready)
    out += _gauge("careflow_hub_start_time_seconds", "When the hub started (Unix time)",
                  _seconds(_number(health, "started_ms")))
    out += _ingest(health)
    out += _influx(health.get("influx"))
    out += _digests(health.get("digests"))
    out += _gauge("careflow_store_read_ok", "1 when this scrape could read the store",
                  float(counts is not None))
    if counts is None:
        return out
    out += _gauge("careflow_dead_letters_kept", "Dead letters the store keeps (the newest, "
                  "within its bounds)", counts.dead_letters_kept)
    notifications = GaugeMetricFamily("careflow_notifications", "Notifications in the outbox "
                                      "by channel and state", labels=["channel", "state"])
    for (channel, state), count in sorted(counts.notifications.items()):
        notifications.add_metric([channel, state], count)
    out.append(notifications)
    incidents = GaugeMetricFamily("careflow_incidents_unresolved", "Incidents open or "
                                  "acknowledged, by severity and state",
                                  labels=["severity", "state"])
    for severity in Severity:  # every series always there: an alert on one needs no absent()
        for state in UNRESOLVED:
            incidents.add_metric([severity, state], counts.incidents.get((severity, state), 0))
    out.append(incidents)
    return out


class HubCollector(Collector):
    """Collects the hub's metrics at scrape time (called in a worker thread: it reads the
    store)."""

    def __init__(self, deps: WebDeps) -> None:
        self.deps = deps

    def collect(self) -> Iterable[Metric]:
        """One scrape's metric families."""
        store = self.deps.store
        counts: StoreCounts | None
        try:
            counts = StoreCounts(notifications=store.notification_counts(),
                                 incidents=store.incident_counts(states=UNRESOLVED),
                                 dead_letters_kept=store.dead_letter_count())
        except StoreError:  # the rest still tells what is wrong
            log.warning("/metrics cannot read the store", exc_info=True)
            counts = None
        return families(self.deps.health(), self.deps.readiness(), counts)


def routes(deps: WebDeps) -> list[BaseRoute]:
    """GET /metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(deps))

    async def metrics(_request: Request) -> Response:
        """The hub's metrics; no login (Prometheus scrapes it)."""
        body = await deps.call(lambda: generate_latest(registry))
        return Response(body, media_type=CONTENT_TYPE,
                        headers={"Cache-Control": "no-store"})

    return [Route("/metrics", metrics, methods=["GET"])]

