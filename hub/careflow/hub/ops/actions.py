"""The action registry: everything the operations agent may do, in Python, no shell.

API (for the agent, the planners, the MCP server and ``careflow runbooks check``):

- :data:`REGISTRY` maps a name (``gateway.resend``) to an :class:`Action`: its parameters as a
  JSON Schema (gateway and device ids use the event contract's id pattern, so
  ``gw;rm -rf /`` cannot be expressed), its :class:`Risk`, whether ``auto`` mode may run it
  (``auto``), whether only a person may (``never_automated``: proposable, never executed here),
  a precondition, what it runs, a verification with a deadline, and a rollback where one exists.
- :func:`validate_params` checks parameters against an action's schema (RefusedError naming the
  parameter); :func:`command_line` is the same action as the ``careflow`` command a person would
  type (for dry runs, proposals and the never-automated actions).
- :func:`execute` validates, checks the precondition and runs one action; it returns a plain
  JSON-able dict (the evidence). :func:`verify` polls the action's verification until it passes
  or its deadline passes; :func:`rollback` runs the rollback.
- :data:`CHECKS` are the checks a runbook's ``verify:`` names (``incident.resolved``,
  ``gateway.online``...), run with :func:`run_check` / :func:`await_check`.
- :class:`ActionContext` carries what actions touch: the store, the settings, the gateway
  command client (:mod:`careflow.hub.ops.gateway`), the clock and a sleep.

Errors are careflow's own: RefusedError (unknown action, bad parameter, failed precondition, a
gateway that refused, a never-automated action), BrokerError (a gateway did not answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

from jsonschema import Draft202012Validator

from careflow.core.clock import Clock
from careflow.core.config import Settings
from careflow.core.errors import CareflowError, PkiError, RefusedError
from careflow.hub.alerting.incidents import default_rules
from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.fleet.presence import device_state
from careflow.hub.ops.gateway import GatewayCommands
from careflow.hub.ops.rule_controls import mute_refusal, quiet_refusal
from careflow.hub.ops.status import health_report, is_healthy
from careflow.hub.store.interface import Store
from careflow.hub.store.records import (
    EventFilter,
    IncidentState,
    NotificationState,
    RuleControlKind,
)
from careflow.provisioning.pki import (
    default_pki_dir,
    load_pki,
    pki_status,
)
from careflow.schemas import EVENT_TYPES, format_rfc3339
from careflow.schemas.published import load_schema

__all__ = [
    "CHECKS",
    "ID_PATTERN",
    "REGISTRY",
    "Action",
    "ActionContext",
    "Check",
    "CheckSpec",
    "Evidence",
    "Params",
    "Risk",
    "Rollback",
    "Verification",
    "action",
    "await_check",
    "check_param_problems",
    "command_line",
    "execute",
    "param_problems",
    "rollback",
    "run_check",
    "validate_params",
    "verify",
]

Params: TypeAlias = Mapping[str, Any]
Evidence: TypeAlias = dict[str, Any]

# The contract's id pattern as its JSON Schema spells it (`(?![\s\S])`, not `$`, which Python's re
# lets match before a trailing newline): a gateway or device id is a topic level, never a shell.
ID_PATTERN: str = load_schema("event.json")["$defs"]["name"]["pattern"]
_ID = {"type": "string", "pattern": ID_PATTERN}
_DURATION = {"type": "string", "pattern": r"^[1-9][0-9]{0,5}[smhd](?![\s\S])"}
_REASON = {"type": "string", "minLength": 1, "maxLength": 200,
           "pattern": r"^[^\x00-\x1f\x7f]+(?![\s\S])"}  # one visible line
_INCIDENT = {"type": "integer", "minimum": 1}
_RULE = {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.-]{0,63}(?![\s\S])"}
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Risk(StrEnum):
    """``read`` changes nothing; ``write`` changes the fleet, the hub or what people are told."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action touches. ``clock`` and ``sleep`` are injected so tests set the time."""

    store: Store
    settings: Settings
    gateway: GatewayCommands
    clock: Clock
    sleep: Callable[[float], None] = time.sleep
    pki_dir: Path | None = None  # default: CAREFLOW_PKI_DIR, else ~/.config/careflow/pki
    gateway_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    """One look at whether something holds: ``ok``, why in words, and what was seen."""

    ok: bool
    detail: str
    evidence: Evidence = field(default_factory=dict)


