"""What the agent knows before it proposes (the evidence) and who chooses the action (a planner).

:func:`gather_evidence` runs the runbook's diagnose steps (read actions only: anything else is
refused) and collects the incident's recent events, the device's state, its gateway's presence
history and the other unresolved incidents at the same site. :class:`RunbookPlanner`, the
default, needs no model: it takes the runbook's first action whose parameters, filled from the
incident, pass the action's schema and precondition. Another planner (a language model's, in
``llm.py``) implements :class:`Planner`; whatever it returns goes through the agent's checks
(the runbook lists the action, the schema passes) before anything is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from careflow.core.errors import CareflowError
from careflow.hub.ops import actions
from careflow.hub.ops.runbooks import CARE_ALARM_RULES, Runbook, render
from careflow.hub.store.records import UNRESOLVED, EventFilter, Incident

__all__ = ["EVIDENCE_EVENTS", "Plan", "Planner", "RunbookPlanner", "gather_evidence", "unreachable"]

EVIDENCE_EVENTS = 20  # recent events kept as evidence
_PRESENCE_CHANGES = 10  # presence changes of the gateway kept as evidence
_RELATED = 20  # related incidents kept as evidence


@dataclass(frozen=True, slots=True)
class Plan:
    """A planner's choice: an action of the runbook, its parameters and why."""

    action: str
    params: Mapping[str, Any]
    why: str
    planner: str
    # added to the proposal's evidence: a model planner's summary and ranking, or why the
    # runbook's plan stood instead of the model's
    notes: Mapping[str, Any] = field(default_factory=dict)


class Planner(Protocol):
    """Chooses an action for an incident from its runbook and the evidence (None: none fits)."""

    @property
    def name(self) -> str:
        """Who chooses (``runbook``, a model's name): kept with each proposal."""
        ...

    def plan(self, incident: Incident, runbook: Runbook,
             evidence: Mapping[str, Any]) -> Plan | None:
        """The action to propose, or None."""
        ...


@dataclass(frozen=True, slots=True)
class RunbookPlanner:
    """The default planner: follows the runbook, no model. The first of its actions (they are
    listed in order of preference) whose parameters fit the incident and whose precondition
    holds; a never-automated action is proposed too (for a person to run)."""

    ctx: actions.ActionContext | None = None
    name: str = "runbook"

    def plan(self, incident: Incident, runbook: Runbook,
             evidence: Mapping[str, Any]) -> Plan | None:
        """The runbook's first action that fits."""
        del evidence  # the runbook's order is the plan; evidence is for the person reading
        for step in runbook.actions:
            if step.undo:
                continue
            params = render(step.params, incident)
            if actions.param_problems(step.action, params):
                continue
            if self.ctx is not None and actions.action(step.action).precondition(
                    self.ctx, params) is not None:
                continue
            return Plan(step.action, params, step.why or actions.action(step.action).summary,
                        self.name)
        return None


def _safely(what: str, run: Any) -> Any:  # noqa: ANN401 - any JSON-able evidence
    """Evidence that could not be read says why instead of stopping the diagnosis."""
    try:
        return run()
    except CareflowError as exc:
        return {"error": f"{what}: {type(exc).__name__}: {exc}"}


def gather_evidence(ctx: actions.ActionContext, incident: Incident,
                    runbook: Runbook) -> dict[str, Any]:
    """The runbook's diagnose steps (read actions only) and what the store knows around the
    incident, as JSON-able evidence keyed by what it is."""
    evidence: dict[str, Any] = {"incident": _safely("incident", lambda: actions.execute(
        ctx, "incident.show", {"incident": incident.id}))}
    source = {"gateway": incident.gateway}
    if incident.device and incident.device not in ("*", incident.gateway):
        source["device"] = incident.device
    evidence["device_state"] = _safely("device state", lambda: actions.execute(
        ctx, "device.show", source))
    evidence["recent_events"] = _safely("recent events", lambda: actions.execute(
        ctx, "event.query", {**source, "since": "1h", "limit": EVIDENCE_EVENTS}))
    changes = [c for c in ctx.store.presence_changes(limit=100_000)
               if c.gateway == incident.gateway][-_PRESENCE_CHANGES:]
    evidence["presence_history"] = [
        {"state": c.state, "boot": c.boot, "conn": c.conn, "changed_ms": c.changed_ms,
         "reason": c.reason} for c in changes]
    evidence["related_incidents"] = _related(ctx, incident)
    diagnosis: list[dict[str, Any]] = []
    for step in runbook.diagnose:
        found = actions.REGISTRY.get(step.action)
        if found is None or found.risk is not actions.Risk.READ:
            diagnosis.append({"action": step.action, "refused": "diagnose runs read actions "
                              "only"})
            continue
        params = render(step.params, incident)
        gone = unreachable(ctx, step.action, params)
        if gone is not None:
            diagnosis.append({"action": step.action, "params": params, "skipped": gone})
            continue
        diagnosis.append({"action": step.action, "params": params,
                          "result": _safely(step.action, lambda a=step.action, p=params:
                                            actions.execute(ctx, a, p))})
    evidence["diagnose"] = diagnosis
    if incident.rule in CARE_ALARM_RULES or runbook.read_only:
        evidence["for_people"] = ("a care alarm: a person acts; this is what the hub knows, "
                                  "for whoever goes")
    return evidence


def unreachable(ctx: actions.ActionContext, action: str, params: Mapping[str, Any]) -> str | None:
    """Why a command to a gateway is not sent while diagnosing (None: send it): its presence
    is offline (the broker published its Last Will), so it would only wait out the timeout,
    holding the agent's loop (and the verifications and escalations due in it) during an
    outage of many gateways. The presence history in the evidence says the same."""
    gateway = params.get("gateway")
    if not action.startswith("gateway.") or not isinstance(gateway, str):
        return None
    presence = ctx.store.presence().get(gateway)
    if presence is not None and presence.state == "offline":
        return f"gateway {gateway} is offline ({presence.reason or 'its Last Will'}): not asked"
    return None


def _related(ctx: actions.ActionContext, incident: Incident) -> dict[str, Any]:
    """Other unresolved incidents at the incident's site (its gateway's, from provision
    events, as the sink and the report decide it); at its gateway when no site is known."""
    sites: dict[str, str] = {}
    for event in ctx.store.query(EventFilter(type="provision"), limit=10_000):
        labels = event.data.get("labels") if isinstance(event.data, Mapping) else None
        site = labels.get("site") if isinstance(labels, Mapping) else None
        if isinstance(site, str) and site and event.gateway not in sites:
            sites[event.gateway] = site  # newest first: the first seen is the newest
    site = sites.get(incident.gateway)
    related = []
    for other in ctx.store.incidents(states=UNRESOLVED, limit=500):
        if other.id == incident.id:
            continue
        same = (sites.get(other.gateway) == site) if site is not None else (
            other.gateway == incident.gateway)
        if same:
            related.append({"id": other.id, "rule": other.rule, "gateway": other.gateway,
                            "device": other.device, "state": str(other.state),
                            "summary": other.summary})
        if len(related) >= _RELATED:
            break
    return {"site": site or "unassigned", "incidents": related}
