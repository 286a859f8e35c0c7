"""Alerting decisions without I/O: what the store says, read once (a snapshot), in; the writes
to make (actions) out. The alert stage loads the snapshot and applies the actions in one
transaction (plan, then apply), so no decision reads the store half way through.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from careflow.hub.alerting.mute import Silence, inhibited_by, silenced_by
from careflow.hub.alerting.notify import render
from careflow.hub.alerting.routing import Decision, Reminder, next_reminder_ms, reminder_due
from careflow.hub.alerting.rules import EscalationStep, Routing, Rule
from careflow.hub.store.interface import Incident, Outgoing

__all__ = [
    "SILENCED_RECHECK_MS",
    "Remind",
    "ReminderSnapshot",
    "Reschedule",
    "Setup",
    "plan_reminders",
]

# A silenced escalation step is looked at again this often, in case the silence is expired early.
SILENCED_RECHECK_MS = 5_000


# -- what the plan is made from ---------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    """What the stage is configured with: rules, routing, escalation, channels."""

    rules: Mapping[str, Rule]
    escalation: Mapping[str, tuple[EscalationStep, ...]]
    routing: Routing
    channels: Collection[str]  # the configured channels, in their configured order
    group_wait_ms: int  # the stage's own (tests shorten it); a route's own group_wait wins
    runbook_url: str | None
    # (rule, severity, gateway, device) -> where it goes; pure, over the sites and device kinds
    # the stage learned from provision events
    decide: Callable[[str, str, str, str], Decision]

    def runbook(self, path: str | None) -> str | None:
        """A rule's runbook as people should get it: a link when a base URL is configured."""
        if path is None or self.runbook_url is None or "://" in path:
            return path
        return self.runbook_url.rstrip("/") + "/" + path.lstrip("/")

    def steps(self, decision: Decision) -> tuple[EscalationStep, ...]:
        """The escalation steps a decision walks (none without a policy)."""
        return tuple(self.escalation.get(decision.escalation or "", ()))



@dataclass(frozen=True, slots=True, kw_only=True)
class ReminderSnapshot:
    """What one clock tick's escalation walk is decided on."""

    now_ms: int
    due: tuple[Incident, ...]  # open incidents whose reminder is due, the longest due first
    silences: tuple[Silence, ...]  # active now
    offline: frozenset[str] = frozenset()
    gateway_firing: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# -- what the plan asks for -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Remind:
    """Record that an escalation step or a repeat went out, with its messages (compare-and-set
    on the steps sent, so each goes out once)."""

    incident_id: int
    kind: Reminder
    sent_before: int
    channels: tuple[str, ...]
    notify: tuple[Outgoing, ...]
    group_key: str
    next_due_ms: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reschedule:
    """When the escalation walk looks at an open incident again (None: never)."""

    incident_id: int
    next_due_ms: int | None


# -- shared by the decisions ------------------------------------------------------------------

def _gateway_offline(setup: Setup, offline: frozenset[str],
                     gateway_firing: Mapping[str, tuple[str, ...]], gateway: str) -> bool:
    """Offline by its presence, or by an absence rule firing for the gateway itself (what
    fires may include incidents of rules since removed from the configuration)."""
    return gateway in offline or any(
        name in setup.rules and setup.rules[name].kind == "absence"
        for name in gateway_firing.get(gateway, ()))


def _gateway_rule_firing(setup: Setup, gateway_firing: Mapping[str, tuple[str, ...]],
                         rule: Rule, gateway: str) -> str | None:
    """Another rule watching gateways themselves that fires for this gateway, if any."""
    if rule.kind != "absence" or getattr(rule, "only_gateways", False):
        return None
    return next((name for name in gateway_firing.get(gateway, ())
                 if name != rule.name and getattr(setup.rules.get(name), "only_gateways", False)),
                None)


# -- the escalation walk ------------------------------------------------------------------------