CheckFn: TypeAlias = Callable[[ActionContext, Params, int], Check]
"""(context, parameters, started_ms: when the action ran) → Check."""


@dataclass(frozen=True, slots=True)
class Verification:
    """How an action's effect is confirmed: ``check`` polled until ``deadline_s`` after it ran."""

    summary: str
    deadline_s: float
    check: CheckFn


@dataclass(frozen=True, slots=True)
class Rollback:
    """How an action is undone (run by a person, or the agent on a person's word)."""

    summary: str
    run: Callable[[ActionContext, Params], Evidence]


@dataclass(frozen=True, slots=True)
class Action:
    """One thing the agent may propose; see the module docstring."""

    name: str
    summary: str
    params: Mapping[str, Any]  # a JSON Schema of an object
    risk: Risk
    auto: bool  # `auto` mode may run it without a person's approval
    never_automated: bool  # only a person runs it (the agent proposes `command_line`)
    command: Callable[[Params], list[str]]  # the same as a `careflow` command line
    run: Callable[[ActionContext, Params], Evidence] | None
    precondition: Callable[[ActionContext, Params], str | None] = lambda _c, _p: None
    verification: Verification | None = None
    undo: Rollback | None = None

    @property
    def validator(self) -> Draft202012Validator:
        """The parameters' validator."""
        return _validator(self.name)


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A check a runbook's ``verify:`` may name: its parameters' schema and the check."""

    name: str
    summary: str
    params: Mapping[str, Any]
    check: CheckFn


def _object(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:  # noqa: ANN401
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": properties}


def _duration_ms(text: str) -> int:
    return int(text[:-1]) * _UNIT_S[text[-1]] * 1000


def _iso(ms: int | None) -> str | None:
    return None if ms is None else format_rfc3339(datetime.fromtimestamp(ms / 1000, tz=UTC))


# -- reads -----------------------------------------------------------------------------------


def _status(ctx: ActionContext, _params: Params) -> Evidence:
    report = health_report(ctx.store, ctx.clock())
    return {**report, "healthy": is_healthy(report)}


def _device_show(ctx: ActionContext, params: Params) -> Evidence:
    gateway = params["gateway"]
    device = params.get("device") or gateway
    record = ctx.store.device(gateway, device)
    if record is None:
        return {"gateway": gateway, "device": device, "known": False}
    now_ms = ctx.clock()
    paused = ctx.store.paused(now_ms)
    window = paused.get((gateway, device)) or paused.get((gateway, "*"))
    presence = ctx.store.presence().get(gateway)
    state, why = device_state(now_ms=now_ms, last_seen_ms=record.last_seen_ms,
                              interval_s=record.facts.get("interval_s"), presence=presence,
                              paused=window is not None)
    return {"gateway": gateway, "device": device, "known": True, "state": str(state),
            "state_reason": why, "first_seen": _iso(record.first_seen_ms),
            "last_seen": _iso(record.last_seen_ms), "last_type": record.last_type,
            "events": record.events, "boot": record.boot, "seq": record.seq, "gaps": record.gaps,
            "clock_skew_s": round(record.skew_ms / 1000, 1),
            "paused_until": _iso(window[0]) if window else None,
            "presence": None if presence is None else {
                "state": presence.state, "boot": presence.boot, "conn": presence.conn,
                "changed": _iso(presence.changed_ms), "reason": presence.reason},
            "facts": dict(record.facts)}


def _events_query(ctx: ActionContext, params: Params) -> Evidence:
    since = params.get("since", "1h")
    flt = EventFilter(gateway=params.get("gateway"), device=params.get("device"),
                      type=params.get("type"), since_ms=ctx.clock() - _duration_ms(since))
    events = ctx.store.query(flt, limit=params.get("limit", 20))
    return {"since": since, "events": [
        {**ev.envelope, "received": _iso(ev.received_ms), "pos": ev.pos} for ev in events]}


def _incident_show(ctx: ActionContext, params: Params) -> Evidence:
    incident = ctx.store.incident(params["incident"])
    if incident is None:
        msg = f"no incident {params['incident']}; see `careflow incidents list`"
        raise RefusedError(msg)
    timeline = [{"at": _iso(a.at_ms), "action": a.action, "by": a.by, "via": a.via,
                 "detail": a.detail} for a in ctx.store.incident_actions(incident.id)]
    return {"id": incident.id, "rule": incident.rule, "gateway": incident.gateway,
            "device": incident.device, "severity": str(incident.severity),
            "state": str(incident.state), "summary": incident.summary, "detail": incident.detail,
            "triggered": _iso(incident.triggered_ms), "acknowledged": _iso(
                incident.acknowledged_ms), "acknowledged_by": incident.acknowledged_by,
            "resolved": _iso(incident.resolved_ms), "raises": incident.raises,
            "timeline": timeline}


def _gateway_command(name: str) -> Callable[[ActionContext, Params], Evidence]:
    def run(ctx: ActionContext, params: Params) -> Evidence:
        args = {key: value for key, value in params.items() if key != "gateway"}
        reply = ctx.gateway.send(params["gateway"], name, args,
                                 timeout_s=ctx.gateway_timeout_s)
        if not reply.get("ok"):
            msg = f"gateway {params['gateway']} refused {name}: {reply.get('error')}"
            raise RefusedError(msg)
        return {"gateway": params["gateway"], "command": name,
                "result": reply.get("result") or {}, "elapsed_ms": reply.get("elapsed_ms")}

    return run


def _ca_status(ctx: ActionContext, _params: Params) -> Evidence:
    directory = (ctx.pki_dir or default_pki_dir()).expanduser()
    try:
        pki = load_pki(directory)
    except PkiError as exc:
        return {"dir": str(directory), "configured": False, "warnings": [str(exc)]}
    return {"dir": str(directory), "configured": True,
            **pki_status(pki, now=datetime.fromtimestamp(ctx.clock() / 1000, tz=UTC))}


def _notify_list(ctx: ActionContext, params: Params) -> Evidence:
    state = params.get("state")
    notes = ctx.store.notifications(states=(state,) if state else None,
                                    limit=params.get("limit", 20))
    return {"notifications": [
        {"id": n.id, "incident": n.incident_id, "channel": n.channel, "kind": str(n.kind),
         "state": str(n.state), "attempts": n.attempts, "title": n.title,
         "created": _iso(n.created_ms), "sent": _iso(n.sent_ms), "last_error": n.last_error}
        for n in notes]}


# -- writes ----------------------------------------------------------------------------------


def _gateway_known(ctx: ActionContext, params: Params) -> str | None:
    gateway = params["gateway"]
    if ctx.store.device(gateway, gateway) is None and gateway not in ctx.store.presence():
        return f"gateway {gateway} is not known to the hub (`careflow devices list`)"
    return None


def _gateway_online(ctx: ActionContext, params: Params, _started_ms: int) -> Check:
    presence = ctx.store.presence().get(params["gateway"])
    if presence is None or presence.state != "online":
        state = "unknown" if presence is None else presence.state
        return Check(False, f"gateway {params['gateway']} is {state}", {"presence": state})
    return Check(True, f"gateway {params['gateway']} is online",
                 {"presence": "online", "boot": presence.boot})


def _outbox_drained(ctx: ActionContext, params: Params, started_ms: int) -> Check:
    online = _gateway_online(ctx, params, started_ms)
    if not online.ok:
        return online
    reply = ctx.gateway.send(params["gateway"], "diagnostics", {},
                             timeout_s=ctx.gateway_timeout_s)
    waiting = (reply.get("result") or {}).get("outbox_waiting")
    if not reply.get("ok") or waiting != 0:
        return Check(False, f"{waiting} event(s) still wait in the outbox of {params['gateway']}",
                     {"outbox_waiting": waiting})
    return Check(True, f"every event of {params['gateway']} is confirmed", {"outbox_waiting": 0})


def _restart(ctx: ActionContext, params: Params) -> Evidence:
    presence = ctx.store.presence().get(params["gateway"])
    evidence = _gateway_command("restart-agent")(ctx, params)
    evidence["boot_before"] = presence.boot if presence is not None else None
    return evidence


def _restarted(ctx: ActionContext, params: Params, started_ms: int) -> Check:
    presence = ctx.store.presence().get(params["gateway"])
    if presence is None or presence.state != "online" or presence.changed_ms < started_ms:
        return Check(False, f"gateway {params['gateway']} is not back online since the restart",
                     {"presence": None if presence is None else presence.state})
    return Check(True, f"gateway {params['gateway']} is back online (boot {presence.boot})",
                 {"presence": "online", "boot": presence.boot})


def _pause(ctx: ActionContext, params: Params) -> Evidence:
    until_ms = ctx.clock() + _duration_ms(params["for"])
    ctx.store.pause(params["gateway"], params.get("device"), until_ms=until_ms,
                    reason=params["reason"])
    return {"gateway": params["gateway"], "device": params.get("device"), "paused": True,
            "until": _iso(until_ms), "reason": params["reason"]}


def _paused(ctx: ActionContext, params: Params, _started_ms: int) -> Check:
    key = (params["gateway"], params.get("device") or "*")
    window = ctx.store.paused(ctx.clock()).get(key)
    if window is None:
        return Check(False, f"{'/'.join(key)} is not paused")
    return Check(True, f"{'/'.join(key)} is paused until {_iso(window[0])}",
                 {"until": _iso(window[0])})


def _resume(ctx: ActionContext, params: Params) -> Evidence:
    return {"gateway": params["gateway"], "device": params.get("device"),
            "resumed": ctx.store.resume(params["gateway"], params.get("device"))}


def _severities() -> dict[str, str]:
    """The severities of the rules the hub loads (CAREFLOW_RULES_DIR or shipped) and its own."""
    return {**SELF_RULES, **{rule.name: rule.severity for rule in default_rules().rules}}


def _mutable(_ctx: ActionContext, params: Params) -> str | None:
    """As `careflow rules mute` decides: never a critical rule (care alarms, gateways offline)
    nor the hub's own, and a mute ends within a week."""
    return (quiet_refusal(params["rule"], _severities().get(params["rule"]))
            or mute_refusal(_duration_ms(params["for"])))


