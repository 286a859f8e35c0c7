"""The hub's health as one report: what `careflow status` prints and the agent reads as evidence
(the action ``hub.status``), built in one place so the two never disagree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from careflow.core.errors import CareflowError
from careflow.hub.alerting.incidents import default_rules
from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.ops.rule_controls import in_force
from careflow.hub.store.interface import Store
from careflow.hub.store.records import UNRESOLVED, EventFilter, NotificationState, RuleControl
from careflow.schemas import format_rfc3339

__all__ = ["STALE_HEALTH_MS", "health_report", "is_healthy", "rules_quieted"]

STALE_HEALTH_MS = 5_000  # an older health report means the hub is not running


def rules_quieted(store: Store, now_ms: int) -> list[RuleControl]:
    """The rule controls the hub applies now (never one of a critical rule), by rule."""
    try:
        rules = default_rules().rules
    except CareflowError:  # a broken rules folder: the hub would not start; show the rows
        return store.rule_controls(now_ms=now_ms)
    severities = {**SELF_RULES, **{rule.name: rule.severity for rule in rules}}
    now = in_force(store.rule_controls(now_ms=now_ms), severities, now_ms)
    return sorted([*now.muted.values(), *now.disabled.values()], key=lambda c: c.rule)


def _iso(ms: int) -> str:
    return format_rfc3339(datetime.fromtimestamp(ms / 1000, tz=UTC))


def health_report(store: Store, now_ms: int) -> dict[str, Any]:
    """The hub's last health report (connected, rates, queues, lag, InfluxDB, digests) with
    ``running`` (written less than 5 s ago), ``reported_ms_ago``, and the store's counts: dead
    letters, gaps, events, active incidents, notifications waiting and failed, the rules
    quieted. JSON-able."""
    health = store.read_health()
    report: dict[str, Any] = {"running": False}
    if health is not None:
        written_ms, report = health[0], dict(health[1])
        report["running"] = now_ms - written_ms < STALE_HEALTH_MS
        report["reported_ms_ago"] = now_ms - written_ms
    report["dead_letters_kept"] = store.dead_letter_count()
    report["sequence_gaps"] = store.total_gaps()
    report["events_kept"] = store.count(EventFilter())
    report["incidents_active"] = store.count_incidents(states=UNRESOLVED)
    report["notifications_waiting"] = store.count_notifications(
        states=(NotificationState.PENDING, NotificationState.SENDING))
    report["notifications_failed"] = store.count_notifications(states=(NotificationState.FAILED,))
    influx = report.pop("influx", None)
    if isinstance(influx, dict):
        report.update({f"influx_{key}": value for key, value in influx.items()})
    digests = report.pop("digests", None)
    if isinstance(digests, dict):
        report.update({f"digests_{key}": value for key, value in digests.items()})
    report.pop("rules_in_force", None)  # the hub's view; the store's rows are read here
    report["rules_quieted"] = [
        {"rule": c.rule, "control": str(c.kind),
         "until": None if c.until_ms is None else _iso(c.until_ms), "by": c.by,
         "reason": c.reason} for c in rules_quieted(store, now_ms)]
    return report


def is_healthy(report: dict[str, Any]) -> bool:
    """Running and connected to its broker: `careflow status` exits 0."""
    return bool(report["running"] and report.get("connected"))
