"""Alerting decisions without I/O: what the store says, read once (a snapshot), in; the writes
to make (actions) out. The alert stage loads the snapshot and applies the actions in one
transaction (plan, then apply), so no decision reads the store half way through.

A step's changes depend on each other: a care alarm raised twice in one commit opens an incident
and then raises that one again; a firing message queued earlier in the step is the batch a later
one joins; an incident opened earlier is a trigger for flapping. :func:`plan_changes` walks the
transitions in order over its own working copy of the snapshot, updated as each action would
update the store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from careflow.hub.alerting.evaluate import Transition
from careflow.hub.alerting.mute import FLAP_WINDOW_MS, Silence, flapping, inhibited_by, silenced_by
from careflow.hub.alerting.notify import avoid_failing, raised_again_text, render
from careflow.hub.alerting.routing import (
    Decision,
    Reminder,
    firing_send_at,
    next_reminder_ms,
    reminder_due,
)
from careflow.hub.alerting.rules import EscalationStep, Routing, Rule
from careflow.hub.alerting.selfwatch import HUB_DEVICE, HUB_GATEWAY, SELF_RULES
from careflow.hub.ops.rule_controls import quiet_refusal
from careflow.hub.store.records import Incident, IncidentState, Outgoing, Severity

__all__ = [
    "EVALUATION_FAILED_RULE",
    "HUB_RUNBOOK",
    "SILENCED_RECHECK_MS",
    "Action",
    "Change",
    "ChangePlan",
    "ChangeSnapshot",
    "GroupTiming",
    "Key",
    "Open",
    "RaiseAgain",
    "Remind",
    "ReminderSnapshot",
    "Reschedule",
    "Resolve",
    "SetAside",
    "Setup",
    "Supersede",
    "failure_detail",
    "first_few",
    "plan_changes",
    "plan_failure_alert",
    "plan_reminders",
    "plan_self_check",
]

# A stored event the rules could not evaluate (a bug in careflow) is set aside, never retried
# for ever in front of every alarm after it; the hub's own alert names it.
EVALUATION_FAILED_RULE = "hub-evaluation-failed"
HUB_RUNBOOK = "runbooks/hub-unhealthy.md"
# A silenced escalation step is looked at again this often, in case the silence is expired early.
SILENCED_RECHECK_MS = 5_000
_NAMED = 5  # events or devices a hub alert names; the rest are counted

Key: TypeAlias = tuple[str, str, str]  # (rule, gateway, device)
# An incident an action refers to: > 0 a stored incident's id; < 0 the incident an earlier action
# of the same plan opens (its ``ref``), whose id the store gives only when it is applied.
Ref: TypeAlias = int


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


@dataclass(frozen=True, slots=True)
class GroupTiming:
    """The firing messages of one group (channel, gateway), as the store holds them."""

    last_sent_ms: int | None  # when the newest one went out
    pending_at_ms: int | None  # when the batch that waits goes out


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeSnapshot:
    """What the changes of one step (a commit, a catch-up chunk, a clock tick, a self-check)
    are decided on; read once, in the transaction that applies them."""

    unresolved: Mapping[Key, Incident] = field(default_factory=dict)  # keys read; rest: none
    triggers: Mapping[Key, tuple[int, ...]] = field(default_factory=dict)  # recent triggers
    silences: tuple[Silence, ...] = ()  # active at the step's moments
    offline: frozenset[str] = frozenset()  # gateways whose presence is offline
    gateway_firing: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # (gw, gw)'s
    groups: Mapping[tuple[str, str], GroupTiming] = field(default_factory=dict)
    failing: Mapping[str, str] = field(default_factory=dict)  # channels failing, with why
    # rules a person muted or disabled (careflow rules mute), with who and why: never a
    # critical one (careflow.hub.ops.rule_controls, checked again here)
    quieted: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReminderSnapshot:
    """What one clock tick's escalation walk is decided on."""

    now_ms: int
    due: tuple[Incident, ...]  # open incidents whose reminder is due, the longest due first
    silences: tuple[Silence, ...]  # active now
    offline: frozenset[str] = frozenset()
    gateway_firing: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    quieted: Mapping[str, str] = field(default_factory=dict)  # as in ChangeSnapshot