def _mute(ctx: ActionContext, params: Params) -> Evidence:
    now_ms = ctx.clock()
    by = params.get("by", "careflow-agent")
    until_ms = now_ms + _duration_ms(params["for"])
    with ctx.store.atomically("mute a rule"):
        control = ctx.store.set_rule_control(params["rule"], kind=RuleControlKind.MUTED,
                                             until_ms=until_ms, by=by, reason=params["reason"],
                                             at_ms=now_ms)
        # the same row `careflow rules mute` writes, so every mute reads alike in the log
        ctx.store.append_audit(at_ms=now_ms, actor=by, event="rule.muted",
                               subject=f"rule {params['rule']}",
                               detail={"reason": params["reason"], "until": _iso(until_ms)})
    return {"rule": control.rule, "kind": str(control.kind), "until": _iso(control.until_ms),
            "reason": control.reason, "by": control.by}


def _muted(ctx: ActionContext, params: Params, _started_ms: int) -> Check:
    for control in ctx.store.rule_controls(now_ms=ctx.clock()):
        if control.rule == params["rule"] and control.kind == RuleControlKind.MUTED:
            return Check(True, f"{control.rule} is muted until {_iso(control.until_ms)}",
                         {"until": _iso(control.until_ms)})
    return Check(False, f"{params['rule']} is not muted")


