"""Routing and grouping without I/O: which channels hear about an incident, under which
escalation policy, when a batch of one group may go out, and when an unacknowledged incident is
announced again.

Kept apart from the stage that applies it (Alertmanager keeps ``dispatch/route.go`` apart from
``dispatch.go``). The caller passes ``now`` in (milliseconds) and what the store knows.

* Routes are tried in order; the first whose patterns all match wins. When none matches, the
  default route keeps careflow's original behaviour: critical → ``oncall``, else → ``ops``.
* ``group_wait``: a new group (one gateway, one channel) waits this long so that a burst goes out
  as one message. ``group_interval``: after a group's message went out, what joins that group
  waits until this long after it, and goes out as one message. Critical incidents never wait.
* ``repeat_interval``: an open, unacknowledged incident is announced again this often — after
  its escalation policy's last step when it has one (the steps are the reminders until then).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from careflow.hub.alerting.rules import EscalationStep, Routing

__all__ = [
    "CHECK_CHANNEL",
    "CHECK_GATEWAYS",
    "DEFAULT_ROUTE",
    "Decision",
    "Reminder",
    "decide",
    "default_channels",
    "firing_send_at",
    "next_reminder_ms",
    "reachable_channels",
    "reminder_due",
]

DEFAULT_ROUTE = -1  # Decision.route of the built-in default
# careflow-check.sh --live's channel (shipped route: gateway check-*): may have no URL, its
# synthetic incidents are then recorded and announced nowhere (never to on-call)
CHECK_CHANNEL = "check"
CHECK_GATEWAYS = "check-*"  # the gateways the shipped route sends there (rules/default.yaml)


def default_channels(severity: str) -> tuple[str, ...]:
    """The built-in route: critical incidents go to ``oncall``, everything else to ``ops``."""
    return ("oncall",) if severity == "critical" else ("ops",)


@dataclass(frozen=True, slots=True)
class Decision:
    """What routing decided for one incident."""

    route: int  # index into routing.routes, or DEFAULT_ROUTE
    channels: tuple[str, ...]
    escalation: str | None  # key of the escalation policy to walk, or None for none
    group_wait_ms: int
    group_interval_ms: int
    repeat_interval_ms: int


def decide(routing: Routing, labels: Mapping[str, str],
           policies: Mapping[str, tuple[EscalationStep, ...]]) -> Decision:
    """The first route whose patterns match ``labels`` (severity, rule, site, gateway, device,
    kind), or the default route; unset intervals fall back to the routing section's."""
    severity = labels.get("severity", "")
    default_policy = severity if severity in policies else None
    for index, route in enumerate(routing.routes):
        if route.match.matches(dict(labels)):
            policy = {None: default_policy, "none": None}.get(route.escalation, route.escalation)
            return Decision(
                index, route.channels, policy,
                routing.group_wait if route.group_wait is None else route.group_wait,
                routing.group_interval if route.group_interval is None else route.group_interval,
                routing.repeat_interval if route.repeat_interval is None
                else route.repeat_interval)
    return Decision(DEFAULT_ROUTE, default_channels(severity), default_policy,
                    routing.group_wait, routing.group_interval, routing.repeat_interval)


def reachable_channels(routing: Routing, severity: str) -> dict[str, str]:
    """Every channel an incident of ``severity`` could be routed to, each with why (the route
    or the default): all of them need a URL before the hub starts."""
    out: dict[str, str] = {}
    for index, route in enumerate(routing.routes):
        if not fnmatch.fnmatchcase(severity, route.match.severity):
            continue
        for channel in route.channels:
            out.setdefault(channel, f"route {index + 1}")
        others = route.match.model_dump(exclude={"severity"})
        if all(pattern == "*" for pattern in others.values()):
            return out  # a catch-all for this severity: the default route is never reached
    for channel in default_channels(severity):
        out.setdefault(channel, "the default route")
    return out


def firing_send_at(*, now_ms: int, critical: bool, group_wait_ms: int, group_interval_ms: int,
                   last_sent_ms: int | None, pending_at_ms: int | None) -> int:
    """When a new firing notification of a group (one channel, one gateway) may go out.

    Args:
        now_ms: when the incident opened.
        critical: care alarms and other critical incidents never wait.
        group_wait_ms: the wait of a new group.
        group_interval_ms: the least time between two messages of one group.
        last_sent_ms: when the group's last firing message went out, if ever.
        pending_at_ms: when a batch of the group already waiting goes out, if one waits.

    Returns:
        The earliest time to send it (``now_ms`` or later).
    """
    if critical:
        return now_ms
    if pending_at_ms is not None:  # join the batch that waits already
        return max(now_ms, pending_at_ms)
    if last_sent_ms is None or now_ms - last_sent_ms >= group_interval_ms:
        return now_ms + group_wait_ms  # a new group, or one quiet for a whole interval
    return last_sent_ms + group_interval_ms


class Reminder(StrEnum):
    """What :func:`reminder_due` asks for."""

    ESCALATE = "escalate"  # send escalation step ``index``
    REPEAT = "repeat"  # announce the still-open incident again
    SKIP = "skip"  # a repeat slot passed while the hub was down: count it, send nothing


def reminder_due(steps_after_ms: tuple[int, ...], *, sent: int, state: str, triggered_ms: int,
                 now_ms: int, repeat_interval_ms: int) -> Reminder | None:
    """The next reminder of an incident now, or None.

    Only an ``open`` incident is reminded about (acknowledging or resolving it stops that).
    ``sent`` counts the escalation steps and repeats already recorded, so each goes out once.
    Repeats start after the last escalation step (or after triggering, without a policy) and
    come every ``repeat_interval_ms`` (0: never); repeat slots missed while the hub was down are
    skipped rather than sent in a burst.
    """
    if state != "open":
        return None
    if sent < len(steps_after_ms):
        return Reminder.ESCALATE if now_ms - triggered_ms >= steps_after_ms[sent] else None
    if repeat_interval_ms <= 0:
        return None
    base = steps_after_ms[-1] if steps_after_ms else 0
    slots = (now_ms - triggered_ms - base) // repeat_interval_ms  # repeat times passed
    done = sent - len(steps_after_ms)
    if done >= slots:
        return None
    return Reminder.REPEAT if done == slots - 1 else Reminder.SKIP



def next_reminder_ms(steps_after_ms: tuple[int, ...], *, sent: int, state: str,
                     triggered_ms: int, repeat_interval_ms: int) -> int | None:
    """When :func:`reminder_due` will next ask for something (None: never, as things stand).

    The store keeps this per open incident, so a clock tick walks only what is due, oldest due
    first, however many incidents are open. ``reminder_due(now)`` is not None exactly when
    ``now`` has reached it.
    """
    if state != "open":
        return None
    if sent < len(steps_after_ms):
        return triggered_ms + steps_after_ms[sent]
    if repeat_interval_ms <= 0:
        return None
    base = steps_after_ms[-1] if steps_after_ms else 0
    done = sent - len(steps_after_ms)
    return triggered_ms + base + (done + 1) * repeat_interval_ms