# -- what the plan asks for -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Open:
    """Open an incident with its messages (the store ignores it when one is unresolved)."""

    ref: Ref
    rule: str
    gateway: str
    device: str
    severity: str
    summary: str
    detail: str
    at_ms: int
    notify: tuple[Outgoing, ...]
    group_wait_ms: int
    next_due_ms: int | None
    expect_new: bool  # what the plan assumed: no incident of this key was unresolved
    muted: str | None = None  # why it is not announced
    mute_error: Exception | None = None  # a bug while deciding that: announced all the same
    self_alert: bool = False  # one of the hub's own


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolve:
    """Resolve what is unresolved for a rule and source, with its messages."""

    rule: str
    gateway: str
    device: str
    at_ms: int
    by: str
    notify: tuple[Outgoing, ...]
    muted: str | None = None
    mute_error: Exception | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseAgain:
    """Count a new raise on a still-open incident and announce it (compare-and-set)."""

    incident: Ref
    rule: str
    gateway: str
    device: str
    at_ms: int
    detail: str
    notify: tuple[Outgoing, ...]
    group_wait_ms: int
    raises: int  # the raises it then carries
    muted: str | None = None
    mute_error: Exception | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Supersede:
    """A new raise of an acknowledged incident: a new incident follows it (compare-and-set)."""

    ref: Ref
    incident: Ref
    rule: str
    gateway: str
    device: str
    at_ms: int
    detail: str
    notify: tuple[Outgoing, ...]
    group_wait_ms: int
    next_due_ms: int | None
    raises: int
    muted: str | None = None
    mute_error: Exception | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SetAside:
    """A change a bug kept from being planned: not recorded, announced as hub-evaluation-failed
    (retried from the log, it would fail again and hold every alarm after it)."""

    what: str
    alarm: bool
    error: Exception


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


# the messages of one change, or why it is muted, and a bug met while deciding that
_Messages: TypeAlias = tuple[tuple[Outgoing, ...], str | None, Exception | None]
Change: TypeAlias = Open | Resolve | RaiseAgain | Supersede
Action: TypeAlias = Change | SetAside | Remind | Reschedule


@dataclass(frozen=True, slots=True)
class ChangePlan:
    """The actions of one step, one per transition in order (plus the hub's own alerts)."""

    actions: tuple[Change | SetAside, ...]

    @property
    def set_aside(self) -> tuple[SetAside, ...]:
        """The changes a bug kept from being planned."""
        return tuple(a for a in self.actions if isinstance(a, SetAside))


# -- the working copy -------------------------------------------------------------------------

@dataclass(slots=True)
class _View:
    """The snapshot as the actions planned so far would leave the store."""

    setup: Setup
    snapshot: ChangeSnapshot
    unresolved: dict[Key, Incident]
    triggers: defaultdict[Key, list[int]]
    groups: dict[tuple[str, str], GroupTiming]
    actions: list[Change | SetAside] = field(default_factory=list)
    _refs: int = 0

    @classmethod
    def of(cls, snapshot: ChangeSnapshot, setup: Setup) -> _View:
        triggers: defaultdict[Key, list[int]] = defaultdict(list)
        for key, times in snapshot.triggers.items():
            triggers[key].extend(times)
        return cls(setup, snapshot, dict(snapshot.unresolved), triggers, dict(snapshot.groups))

    def new_ref(self) -> Ref:
        self._refs -= 1
        return self._refs

    def queued(self, notify: Sequence[Outgoing], gateway: str, send_at_ms: int) -> None:
        """Firing messages written for this gateway: the batch each group now waits for."""
        for channel, _, _ in notify:
            old = self.groups.get((channel, gateway), GroupTiming(None, None))
            pending = old.pending_at_ms
            self.groups[(channel, gateway)] = GroupTiming(
                old.last_sent_ms, send_at_ms if pending is None else min(pending, send_at_ms))

    def opened(self, incident: Incident, notify: Sequence[Outgoing], wait_ms: int) -> None:
        key = (incident.rule, incident.gateway, incident.device)
        self.unresolved[key] = incident
        self.triggers[key].append(incident.triggered_ms)
        self.queued(notify, incident.gateway, incident.triggered_ms + wait_ms)


