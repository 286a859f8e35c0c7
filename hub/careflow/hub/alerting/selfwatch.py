"""The hub watches itself: if the alerting path breaks, someone must find out.

``self_problems`` is pure: the hub's own health in, the problems it must raise out. Each problem
becomes an incident on the source ``careflow-hub/hub`` through the same incident and notification
path as device alerts. ``DeadMansSwitch`` pings an outside URL (Healthchecks, Cronitor, ...) on an
interval, so a hub that is dead altogether is noticed from outside.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ALERT_LAG_BOUND_MS",
    "ALERT_LAG_GRACE_MS",
    "HUB_DEVICE",
    "HUB_GATEWAY",
    "OVER_BOUND_WINDOW_MS",
    "SELF_RULES",
    "STALL_LIMIT_MS",
    "DeadMansSwitch",
    "Refusals",
    "lagging_since",
    "self_problems",
    "tally_refusals",
]

log = logging.getLogger(__name__)

HUB_GATEWAY = "careflow-hub"
HUB_DEVICE = "hub"
# rule name -> severity of the hub's own alerts
SELF_RULES = {"hub-broker-down": "critical", "hub-no-events": "critical",
              "hub-notifications-failing": "critical", "hub-store-failing": "critical",
              "hub-influx-failing": "warning", "hub-certificates-expiring": "warning",
              "hub-alerts-lagging": "critical", "hub-devices-over-bound": "critical",
              "hub-evaluation-failed": "critical"}
# Rule evaluation that runs this far behind ingest (an event stored but judged late, or a clock
# tick that comes late) for this long is an alert: a care alarm would be announced late.
ALERT_LAG_BOUND_MS = 10_000
ALERT_LAG_GRACE_MS = 30_000
# A rule-evaluation loop that has not ticked for this long is stuck: it cannot report itself, so
# the dead man's switch stops pinging and the outside service raises the alarm.
STALL_LIMIT_MS = 60_000
# Events refused as too_many_devices keep the hub's alert open until none came for this long.
OVER_BOUND_WINDOW_MS = 300_000
_NAMED_GATEWAYS = 5  # gateways a message names; the rest are counted


@dataclass(frozen=True, slots=True)
class Refusals:
    """Events dead-lettered as ``too_many_devices`` (new devices beyond their gateway's bound)
    since ``since_ms`` without a pause of OVER_BOUND_WINDOW_MS, the last at ``last_ms``."""

    since_ms: int
    last_ms: int
    events: int
    alarms: int  # care alarms among them: never evaluated, so people must hear of them here
    gateways: tuple[str, ...]  # the first few, in order of first refusal
    more_gateways: int = 0


def tally_refusals(previous: Refusals | None, gateways: Sequence[str], *, alarms: int,
                   now_ms: int, window_ms: int = OVER_BOUND_WINDOW_MS) -> Refusals | None:
    """Add a commit's refused events (one gateway name per event) to the running tally; a
    tally quiet for ``window_ms`` is over and a new one starts."""
    if previous is not None and now_ms - previous.last_ms >= window_ms:
        previous = None
    if not gateways:
        return previous
    if previous is None:
        previous = Refusals(now_ms, now_ms, 0, 0, ())
    named = list(previous.gateways)
    more = previous.more_gateways
    for gateway in dict.fromkeys(gateways):
        if gateway in named:
            continue
        if len(named) < _NAMED_GATEWAYS:
            named.append(gateway)
        else:
            more += 1  # counted once per commit that brings it: an upper bound, said so
    return Refusals(previous.since_ms, now_ms, previous.events + len(gateways),
                    previous.alarms + alarms, tuple(named), more)


def lagging_since(since_ms: int | None, *, lag_ms: int, now_ms: int,
                  bound_ms: int = ALERT_LAG_BOUND_MS) -> int | None:
    """Since when evaluation has lagged beyond ``bound_ms`` without a break (None: it has not)."""
    if lag_ms <= bound_ms:
        return None
    return now_ms if since_ms is None else since_ms


def self_problems(*, now_ms: int, connected: bool, disconnected_since_ms: int | None,
                  last_event_ms: int | None, started_ms: int, failed_notifications: int,
                  store_errors_recent: int, broker_grace_ms: int = 60_000,
                  silence_ms: int = 600_000, influx_failing_since_ms: int | None = None,
                  influx_backlog: int = 0, influx_grace_ms: int = 300_000,
                  alert_lag_ms: int = 0, alert_lagging_since_ms: int | None = None,
                  alert_lag_grace_ms: int = ALERT_LAG_GRACE_MS,
                  failing_channels: Mapping[str, str] | None = None,
                  refusals: Refusals | None = None, max_devices_per_gateway: int = 0,
                  over_bound_window_ms: int = OVER_BOUND_WINDOW_MS) -> dict[str, str]:
    """What is wrong with the hub itself, as rule name -> detail (empty when healthy)."""
    problems: dict[str, str] = {}
    if not connected and disconnected_since_ms is not None \
            and now_ms - disconnected_since_ms >= broker_grace_ms:
        problems["hub-broker-down"] = (f"the hub has been disconnected from its broker for "
                                       f"{(now_ms - disconnected_since_ms) // 1000}s")
    quiet_since = last_event_ms if last_event_ms is not None else started_ms
    if connected and now_ms - quiet_since >= silence_ms:
        problems["hub-no-events"] = (f"no event stored for {(now_ms - quiet_since) // 1000}s: "
                                     "is the fleet, the broker or the network down?")
    if failed_notifications:
        problems["hub-notifications-failing"] = (
            f"{failed_notifications} notification(s) failed for good or keep failing: check "
            "the channels "
            "(careflow notify list --state failed; careflow notify test CHANNEL)")
        for channel, reason in sorted((failing_channels or {}).items()):
            problems["hub-notifications-failing"] += f"; {channel}: {reason[:200]}"
    if store_errors_recent:
        problems["hub-store-failing"] = (f"{store_errors_recent} store write failure(s) in the "
                                         "last minute: check the disk")
    if influx_failing_since_ms is not None and now_ms - influx_failing_since_ms >= influx_grace_ms:
        problems["hub-influx-failing"] = (
            f"InfluxDB writes have failed for {(now_ms - influx_failing_since_ms) // 1000}s; "
            f"{influx_backlog} event(s) wait in the log and will follow (dashboards lag, "
            "nothing is lost): check InfluxDB and `careflow status`")
    if alert_lagging_since_ms is not None and now_ms - alert_lagging_since_ms >= alert_lag_grace_ms:
        problems["hub-alerts-lagging"] = (
            f"rule evaluation has run more than {ALERT_LAG_BOUND_MS // 1000}s behind ingest for "
            f"{(now_ms - alert_lagging_since_ms) // 1000}s (now {alert_lag_ms // 1000}s): "
            "alarms are announced late; check CPU, disk and `careflow status`")
    if refusals is not None and now_ms - refusals.last_ms < over_bound_window_ms:
        problems["hub-devices-over-bound"] = _over_bound_detail(refusals,
                                                                max_devices_per_gateway)
    return problems


def _over_bound_detail(refusals: Refusals, bound: int) -> str:
    since = time.strftime("%H:%M:%S UTC", time.gmtime(refusals.since_ms / 1000))
    where = ", ".join(refusals.gateways)
    if refusals.more_gateways:
        where += f" and up to {refusals.more_gateways} more"
    alarms = (f" {refusals.alarms} of them CARE ALARMS from such devices: they were not "
              "evaluated, check those devices now (the dead letters name them);"
              if refusals.alarms else "")
    return (f"{refusals.events} event(s) from new devices beyond the bound of {bound} devices "
            f"per gateway (CAREFLOW_MAX_DEVICES_PER_GATEWAY) dead-lettered as too_many_devices "
            f"since {since}, from gateway(s) {where};{alarms} see careflow deadletter list "
            "--code too_many_devices, then raise the bound or find out what invents devices")


class DeadMansSwitch:
    """GET ``url`` every ``interval_s`` while the hub runs this thread and ``healthy()`` holds
    (the hub passes "the alert loop still ticks": a stuck loop cannot alert about itself)."""

    def __init__(self, url: str, interval_s: float = 60.0, *,
                 healthy: Callable[[], bool] = lambda: True) -> None:
        self.url = url
        self.interval_s = interval_s
        self.healthy = healthy
        self.pings = 0
        self.failures = 0
        self.withheld = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dead-mans-switch", daemon=True)

    def start(self) -> None:
        """Begin pinging."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.healthy():
                self.withheld += 1
                log.error("dead man's switch withheld: the hub's alert loop is stuck")
                self._stop.wait(self.interval_s)
                continue
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:  # noqa: S310
                    answer.read(1024)
                self.pings += 1
            except OSError as exc:
                self.failures += 1
                log.warning("dead man's switch ping failed", extra={"error": str(exc)})
            self._stop.wait(self.interval_s)