def plan_reminders(snapshot: ReminderSnapshot, setup: Setup) -> tuple[Remind | Reschedule, ...]:
    """Escalation steps, then repeats every repeat_interval, for the open incidents that are due.

    Args:
        snapshot: the due incidents (the longest due first), the silences active now, and the
            gateways that are offline.
        setup: rules, routing, escalation and channels.

    Returns:
        One action per due incident, in the order given: a reminder to record (with no
        messages for a repeat slot missed while the hub was down, or one silenced or
        inhibited), or when to look at it again (not due yet; a silenced escalation step).
    """
    now = snapshot.now_ms
    out: list[Remind | Reschedule] = []
    for incident in snapshot.due:
        decision = setup.decide(incident.rule, incident.severity, incident.gateway,
                                incident.device)
        steps = setup.steps(decision)
        after_ms = tuple(s.after for s in steps)
        sent = incident.escalation_sent
        due = reminder_due(after_ms, sent=sent, state=incident.state,
                           triggered_ms=incident.triggered_ms, now_ms=now,
                           repeat_interval_ms=decision.repeat_interval_ms)
        if due is None:  # not yet (or never): look again when it will be
            out.append(Reschedule(incident_id=incident.id, next_due_ms=next_reminder_ms(
                after_ms, sent=sent, state=incident.state, triggered_ms=incident.triggered_ms,
                repeat_interval_ms=decision.repeat_interval_ms)))
            continue
        after = next_reminder_ms(after_ms, sent=sent + 1, state=incident.state,
                                 triggered_ms=incident.triggered_ms,
                                 repeat_interval_ms=decision.repeat_interval_ms)
        silenced = silenced_by(snapshot.silences, incident.rule, incident.gateway,
                               incident.device, now)
        if due is Reminder.ESCALATE:
            if silenced is None:
                out.append(_reminder(setup, incident, due, steps[sent].channels, now,
                                     after))
            else:  # a silenced step waits for the silence to end (or to be expired early)
                out.append(Reschedule(incident_id=incident.id,
                                      next_due_ms=min(silenced.ends_ms, now + SILENCED_RECHECK_MS)))
            continue
        muted = silenced is not None or _inhibited(setup, snapshot, incident)
        channels = () if due is Reminder.SKIP or muted else decision.channels
        out.append(_reminder(setup, incident, due, channels, now, after))
    return tuple(out)


def _inhibited(setup: Setup, snapshot: ReminderSnapshot, incident: Incident) -> bool:
    rule = setup.rules.get(incident.rule)
    return rule is not None and inhibited_by(
        rule_kind=rule.kind, gateway=incident.gateway, device=incident.device,
        gateway_offline=_gateway_offline(setup, snapshot.offline, snapshot.gateway_firing,
                                         incident.gateway),
        gateway_announced_by=_gateway_rule_firing(setup, snapshot.gateway_firing, rule,
                                                  incident.gateway)) is not None


def _reminder(setup: Setup, incident: Incident, kind: Reminder, channels: tuple[str, ...],
              now_ms: int, next_due_ms: int | None) -> Remind:
    """An escalation step (to every channel of the step, grouped by nothing) or a repeat (to
    the configured channels of its route, one message per gateway)."""
    rule = setup.rules.get(incident.rule)
    escalate = kind is Reminder.ESCALATE
    title, body = render(kind="escalation" if escalate else "repeat",
                         severity=incident.severity, summary=incident.summary,
                         detail=incident.detail, gateway=incident.gateway,
                         device=incident.device, since_ms=incident.triggered_ms,
                         runbook=setup.runbook(rule.runbook if rule else None))
    notify = tuple((name, title, body) for name in channels
                   if escalate or name in setup.channels)
    return Remind(incident_id=incident.id, kind=kind, sent_before=incident.escalation_sent,
                  channels=channels, notify=notify,
                  group_key="" if escalate else incident.gateway, next_due_ms=next_due_ms)