# -- a commit, a catch-up chunk, a clock tick ---------------------------------------------------

def plan_changes(transitions: Sequence[Transition], snapshot: ChangeSnapshot,
                 setup: Setup) -> ChangePlan:
    """The incident changes for these transitions, in order.

    Args:
        transitions: what the rules found, in the order found.
        snapshot: the store as it was before them (see :class:`ChangeSnapshot`).
        setup: rules, routing, escalation and channels.

    Returns:
        One action per transition: open, resolve, raise again, supersede, or set aside when a
        bug kept it from being planned (never raised: it would hold every alarm after it).
    """
    view = _View.of(snapshot, setup)
    for transition in transitions:
        try:
            _plan_one(view, transition)
        except Exception as exc:  # a bug must not hold this change, nor the rest
            rule = setup.rules.get(transition.rule)
            view.actions.append(SetAside(
                what=f"{transition.gateway}/{transition.device} {transition.rule} "
                     f"{transition.status} (not recorded)",
                alarm=transition.status == "firing" and rule is not None and rule.kind == "event",
                error=exc))
    return ChangePlan(tuple(view.actions))


def _summary(rule: Rule, transition: Transition) -> str:
    fields = defaultdict(str, gateway=transition.gateway, device=transition.device,
                         rule=rule.name)
    text = rule.summary or f"{rule.name} on {transition.gateway}/{transition.device}"
    try:
        return text.format_map(fields)
    except (ValueError, LookupError, AttributeError, TypeError):  # "{device.x}", "{device[x]}"
        return text  # as written: a template that cannot be filled must not hold the alarm


def _plan_one(view: _View, transition: Transition) -> None:
    rule = view.setup.rules[transition.rule]
    summary = _summary(rule, transition)
    key = (rule.name, transition.gateway, transition.device)
    if transition.status == "firing":
        if rule.kind == "event" and _raise_again(view, rule, transition, summary):
            return
        notify, muted, error = _outgoing(view, rule, transition, summary, "firing")
        wait = _hold_ms(view, rule, transition, notify)
        new = key not in view.unresolved
        ref = view.new_ref() if new else 0
        view.actions.append(Open(
            ref=ref, rule=rule.name, gateway=transition.gateway, device=transition.device,
            severity=rule.severity, summary=summary, detail=transition.detail,
            at_ms=transition.at_ms, notify=notify, group_wait_ms=wait,
            next_due_ms=_first_due_ms(view.setup, rule.name, rule.severity, transition.gateway,
                                      transition.device, transition.at_ms),
            expect_new=new, muted=muted, mute_error=error))
        if new:
            view.opened(Incident(ref, rule.name, transition.gateway, transition.device,
                                 Severity(rule.severity), IncidentState.OPEN, summary,
                                 transition.detail,
                                 transition.at_ms, None, None, None, None,
                                 first_raised_ms=transition.at_ms,
                                 last_raised_ms=transition.at_ms), notify, wait)
    else:
        notify, muted, error = _outgoing(view, rule, transition, summary, "resolved")
        view.actions.append(Resolve(
            rule=rule.name, gateway=transition.gateway, device=transition.device,
            at_ms=transition.at_ms, by="careflow (condition cleared)", notify=notify,
            muted=muted, mute_error=error))
        view.unresolved.pop(key, None)


def _raise_again(view: _View, rule: Rule, transition: Transition, summary: str) -> bool:
    """An event rule (a care alarm) raised while its incident is unresolved: every raise is a
    new emergency (see :func:`_raise_unresolved`)."""
    return _raise_unresolved(
        view, rule.name, rule.severity, transition.gateway, transition.device,
        transition.at_ms, transition.detail,
        lambda again: _outgoing(view, rule, transition, summary, "raised-again", again=again),
        lambda notify: _hold_ms(view, rule, transition, notify))