def _unmute(ctx: ActionContext, params: Params) -> Evidence:
    # only a mute: a rule a person disabled since stays disabled
    muted = _muted(ctx, params, 0).ok
    return {"rule": params["rule"],
            "unmuted": muted and ctx.store.clear_rule_control(params["rule"])}


def _ack_open(ctx: ActionContext, params: Params) -> str | None:
    incident = ctx.store.incident(params["incident"])
    if incident is None:
        return f"no incident {params['incident']}"
    if incident.state != IncidentState.OPEN:
        return f"incident {incident.id} is {incident.state}, not open"
    return None


def _ack(ctx: ActionContext, params: Params) -> Evidence:
    now_ms = ctx.clock()
    by = params.get("by", "careflow-agent")
    with ctx.store.atomically("acknowledge an incident"):
        incident = ctx.store.acknowledge_incident(params["incident"], by=by, at_ms=now_ms)
        ctx.store.record_action(incident.id, at_ms=now_ms, action="acknowledge", by=by,
                                via="agent")
    return {"incident": incident.id, "state": str(incident.state), "by": by}


def _incident_in(states: tuple[IncidentState, ...], key: str = "incident") -> CheckFn:
    def check(ctx: ActionContext, params: Params, _started_ms: int) -> Check:
        incident = ctx.store.incident(params[key])
        state = None if incident is None else str(incident.state)
        ok = incident is not None and incident.state in states
        return Check(ok, f"incident {params[key]} is {state}", {"state": state})

    return check


