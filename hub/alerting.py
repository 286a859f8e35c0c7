"""Alerting inside the hub: rules evaluated on every committed event and on a clock tick, and
their transitions turned into incidents (open → acknowledged → resolved).

Notifications (Apprise), escalation, silences and grouping build on the incidents recorded here.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from careflow.errors import ConfigError
from careflow.hub.evaluate import Evaluator, Observation, Transition
from careflow.hub.mute import (
    FLAP_WINDOW_MS,
    escalation_due,
    flapping,
    inhibited_by,
    silenced_by,
)
from careflow.hub.notify import Channel, render, route
from careflow.hub.rules import Rule, RuleSet, load_rules
from careflow.hub.selfwatch import HUB_DEVICE, HUB_GATEWAY, SELF_RULES
from careflow.hub.store import EventStore, Outgoing, StoredEvent

__all__ = ["AlertStage", "default_rules"]

log = logging.getLogger(__name__)


GROUP_WAIT_MS = 30_000


@dataclass(frozen=True, slots=True)
class _RuleStub:
    name: str
    severity: str


_SELF_RULE_STUBS = tuple(_RuleStub(name, severity) for name, severity in SELF_RULES.items())


def default_rules() -> RuleSet:
    """Rules from CAREFLOW_RULES_DIR, else the ones shipped in rules/."""
    configured = os.environ.get("CAREFLOW_RULES_DIR")
    if configured:
        return load_rules([Path(configured)])
    shipped = resources.files("careflow.rules")
    with resources.as_file(shipped) as folder:
        return load_rules([Path(folder)])


def _summary(rule: Rule, transition: Transition) -> str:
    fields = defaultdict(str, gateway=transition.gateway, device=transition.device,
                         rule=rule.name)
    text = rule.summary or f"{rule.name} on {transition.gateway}/{transition.device}"
    try:
        return text.format_map(fields)
    except (ValueError, IndexError):
        return text


class AlertStage:
    """Feeds the evaluator and records incidents; runs on the hub's writer thread."""

    name = "alerts"

    def __init__(self, store: EventStore, rules: RuleSet,
                 channels: Mapping[str, Channel] | None = None) -> None:
        self.store = store
        self.rules = {rule.name: rule for rule in rules.rules}
        self.channels = dict(channels or {})
        self.escalation = rules.escalation
        if self.channels:
            for severity, steps in self.escalation.items():
                for step in steps:
                    for name in step.channels:
                        if name not in self.channels:
                            msg = (f"the {severity} escalation policy names channel {name!r}, "
                                   f"which has no URL: set CAREFLOW_CHANNEL_{name.upper()}")
                            raise ConfigError(msg)
            # the hub's own alerts are critical, so the critical route must exist in any case
            for rule in (*rules.rules, *_SELF_RULE_STUBS):
                missing = [c for c in route(rule.severity) if c not in self.channels]
                if missing:
                    msg = (f"rule {rule.name!r} ({rule.severity}) routes to channel "
                           f"{missing[0]!r}, which has no URL: set "
                           f"CAREFLOW_CHANNEL_{missing[0].upper()} (or ..._FILE)")
                    raise ConfigError(msg)
        self.evaluator = Evaluator(rules.rules)
        self.opened = 0
        self.muted = 0
        # Non-critical alerts wait this long so that a burst on one gateway becomes one message
        # (Alertmanager's group_wait); critical ones, care alarms above all, never wait.
        self.group_wait_ms = GROUP_WAIT_MS
        self.on_queued: Callable[[], None] = lambda: None  # wakes the notification sender
        self._pending_wake = False
        self._seed()

    def _seed(self) -> None:
        """After a restart: what is open stays open (no duplicate incident), and every known
        source counts as heard from when it was last seen."""
        for record in self.store.devices():
            interval = record.facts.get("interval_s")
            self.evaluator.observe(Observation(
                record.gateway, record.device, "heartbeat" if interval else "status",
                record.last_time_ms, record.last_seen_ms,
                {"interval_s": interval} if interval else {}), record.last_seen_ms)
        self.evaluator.firing.clear()  # seeding the clock must not resolve or open anything
        for incident in self.store.incidents(states=("open", "acknowledged"), limit=100_000):
            self.evaluator.firing[(incident.rule, (incident.gateway, incident.device))] = \
                incident.triggered_ms

    def handle(self, events: Sequence[StoredEvent], now_ms: int,
               data: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Evaluate newly stored events (``data``: their decoded data, to skip re-parsing)."""
        for index, event in enumerate(events):
            observation = Observation(event.gateway, event.device, event.type, event.time_ms,
                                      event.received_ms,
                                      data[index] if data is not None else event.data)
            self._record(self.evaluator.observe(observation, now_ms))

    def tick(self, now_ms: int) -> None:
        """Let the clock drive absences, windows and escalation."""
        self._record(self.evaluator.tick(now_ms))
        if self.escalation and self.channels:
            self._escalate(now_ms)

    def check_self(self, problems: Mapping[str, str], now_ms: int) -> None:
        """Open or resolve the hub's own incidents (careflow-hub/hub) from its self-checks."""
        active = {i.rule for i in self.store.incidents(states=("open", "acknowledged"))
                  if i.gateway == HUB_GATEWAY}
        for rule, severity in SELF_RULES.items():
            if rule in problems and rule not in active:
                title, body = render(kind="firing", severity=severity,
                                     summary=f"careflow hub: {rule}", detail=problems[rule],
                                     gateway=HUB_GATEWAY, device=HUB_DEVICE, since_ms=now_ms,
                                     runbook="runbooks/hub-unhealthy.md")
                notify = [(c, title, body) for c in route(severity) if c in self.channels]
                if self.store.open_incident(rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE,
                                            severity=severity, summary=f"careflow hub: {rule}",
                                            detail=problems[rule], at_ms=now_ms, notify=notify):
                    log.error("the hub raised an alert about itself",
                              extra={"rule": rule, "detail": problems[rule]})
                    self.on_queued()
            elif rule not in problems and rule in active:
                self.store.resolve_incidents(rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE,
                                             at_ms=now_ms, by="careflow (self-check passed)")

    def _escalate(self, now_ms: int) -> None:
        for incident in self.store.incidents(states=("open",), limit=10_000):
            steps = self.escalation.get(incident.severity, ())
            step = escalation_due(tuple(s.after for s in steps), sent=incident.escalation_sent,
                                  state=incident.state, triggered_ms=incident.triggered_ms,
                                  now_ms=now_ms)
            if step is None or silenced_by(self.store.silences(active_at_ms=now_ms), incident.rule,
                                           incident.gateway, incident.device, now_ms):
                continue
            rule = self.rules.get(incident.rule)
            title, body = render(kind="escalation", severity=incident.severity,
                                 summary=incident.summary, detail=incident.detail,
                                 gateway=incident.gateway, device=incident.device,
                                 since_ms=incident.triggered_ms,
                                 runbook=rule.runbook if rule else None)
            notify = [(name, title, body) for name in steps[step].channels]
            if self.store.escalate_incident(incident.id, sent_before=step, at_ms=now_ms,
                                            notify=notify):
                self.on_queued()
                log.warning("incident escalated", extra={"incident": incident.id,
                                                         "step": step + 1,
                                                         "channels": list(steps[step].channels)})

    def _record(self, transitions: list[Transition]) -> None:
        self._pending_wake = False
        self._record_all(transitions)
        if self._pending_wake:
            self.on_queued()

    def _record_all(self, transitions: list[Transition]) -> None:
        for transition in transitions:
            rule = self.rules[transition.rule]
            summary = _summary(rule, transition)
            if transition.status == "firing":
                opened = self.store.open_incident(
                    rule=rule.name, gateway=transition.gateway, device=transition.device,
                    severity=rule.severity, summary=summary, detail=transition.detail,
                    at_ms=transition.at_ms, notify=self._outgoing(rule, transition, summary,
                                                                  "firing"),
                    group_wait_ms=0 if rule.severity == "critical" else self.group_wait_ms)
                if opened:
                    self.opened += 1
                    log.warning("incident opened", extra={
                        "rule": rule.name, "gateway": transition.gateway,
                        "device": transition.device, "severity": rule.severity,
                        "detail": transition.detail})
            else:
                self.store.resolve_incidents(rule=rule.name, gateway=transition.gateway,
                                             device=transition.device, at_ms=transition.at_ms,
                                             by="careflow (condition cleared)",
                                             notify=self._outgoing(rule, transition, summary,
                                                                   "resolved"))

    def _muted(self, rule: Rule, transition: Transition) -> str | None:
        """Why this change is recorded but not announced, if it is not announced."""
        if rule.kind != "event" and flapping(
                self._recent_triggers(rule.name, transition.gateway, transition.device,
                                      transition.at_ms),
                now_ms=transition.at_ms):
            return "flapping: it fired and cleared again and again; see careflow incidents list"
        silence = silenced_by(self.store.silences(active_at_ms=transition.at_ms), rule.name,
                              transition.gateway, transition.device, transition.at_ms)
        if silence is not None:
            return f"silenced by #{silence.id} ({silence.comment}, {silence.created_by})"
        presence = self.store.presence().get(transition.gateway)
        gateway_offline = (presence is not None and presence.state == "offline") or any(
            subject == (transition.gateway, transition.gateway)
            and self.rules[name].kind == "absence"
            for name, subject, _ in self.evaluator.active())
        return inhibited_by(rule_kind=rule.kind, gateway=transition.gateway,
                            device=transition.device, gateway_offline=gateway_offline)

    def _recent_triggers(self, rule: str, gateway: str, device: str, now_ms: int) -> list[int]:
        """Earlier triggers of this rule for this source within the flapping window."""
        return self.store.incident_triggers(rule=rule, gateway=gateway, device=device,
                                            since_ms=now_ms - FLAP_WINDOW_MS)

    def _outgoing(self, rule: Rule, transition: Transition, summary: str,
                  kind: str) -> list[Outgoing]:
        reason = self._muted(rule, transition)
        if reason is not None:
            self.muted += 1
            log.info("not announced", extra={"rule": rule.name, "gateway": transition.gateway,
                                             "device": transition.device, "reason": reason})
            return []
        title, body = render(kind=kind, severity=rule.severity, summary=summary,
                             detail=transition.detail, gateway=transition.gateway,
                             device=transition.device, since_ms=transition.at_ms,
                             runbook=rule.runbook)
        outgoing = [(name, title, body) for name in route(rule.severity) if name in self.channels]
        if outgoing:
            self._pending_wake = True
        return outgoing