def _raise_unresolved(view: _View, rule: str, severity: str, gateway: str, device: str,
                      at_ms: int, detail: str, outgoing: Callable[[str], _Messages],
                      hold: Callable[[tuple[Outgoing, ...]], int]) -> bool:
    """A new raise of an unresolved incident. Still open: count it and announce it again at
    once (the escalation walk goes on: nobody answered yet). Acknowledged: someone had the
    last raise, so a new incident follows it, announced at once, and its escalation starts
    from this raise. False when nothing is unresolved (open a new incident as usual).
    ``outgoing`` renders the messages from the "raised again" text; ``hold`` is their wait."""
    key = (rule, gateway, device)
    existing = view.unresolved.get(key)
    if existing is None:
        return False
    acknowledged = existing.state == "acknowledged"
    first = existing.first_raised_ms or existing.triggered_ms
    notify, muted, error = outgoing(raised_again_text(
        raises=existing.raises + 1, first_raised_ms=first,
        acknowledged_by=existing.acknowledged_by if acknowledged else None,
        acknowledged_ms=existing.acknowledged_ms if acknowledged else None))
    wait = hold(notify)
    if acknowledged:
        ref = view.new_ref()
        view.actions.append(Supersede(
            ref=ref, incident=existing.id, rule=rule, gateway=gateway, device=device,
            at_ms=at_ms, detail=detail, notify=notify, group_wait_ms=wait,
            next_due_ms=_first_due_ms(view.setup, rule, severity, gateway, device, at_ms),
            raises=existing.raises + 1, muted=muted, mute_error=error))
        view.opened(replace(existing, id=ref, state=IncidentState.OPEN, detail=detail, triggered_ms=at_ms,
                            acknowledged_ms=None, acknowledged_by=None, escalation_sent=0,
                            raises=existing.raises + 1, first_raised_ms=first,
                            last_raised_ms=at_ms, follows_id=existing.id), notify, wait)
    else:
        view.actions.append(RaiseAgain(
            incident=existing.id, rule=rule, gateway=gateway, device=device, at_ms=at_ms,
            detail=detail, notify=notify, group_wait_ms=wait, raises=existing.raises + 1,
            muted=muted, mute_error=error))
        view.unresolved[key] = replace(existing, raises=existing.raises + 1,
                                       last_raised_ms=at_ms, detail=detail)
        view.queued(notify, gateway, at_ms + wait)
    return True


def _first_due_ms(setup: Setup, rule: str, severity: str, gateway: str, device: str,
                  at_ms: int) -> int | None:
    """When a new incident's first escalation step or repeat is due (None: never)."""
    decision = setup.decide(rule, severity, gateway, device)
    return next_reminder_ms(tuple(s.after for s in setup.steps(decision)), sent=0, state="open",
                            triggered_ms=at_ms, repeat_interval_ms=decision.repeat_interval_ms)


def _outgoing(view: _View, rule: Rule, transition: Transition, summary: str, kind: str, *,
              again: str | None = None) -> _Messages:
    """The messages of one change, or none and why it is muted; a bug while deciding whether to
    mute is returned with the messages (announced: better than held)."""
    error: Exception | None = None
    try:
        reason = _muted(view, rule, transition)
    except Exception as exc:  # a bug must not hold this change, nor any after it
        reason, error = None, exc
    if reason is not None:
        return (), reason, None
    title, body = render(kind=kind, severity=rule.severity, summary=summary,
                         detail=transition.detail, gateway=transition.gateway,
                         device=transition.device, since_ms=transition.at_ms,
                         runbook=view.setup.runbook(rule.runbook), again=again)
    channels = view.setup.decide(rule.name, rule.severity, transition.gateway,
                                 transition.device).channels
    return tuple((name, title, body) for name in channels if name in view.setup.channels), \
        None, error


