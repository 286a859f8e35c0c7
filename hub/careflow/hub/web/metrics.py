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
from typing import TYPE_CHECKING, Any, TypeAlias

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


def _number(report: Mapping[str, Any], key: str) -> float | None:
    """A number of the report (None when it lacks one: a hub that has not reported yet)."""
    value = report.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


_C, _G = CounterMetricFamily, GaugeMetricFamily
_Kind: TypeAlias = type[CounterMetricFamily] | type[GaugeMetricFamily]
_Scalars: TypeAlias = tuple[tuple[_Kind, str, str, str], ...]  # kind, name, key, help

# One number of a health report each; a key in milliseconds (``_ms``) is given in seconds.
_HUB: _Scalars = (
    (_G, "careflow_hub_start_time_seconds", "started_ms", "When the hub started (Unix time)"),
)
_INGEST: _Scalars = (  # what the writer loop reports: messages in, events stored, queue...
    (_C, "careflow_messages_received", "messages",
     "MQTT messages taken in by the hub (a gateway's batch of events is one message)"),
    (_C, "careflow_events_stored", "events_stored", "Distinct events stored in the log"),
    (_C, "careflow_events_duplicate", "duplicates", "Events received again and skipped "
     "(already stored: same id, or same source position and content)"),
    (_G, "careflow_ingress_queue_messages", "queue_depth",
     "Messages received and waiting to be committed"),
    (_G, "careflow_ingress_queue_capacity_messages", "queue_bound",
     "The bound of that queue (when full, the broker holds back what comes)"),
    (_G, "careflow_commit_latency_seconds", "commit_latency_ms",
     "From the arrival of the oldest message of the last commit to its commit"),
    (_G, "careflow_event_age_seconds", "event_age_ms",
     "How old (by its own time) the newest event of the last commit was when stored"),
    (_G, "careflow_alert_lag_seconds", "alert_lag_ms",
     "How far rule evaluation ran behind ingest (worst of the last second)"),
    (_G, "careflow_alert_backlog_events", "alerts_unrecorded",
     "Stored events whose rule evaluation is not recorded yet"),
    (_C, "careflow_incidents_opened", "incidents_opened",
     "Incidents opened since the hub started"),
    (_C, "careflow_alert_errors", "alert_errors", "Failures of the alert stage"),
    (_C, "careflow_store_errors", "store_errors",
     "Commits the store refused (retried, never acknowledged)"),
    (_C, "careflow_resend_requests", "resend_requests",
     "Requests to gateways to resend what the hub is missing"),
)
_INFLUX: _Scalars = (  # the InfluxDB sink's part
    (_G, "careflow_influx_backlog_events", "backlog_events",
     "Stored events not yet written to InfluxDB"),
    (_C, "careflow_influx_points_written", "points_written", "Points InfluxDB accepted"),
    (_C, "careflow_influx_points_rejected", "points_rejected", "Points InfluxDB refused for good"),
    (_C, "careflow_influx_write_errors", "write_errors",
     "Writes to InfluxDB that failed (retried)"),
    (_C, "careflow_influx_snapshots_dropped", "snapshots_dropped",
     "Device-status snapshots dropped (the queue for InfluxDB was full)"),
)
_DIGESTS: _Scalars = (  # the status digests' scheduler
    (_C, "careflow_digest_errors", "errors", "Checks of the status digests that failed (each "
     "tried again 15 s later; the hub log says why)"),
)


def _scalars(table: _Scalars, report: Mapping[str, Any]) -> Iterator[Metric]:
    """The families of ``table`` that ``report`` has a number for."""
    for kind, name, key, doc in table:
        value = _number(report, key)
        if value is not None:
            yield kind(name, doc, value=value / 1000 if key.endswith("_ms") else value)


def _failing(name: str, doc: str, status: Mapping[str, Any] | None) -> Iterator[Metric]:
    """1 while a part's status says it is failing (nothing when the part is not configured)."""
    if status:
        yield GaugeMetricFamily(name, doc, value=float(status.get("failing_since_ms") is not None))


def _dead_letters(health: Mapping[str, Any]) -> Iterator[Metric]:
    """Input refused and kept, by reason code (a conflict is one too)."""
    if "rejects_by_code" in health or "conflicts" in health:
        dead = CounterMetricFamily("careflow_dead_letters", "Input refused and kept as a dead "
                                   "letter, by reason code", labels=["code"])
        codes = dict(health.get("rejects_by_code") or {})
        if health.get("conflicts"):
            codes["conflict"] = codes.get("conflict", 0) + health["conflicts"]
        for code, count in sorted(codes.items()):
            dead.add_metric([str(code)], float(count))
        yield dead


def families(health: Mapping[str, Any], readiness: Mapping[str, str | None],
             counts: StoreCounts | None) -> list[Metric]:
    """Every metric family of one scrape, from the hub's last health report, its readiness
    checks and what the store counts (None: the store could not be read; its families are left
    out and ``careflow_store_read_ok`` says 0). Pure: the collector gathers, this decides."""
    out: list[Metric] = [
        GaugeMetricFamily("careflow_hub_up", "1 when the hub's ingest loop has reported its "
                          "health", value=float(bool(health))),
        GaugeMetricFamily("careflow_broker_connected", "1 while the hub is connected to the "
                          "broker", value=float(bool(health.get("connected"))))]
    ready = GaugeMetricFamily("careflow_ready", "1 when a readiness check passes (as /readyz)",
                              labels=["check"])
    for check, problem in sorted(readiness.items()):
        ready.add_metric([check], float(problem is None))
    out.append(ready)
    influx, digests = health.get("influx") or {}, health.get("digests") or {}
    out += _scalars(_HUB, health)
    out += _scalars(_INGEST, health)
    out += _dead_letters(health)
    out += _scalars(_INFLUX, influx)
    out += _failing("careflow_influx_failing", "1 while writes to InfluxDB fail", influx)
    out += _scalars(_DIGESTS, digests)
    out += _failing("careflow_digests_failing", "1 while the status digests cannot be queued "
                    "(none goes out)", digests)
    out.append(GaugeMetricFamily("careflow_store_read_ok", "1 when this scrape could read the "
                                 "store", value=float(counts is not None)))
    if counts is None:
        return out
    out.append(GaugeMetricFamily("careflow_dead_letters_kept", "Dead letters the store keeps "
                                 "(the newest, within its bounds)",
                                 value=counts.dead_letters_kept))
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