def _human_only(name: str) -> Callable[[ActionContext, Params], Evidence]:
    def refuse(_ctx: ActionContext, params: Params) -> Evidence:
        msg = (f"{name} is never automated: a person runs `{' '.join(command_line(name, params))}`")
        raise RefusedError(msg)

    return refuse


def _opt(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


# -- checks a runbook's verify: names --------------------------------------------------------


def _device_heard(ctx: ActionContext, params: Params, started_ms: int) -> Check:
    gateway = params["gateway"]
    record = ctx.store.device(gateway, params.get("device") or gateway)
    seen = None if record is None else record.last_seen_ms
    ok = seen is not None and seen >= started_ms
    return Check(ok, f"{gateway}/{params.get('device') or gateway} last heard {_iso(seen)}",
                 {"last_seen": _iso(seen)})


def _in_sync(ctx: ActionContext, params: Params, started_ms: int) -> Check:
    gateway = params["gateway"]
    record = ctx.store.device(gateway, params.get("device") or gateway)
    if record is None or record.last_seen_ms < started_ms:
        return Check(False, f"no event from {gateway} since the action to judge its clock by")
    skew_s = round(record.skew_ms / 1000, 1)
    return Check(abs(skew_s) <= params.get("max_skew_s", 5), f"{gateway}'s clock is {skew_s} s "
                 "off the hub's", {"clock_skew_s": skew_s})


def _hub_healthy(ctx: ActionContext, _params: Params, _started_ms: int) -> Check:
    report = _status(ctx, {})
    lag = report.get("alert_lag_ms")
    ok = bool(report["healthy"]) and (not isinstance(lag, int | float) or lag < 10_000)
    return Check(ok, f"hub running={report['running']} connected={report.get('connected')} "
                 f"alert_lag_ms={lag}", {"healthy": report["healthy"], "alert_lag_ms": lag})


CHECKS: dict[str, CheckSpec] = {spec.name: spec for spec in (
    CheckSpec("incident.resolved", "the incident has resolved (its condition cleared)",
              _object(("incident",), incident=_INCIDENT),
              _incident_in((IncidentState.RESOLVED,))),
    CheckSpec("incident.acknowledged", "someone has the incident (acknowledged or resolved)",
              _object(("incident",), incident=_INCIDENT),
              _incident_in((IncidentState.ACKNOWLEDGED, IncidentState.RESOLVED))),
    CheckSpec("gateway.online", "the gateway's presence is online",
              _object(("gateway",), gateway=_ID), _gateway_online),
    CheckSpec("device.heard", "the device sent an event since the action ran",
              _object(("gateway",), gateway=_ID, device=_ID), _device_heard),
    CheckSpec("clock.in_sync", "the device's newest event, sent since the action ran, carries "
              "a time within max_skew_s (default 5) of the hub's clock",
              _object(("gateway",), gateway=_ID, device=_ID,
                      max_skew_s={"type": "number", "minimum": 0, "maximum": 3600}), _in_sync),
    CheckSpec("rule.muted", "the rule is muted (its incidents recorded, nothing announced)",
              _object(("rule",), rule=_RULE), _muted),
    CheckSpec("hub.healthy", "the hub runs, is connected, and evaluates rules within 10 s",
              _object(), _hub_healthy),
)}

# -- the registry ----------------------------------------------------------------------------

_GW = _object(("gateway",), gateway=_ID)
REGISTRY: dict[str, Action] = {action.name: action for action in (
    # reads
    Action("hub.status", "the hub's health: running, connected, lag, queues, failures",
           _object(), Risk.READ, auto=True, never_automated=False,
           command=lambda _p: ["careflow", "status", "--json"], run=_status),
    Action("device.show", "what the registry knows of a gateway or device, and its state",
           _object(("gateway",), gateway=_ID, device=_ID), Risk.READ, auto=True,
           never_automated=False,
           command=lambda p: ["careflow", "devices", "show", p["gateway"],
                              *([p["device"]] if p.get("device") else []), "--json"],
           run=_device_show),
    Action("event.query", "stored events, newest first",
           _object(gateway=_ID, device=_ID, type={"enum": list(EVENT_TYPES)}, since=_DURATION,
                   limit={"type": "integer", "minimum": 1, "maximum": 200}),
           Risk.READ, auto=True, never_automated=False,
           command=lambda p: ["careflow", "events", "query", *_opt("--gateway", p.get("gateway")),
                              *_opt("--device", p.get("device")), *_opt("--type", p.get("type")),
                              "--since", p.get("since", "1h"),
                              "--limit", str(p.get("limit", 20)), "--json"],
           run=_events_query),
    Action("incident.show", "an incident and its timeline",
           _object(("incident",), incident=_INCIDENT), Risk.READ, auto=True,
           never_automated=False,
           command=lambda p: ["careflow", "incidents", "show", str(p["incident"]), "--json"],
           run=_incident_show),
    Action("gateway.ping", "ask the gateway's agent whether it lives (boot, uptime)", _GW,
           Risk.READ, auto=True, never_automated=False,
           command=lambda p: ["careflow", "gateway", "cmd", p["gateway"], "ping", "--json"],
           run=_gateway_command("ping")),
    Action("gateway.diagnostics", "the gateway agent's outbox, connection, spool and disk", _GW,
           Risk.READ, auto=True, never_automated=False,
           command=lambda p: ["careflow", "gateway", "cmd", p["gateway"], "diagnostics",
                              "--json"],
           run=_gateway_command("diagnostics")),
    Action("ca.status", "when the CAs, certificates and CRL expire", _object(), Risk.READ,
           auto=True, never_automated=False,
           command=lambda _p: ["careflow", "ca", "status", "--json"], run=_ca_status),
    Action("notify.list", "the notification outbox: sent, waiting, failed (with reasons)",
           _object(state={"enum": [str(s) for s in NotificationState]},
                   limit={"type": "integer", "minimum": 1, "maximum": 200}),
           Risk.READ, auto=True, never_automated=False,
           command=lambda p: ["careflow", "notify", "list", *_opt("--state", p.get("state")),
                              "--limit", str(p.get("limit", 20)), "--json"],
           run=_notify_list),
    # writes
    Action("gateway.resend", "ask the gateway to resend the events it has not had confirmed",
           _object(("gateway",), gateway=_ID, device=_ID, boot=_ID,
                   from_seq={"type": "integer", "minimum": 1},
                   to_seq={"type": "integer", "minimum": 1}),
           Risk.WRITE, auto=True, never_automated=False,
           command=lambda p: ["careflow", "gateway", "cmd", p["gateway"], "resend",
                              *(f"--arg={k}={v}" for k, v in sorted(p.items()) if k != "gateway"),
                              "--json"],
           run=_gateway_command("resend"), precondition=_gateway_known,
           verification=Verification("the gateway is online and its outbox is empty (every "
                                     "event confirmed by the hub)", 60.0, _outbox_drained)),
    Action("gateway.restart-agent", "restart the gateway's agent (its supervisor brings it "
           "back; the outbox keeps every event)", _GW, Risk.WRITE, auto=True,
           never_automated=False,
           command=lambda p: ["careflow", "gateway", "cmd", p["gateway"], "restart-agent",
                              "--json"],
           run=_restart, precondition=_gateway_known,
           verification=Verification("the gateway is back online after the restart", 90.0,
                                     _restarted)),
    Action("devices.pause", "a maintenance window: the device reads `paused`, nobody is woken",
           _object(("gateway", "for", "reason"), gateway=_ID, device=_ID, reason=_REASON,
                   **{"for": _DURATION}),
           Risk.WRITE, auto=False, never_automated=False,
           command=lambda p: ["careflow", "devices", "pause", p["gateway"],
                              *([p["device"]] if p.get("device") else []), "--for", p["for"],
                              "--reason", p["reason"], "--json"],
           run=_pause, precondition=_gateway_known,
           verification=Verification("the window is in force", 5.0, _paused),
           undo=Rollback("end the window: `careflow devices resume`", _resume)),
    Action("rules.mute", "mute a noisy rule for a while: incidents recorded, nothing announced",
           _object(("rule", "for", "reason"), rule=_RULE, reason=_REASON, by=_ID,
                   **{"for": _DURATION}),
           Risk.WRITE, auto=False, never_automated=False,
           command=lambda p: ["careflow", "rules", "mute", p["rule"], "--for", p["for"],
                              "--reason", p["reason"], "--json"],
           run=_mute, precondition=_mutable,
           verification=Verification("the mute is in force", 5.0, _muted),
           undo=Rollback("unmute the rule", _unmute)),
    Action("incident.ack", "acknowledge an incident (its escalation stops)",
           _object(("incident",), incident=_INCIDENT, by=_ID), Risk.WRITE, auto=False,
           never_automated=False,
           command=lambda p: ["careflow", "incidents", "ack", str(p["incident"]),
                              *_opt("--by", p.get("by")), "--json"],
           run=_ack, precondition=_ack_open,
           verification=Verification("the incident is acknowledged", 5.0,
                                     _incident_in((IncidentState.ACKNOWLEDGED,)))),
    # for a person only: the agent may propose them, never run them
    Action("device.revoke", "revoke a gateway's identity (it cannot connect again)",
           _GW, Risk.WRITE, auto=False, never_automated=True,
           command=lambda p: ["careflow", "devices", "revoke", p["gateway"], "--json"],
           run=_human_only("device.revoke")),
    Action("provision.replace", "register a replacement unit for a site (the old identity is "
           "revoked when it claims)",
           _object(("serial", "site"), serial=_ID, site=_ID, gateway=_ID), Risk.WRITE,
           auto=False, never_automated=True,
           command=lambda p: ["careflow", "provision", "register", "--serial", p["serial"],
                              "--site", p["site"], *_opt("--gateway", p.get("gateway")),
                              "--replace", "--json"],
           run=_human_only("provision.replace")),
    Action("replay.influx", "rewrite InfluxDB from the hub's event log",
           _object(since=_DURATION), Risk.WRITE, auto=False, never_automated=True,
           command=lambda p: ["careflow", "replay", "--target", "influx",
                              *_opt("--since", p.get("since")), "--json"],
           run=_human_only("replay.influx")),
)}

_VALIDATORS = {name: Draft202012Validator(action.params) for name, action in REGISTRY.items()}
_CHECK_VALIDATORS = {name: Draft202012Validator(spec.params) for name, spec in CHECKS.items()}


def _validator(name: str) -> Draft202012Validator:
    return _VALIDATORS[name]


def _problems(validator: Draft202012Validator, params: object) -> list[str]:
    problems = []
    for error in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "parameters"
        problems.append(f"{where}: {error.message}")
    return problems


def action(name: str) -> Action:
    """The registered action, or RefusedError naming the known ones."""
    found = REGISTRY.get(name)
    if found is None:
        msg = f"no action {name!r}; the registry has: {', '.join(sorted(REGISTRY))}"
        raise RefusedError(msg)
    return found


def param_problems(name: str, params: object) -> list[str]:
    """What is wrong with ``params`` for action ``name`` (empty: valid)."""
    return _problems(_VALIDATORS[action(name).name], params)


def check_param_problems(name: str, params: object) -> list[str]:
    """What is wrong with ``params`` for check ``name`` (empty: valid)."""
    if name not in CHECKS:
        return [f"no check {name!r}; known: {', '.join(sorted(CHECKS))}"]
    return _problems(_CHECK_VALIDATORS[name], params)


def validate_params(name: str, params: object) -> dict[str, Any]:
    """``params`` checked against the action's schema, as a plain dict.

    Raises:
        RefusedError: no such action, or a parameter the schema refuses (named).
    """
    problems = param_problems(name, params)
    if problems:
        msg = f"{name}: " + "; ".join(problems)
        raise RefusedError(msg)
    assert isinstance(params, Mapping)
    return dict(params)


def command_line(name: str, params: Params) -> list[str]:
    """The action as the ``careflow`` command a person would run (argv, never a shell line)."""
    return action(name).command(validate_params(name, params))


def execute(ctx: ActionContext, name: str, params: object) -> Evidence:
    """Validate, check the precondition, run. Returns the evidence (JSON-able).

    Raises:
        RefusedError: unknown action, bad parameters, a failed precondition, a never-automated
            action, or a gateway that refused the command.
        BrokerError: a gateway did not answer in time.
    """
    found = action(name)
    checked = validate_params(name, params)
    if found.never_automated or found.run is None:
        _human_only(name)(ctx, checked)
    not_now = found.precondition(ctx, checked)
    if not_now is not None:
        msg = f"{name} not run: {not_now}"
        raise RefusedError(msg)
    assert found.run is not None
    return found.run(ctx, checked)


def _poll(ctx: ActionContext, check: Callable[[], Check], deadline_s: float,
          poll_s: float) -> Check:
    deadline_ms = ctx.clock() + int(deadline_s * 1000)
    while True:
        try:
            outcome = check()
        except CareflowError as exc:  # a gateway not answering yet is "not yet", not an end
            outcome = Check(False, f"{type(exc).__name__}: {exc}")
        if outcome.ok or ctx.clock() >= deadline_ms:
            return outcome
        ctx.sleep(poll_s)


def verify(ctx: ActionContext, name: str, params: Params, *, started_ms: int,
           deadline_s: float | None = None, poll_s: float = 0.5) -> Check:
    """Poll the action's verification until it passes or its deadline (or ``deadline_s``)
    passes; the last look. An action without a verification passes at once."""
    found = action(name)
    verification = found.verification
    if verification is None:
        return Check(True, f"{name} has nothing to verify")
    checked = validate_params(name, params)
    return _poll(ctx, lambda: verification.check(ctx, checked, started_ms),
                 verification.deadline_s if deadline_s is None else deadline_s, poll_s)


def run_check(ctx: ActionContext, name: str, params: Params, *, started_ms: int) -> Check:
    """One look of a runbook check (``verify: {check: ...}``)."""
    problems = check_param_problems(name, params)
    if problems:
        msg = f"check {name}: " + "; ".join(problems)
        raise RefusedError(msg)
    return CHECKS[name].check(ctx, params, started_ms)


def await_check(ctx: ActionContext, name: str, params: Params, *, started_ms: int,
                deadline_s: float, poll_s: float = 0.5) -> Check:
    """A runbook check polled until it passes or ``deadline_s`` passes; the last look."""
    run_check(ctx, name, params, started_ms=started_ms)  # refuses bad parameters at once
    return _poll(ctx, lambda: CHECKS[name].check(ctx, params, started_ms), deadline_s, poll_s)


def rollback(ctx: ActionContext, name: str, params: Params) -> Evidence:
    """Undo an action with the parameters it ran with; RefusedError if it has no rollback."""
    found = action(name)
    if found.undo is None:
        msg = f"{name} has no rollback"
        raise RefusedError(msg)
    return found.undo.run(ctx, validate_params(name, params))