def _muted(view: _View, rule: Rule, transition: Transition) -> str | None:
    """Why this change is recorded but not announced, if it is not announced."""
    key = (rule.name, transition.gateway, transition.device)
    if rule.kind != "event" and flapping(
            [at for at in view.triggers.get(key, ()) if at >= transition.at_ms - FLAP_WINDOW_MS],
            now_ms=transition.at_ms):
        return "flapping: it fired and cleared again and again; see careflow incidents list"
    quieted = _quieted(view.snapshot.quieted, rule.name, rule.severity)
    if quieted is not None:
        return quieted
    silence = silenced_by(view.snapshot.silences, rule.name, transition.gateway,
                          transition.device, transition.at_ms)
    if silence is not None:
        return f"silenced by #{silence.id} ({silence.comment}, {silence.created_by})"
    return inhibited_by(rule_kind=rule.kind, gateway=transition.gateway,
                        device=transition.device,
                        gateway_offline=_gateway_offline(view.setup, view.snapshot.offline,
                                                         view.snapshot.gateway_firing,
                                                         transition.gateway),
                        gateway_announced_by=_gateway_rule_firing(
                            view.setup, view.snapshot.gateway_firing, rule, transition.gateway))


def _quieted(quieted: Mapping[str, str], rule: str, severity: str) -> str | None:
    """Why a rule a person quieted is not announced; never a critical one, whatever the
    snapshot says (a care alarm is never muted by mistake)."""
    why = quieted.get(rule)
    if why is None or quiet_refusal(rule, severity) is not None:
        return None
    return f"rule {why}"


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


def _hold_ms(view: _View, rule: Rule, transition: Transition,
             notify: Sequence[Outgoing]) -> int:
    """How long a new firing notification waits for its group (group_wait, group_interval);
    with several channels, the longest of their holds, so no group goes out too often."""
    if rule.severity == "critical" or not notify:
        return 0
    setup = view.setup
    decision = setup.decide(rule.name, rule.severity, transition.gateway, transition.device)
    # a route's own group_wait wins; otherwise the stage's (tests shorten it)
    wait = setup.group_wait_ms if decision.route < 0 or \
        setup.routing.routes[decision.route].group_wait is None else decision.group_wait_ms
    hold = 0
    for channel, _, _ in notify:
        timing = view.groups[(channel, transition.gateway)]  # the snapshot holds every group
        send_at = firing_send_at(now_ms=transition.at_ms, critical=False, group_wait_ms=wait,
                                 group_interval_ms=decision.group_interval_ms,
                                 last_sent_ms=timing.last_sent_ms,
                                 pending_at_ms=timing.pending_at_ms)
        hold = max(hold, send_at - transition.at_ms)
    return hold


# -- the hub's own alerts -----------------------------------------------------------------------

def first_few(names: Sequence[str]) -> str:
    """Names for a hub alert: the first _NAMED, then how many more (a message stays short)."""
    more = len(names) - _NAMED
    return ", ".join(names[:_NAMED]) + (f" and {more} more" if more > 0 else "")


def failure_detail(failed: Sequence[tuple[str, bool]]) -> str:
    """What hub-evaluation-failed says about the events and changes set aside."""
    named = [what for what, _ in failed]
    alarms = sum(alarm for _, alarm in failed)
    return (f"{len(named)} stored event(s) could not be evaluated by the rules (a bug in "
            f"careflow; they are stored, and were set aside so that no alarm waits behind "
            f"them): {first_few(named)}"
            + (f"; {alarms} of them a CARE ALARM: check those devices now" if alarms
               else "") + "; see the hub's log and `careflow events query`")


def plan_failure_alert(failed: Sequence[tuple[str, bool]], snapshot: ChangeSnapshot,
                       setup: Setup, *, now_ms: int) -> tuple[Change, ...]:
    """hub-evaluation-failed for what was set aside in one step ((what, care alarm or not)),
    announced again at once if it is already unresolved."""
    view = _View.of(snapshot, setup)
    _raise_self(view, EVALUATION_FAILED_RULE, SELF_RULES[EVALUATION_FAILED_RULE],
                failure_detail(failed), now_ms, again=True)
    return tuple(a for a in view.actions if not isinstance(a, SetAside))


def plan_self_check(problems: Mapping[str, str], again: Collection[str],
                    snapshot: ChangeSnapshot, setup: Setup, *, now_ms: int,
                    ) -> tuple[Change, ...]:
    """Open, announce again or resolve the hub's own incidents (careflow-hub/hub).

    Args:
        problems: the self-checks' findings, rule -> detail.
        again: problems that happened anew while their incident may be unresolved.
        snapshot: the unresolved incident of every self rule (``failing`` channels when
            hub-notifications-failing is among the problems).
        setup: rules, routing, escalation and channels.
        now_ms: the moment of the check.

    Returns:
        The changes, in the order of ``SELF_RULES``.
    """
    view = _View.of(snapshot, setup)
    for rule, severity in SELF_RULES.items():
        key = (rule, HUB_GATEWAY, HUB_DEVICE)
        if rule in problems:
            _raise_self(view, rule, severity, problems[rule], now_ms, again=rule in again)
        elif key in view.unresolved:
            view.actions.append(Resolve(rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE,
                                        at_ms=now_ms, by="careflow (self-check passed)",
                                        notify=()))
            del view.unresolved[key]
    return tuple(a for a in view.actions if not isinstance(a, SetAside))


def _raise_self(view: _View, rule: str, severity: str, detail: str, now_ms: int, *,
                again: bool) -> None:
    """Open one of the hub's own incidents, or (``again``: it happened anew) announce the
    unresolved one again at once."""
    key = (rule, HUB_GATEWAY, HUB_DEVICE)
    if again:

        def outgoing(text: str) -> _Messages:
            return _self_outgoing(view, rule, severity, detail, now_ms, "raised-again", text), \
                None, None

        if _raise_unresolved(view, rule, severity, HUB_GATEWAY, HUB_DEVICE, now_ms, detail,
                             outgoing, lambda _notify: 0):
            return
    elif key in view.unresolved:
        return  # still open, nothing new: said already
    notify = _self_outgoing(view, rule, severity, detail, now_ms, "firing")
    ref = view.new_ref()
    view.actions.append(Open(
        ref=ref, rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE, severity=severity,
        summary=f"careflow hub: {rule}", detail=detail, at_ms=now_ms, notify=notify,
        group_wait_ms=0,
        next_due_ms=_first_due_ms(view.setup, rule, severity, HUB_GATEWAY, HUB_DEVICE, now_ms),
        expect_new=True, self_alert=True))
    view.opened(Incident(ref, rule, HUB_GATEWAY, HUB_DEVICE, Severity(severity), IncidentState.OPEN,
                         f"careflow hub: {rule}", detail, now_ms, None, None, None, None,
                         first_raised_ms=now_ms, last_raised_ms=now_ms), notify, 0)


def _self_outgoing(view: _View, rule: str, severity: str, detail: str, now_ms: int, kind: str,
                   again: str | None = None) -> tuple[Outgoing, ...]:
    """The messages of one of the hub's own alerts, to every channel its route names."""
    setup = view.setup
    title, body = render(kind=kind, severity=severity, summary=f"careflow hub: {rule}",
                         detail=detail, gateway=HUB_GATEWAY, device=HUB_DEVICE, since_ms=now_ms,
                         runbook=setup.runbook(HUB_RUNBOOK), again=again)
    channels = setup.decide(rule, severity, HUB_GATEWAY, HUB_DEVICE).channels
    if rule == "hub-notifications-failing":  # not (only) through the failing one
        channels = avoid_failing(channels, failing=view.snapshot.failing,
                                 configured=tuple(setup.channels))
    return tuple((c, title, body) for c in channels if c in setup.channels)


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
        quieted = _quieted(snapshot.quieted, incident.rule, incident.severity)
        if due is Reminder.ESCALATE:
            if silenced is None and quieted is None:
                out.append(_reminder(setup, incident, due, steps[sent].channels, now,
                                     after))
            else:  # a silenced step waits for the silence to end (or to be expired early)
                ends_ms = now + SILENCED_RECHECK_MS
                out.append(Reschedule(incident_id=incident.id, next_due_ms=ends_ms if
                                      silenced is None else min(silenced.ends_ms, ends_ms)))
            continue
        muted = silenced is not None or quieted is not None or _inhibited(setup, snapshot,
                                                                          incident)
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
