"""The operations agent: proposals for incidents from their runbooks, approved by a person (or,
in ``auto``, allowed by the registry), run as registry actions, verified, and escalated to a
person when the verification fails. Every transition is an audit row.

Two halves, as everywhere in the hub:

- pure decisions with ``now`` passed in: which mode is in force under the
  ``CAREFLOW_AUTOMATION`` ceiling (:func:`effective_mode`), whether a mode may be set
  (:func:`mode_refusal`), whether a proposal may be approved, rejected or run now
  (:func:`approve_refusal`, :func:`reject_refusal`, :func:`next_step`), and whether its
  verification has passed, failed or is still waiting (:func:`verification_outcome`);
- the service (:class:`Agent`): ``propose`` (the entry point for the CLI, the loop, the LLM
  planner and the MCP server), ``approve``, ``reject``, ``set_mode`` and ``run_once``, each
  writing its state change and its audit row in one transaction.

Lifecycle (states in :class:`~careflow.hub.store.records.ProposalState`)::

    pending ──approve──▶ approved ──run──▶ executed ──verify──▶ verified
       │ └─reject─▶ rejected                │  └──────────────▶ failed ──▶ escalated
       └─(expiry)─▶ expired                 └─(could not run)─▶ failed ──▶ escalated

In ``auto`` a pending proposal whose action the registry allows in auto is approved by the agent
itself (``decided_by`` says so). Care alarms get diagnosis and evidence only, never an action.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from careflow.core.clock import Clock, now_ms
from careflow.core.config import Settings
from careflow.core.errors import CareflowError, ConfigError, RefusedError
from careflow.hub.alerting.routing import CHECK_CHANNEL, CHECK_GATEWAYS
from careflow.hub.ops import actions
from careflow.hub.ops.audit import AuditEvent, mask_secrets, mask_text
from careflow.hub.ops.gateway import GatewayCommands, MqttGatewayCommands
from careflow.hub.ops.llm import model_planner
from careflow.hub.ops.planner import Plan, Planner, RunbookPlanner, gather_evidence, unreachable
from careflow.hub.ops.runbooks import CARE_ALARM_RULES, Runbook, load_runbooks, render
from careflow.hub.store.interface import Store
from careflow.hub.store.records import (
    UNRESOLVED,
    AuditEntry,
    AutomationMode,
    AutomationSetting,
    Incident,
    NotificationKind,
    Proposal,
    ProposalState,
)

__all__ = [
    "AGENT",
    "AUTO_PLANNERS",
    "DEFAULT_EXPIRY_MS",
    "Agent",
    "AgentLoop",
    "Outcome",
    "ProposeResult",
    "Step",
    "agent_for",
    "approve_refusal",
    "effective_mode",
    "mode_refusal",
    "next_step",
    "parse_mode",
    "reject_refusal",
    "verification_outcome",
]

log = logging.getLogger(__name__)

AGENT = "careflow-agent"  # the actor of what the agent does by itself
DEFAULT_EXPIRY_MS = 15 * 60_000  # a proposal older than this is stale: the fleet moved on
# The planners whose proposals auto mode may run unapproved: the runbook's own, never a
# model's (llm:<model>) or an assistant's over MCP (mcp)
AUTO_PLANNERS = frozenset({RunbookPlanner().name})
_P = ProposalState
_RANK = {AutomationMode.OFF: 0, AutomationMode.MANUAL: 1, AutomationMode.AUTO: 2}
_LIVE = (ProposalState.PENDING, ProposalState.APPROVED, ProposalState.EXECUTED)
_CURSOR = "agent-considered"  # the newest incident id the loop has considered


# -- pure decisions --------------------------------------------------------------------------


def parse_mode(text: str) -> AutomationMode:
    """``off``, ``manual`` or ``auto``; ConfigError otherwise."""
    try:
        return AutomationMode(text.strip().lower())
    except ValueError as exc:
        msg = f"unknown automation mode {text!r}: choose off, manual or auto"
        raise ConfigError(msg) from exc


def effective_mode(stored: AutomationMode | None, ceiling: AutomationMode) -> AutomationMode:
    """The mode in force: the one a person set (``manual`` when none was), never above the
    ``CAREFLOW_AUTOMATION`` ceiling (lowering the ceiling lowers the mode at once)."""
    wanted = stored or AutomationMode.MANUAL
    return wanted if _RANK[wanted] <= _RANK[ceiling] else ceiling


def mode_refusal(requested: AutomationMode, ceiling: AutomationMode) -> str | None:
    """Why ``requested`` may not be set (None: it may): above the ceiling."""
    if _RANK[requested] > _RANK[ceiling]:
        return (f"mode {requested} is above CAREFLOW_AUTOMATION={ceiling}: the installation "
                f"allows at most {ceiling} (raise CAREFLOW_AUTOMATION where the hub runs first)")
    return None


def approve_refusal(proposal: Proposal, now_ms: int) -> str | None:
    """Why ``proposal`` may not be approved now (None: it may)."""
    if proposal.state == _P.PENDING and now_ms >= proposal.expires_ms:
        return (f"proposal {proposal.id} expired at its deadline: the fleet has moved on since "
                f"it was made; propose again (`careflow agent propose {proposal.incident_id}`)")
    if proposal.state != _P.PENDING:
        return f"proposal {proposal.id} is {proposal.state}, not pending"
    return None


def reject_refusal(proposal: Proposal) -> str | None:
    """Why ``proposal`` may not be rejected (None: it may)."""
    if proposal.state != _P.PENDING:
        return f"proposal {proposal.id} is {proposal.state}, not pending"
    return None


class Step(StrEnum):
    """What the loop does with a proposal now."""

    EXPIRE = "expire"
    AUTO_APPROVE = "auto-approve"
    EXECUTE = "execute"
    VERIFY = "verify"
    WAIT = "wait"


def next_step(proposal: Proposal, *, mode: AutomationMode, auto_allowed: bool,
              now_ms: int) -> Step:
    """The loop's next step for ``proposal``: expire a stale one, pending or approved (an
    approval given while the mode was off, or the hub down, must not act hours later on a
    fleet that has moved on); run an approved one (unless the mode is off); in auto, approve a
    pending one whose action the registry allows in auto; look at an executed one's
    verification; otherwise wait."""
    if proposal.state in (_P.PENDING, _P.APPROVED) and now_ms >= proposal.expires_ms:
        return Step.EXPIRE
    if proposal.state == _P.PENDING:
        if mode == AutomationMode.AUTO and auto_allowed:
            return Step.AUTO_APPROVE
        return Step.WAIT
    if proposal.state == _P.APPROVED:
        return Step.WAIT if mode == AutomationMode.OFF else Step.EXECUTE
    if proposal.state == _P.EXECUTED:
        return Step.VERIFY
    return Step.WAIT


class Outcome(StrEnum):
    """A verification's standing."""

    PASSED = "passed"
    FAILED = "failed"
    WAITING = "waiting"


def verification_outcome(looks: Sequence[tuple[bool, int]], *, started_ms: int,
                         now_ms: int) -> Outcome:
    """``looks``: each check's answer and its deadline (ms after the action ran). Passed when
    every check holds; failed as soon as one does not by its own deadline; waiting until
    then."""
    if all(ok for ok, _ in looks):
        return Outcome.PASSED
    late = any(not ok and now_ms >= started_ms + deadline_ms for ok, deadline_ms in looks)
    return Outcome.FAILED if late else Outcome.WAITING


# -- the service -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposeResult:
    """What ``propose`` made: a proposal, or (a care alarm, no runnable action) only the
    evidence, with why."""

    incident: Incident
    proposal: Proposal | None
    evidence: Mapping[str, Any]
    note: str


@dataclass(slots=True)
class Agent:
    """The agent over one store connection (the hub gives it its own).

    ``ctx`` is what actions run with (None: this agent only records decisions: approve,
    reject, mode, log); ``runbooks`` the loaded runbooks; ``ceiling`` CAREFLOW_AUTOMATION.
    """

    store: Store
    ceiling: AutomationMode = AutomationMode.MANUAL
    ctx: actions.ActionContext | None = None
    runbooks: Sequence[Runbook] = ()
    planner: Planner = field(default_factory=RunbookPlanner)
    clock: Clock = now_ms
    expiry_ms: int = DEFAULT_EXPIRY_MS
    escalate_channel: str = "oncall"  # the on-call route's channel

    # -- audit --------------------------------------------------------------------------------

    def audit(self, *, actor: str, event: str, subject: str, detail: Mapping[str, Any],
              at_ms: int | None = None) -> AuditEntry:
        """Append an audit row, its detail's secrets masked."""
        return self.store.append_audit(at_ms=self.clock() if at_ms is None else at_ms,
                                       actor=actor, event=event, subject=subject,
                                       detail=mask_secrets(dict(detail)))

    def refuse(self, msg: str, *, actor: str, subject: str, **detail: Any) -> RefusedError:  # noqa: ANN401
        """Audit a refusal, and the error to raise for it."""
        self.audit(actor=actor, event=AuditEvent.REFUSED, subject=subject,
                   detail={"why": msg, **detail})
        return RefusedError(msg)

    def _move(self, proposal: Proposal, *, to: ProposalState, event: str, actor: str,
              by: str | None = None, reason: str | None = None,
              result: Mapping[str, Any] | None = None,
              detail: Mapping[str, Any] | None = None) -> Proposal | None:
        """Move by compare-and-set from the state it was read in, with its audit row, in one
        transaction (None: someone else moved it first; nothing written)."""
        at = self.clock()
        with self.store.atomically(f"move proposal {proposal.id} to {to}"):
            moved = self.store.move_proposal(proposal.id, from_states=[proposal.state], to=to,
                                             at_ms=at, by=by, reason=reason,
                                             result=None if result is None
                                             else mask_secrets(dict(result)))
            if moved is not None:
                self.audit(actor=actor, event=event, subject=f"proposal {proposal.id}", at_ms=at,
                           detail={"from": str(proposal.state), "to": str(to),
                                   "incident": proposal.incident_id, "action": proposal.action,
                                   **({"reason": reason} if reason else {}),
                                   **(detail or {})})
        return moved

    # -- mode ---------------------------------------------------------------------------------

    def mode(self) -> AutomationMode:
        """The mode in force (under the ceiling)."""
        setting = self.store.automation_mode()
        return effective_mode(None if setting is None else setting.mode, self.ceiling)

    def set_mode(self, mode: AutomationMode, *, by: str, reason: str) -> AutomationSetting:
        """Set the mode, audited; refused (and audited) above the ceiling."""
        refusal = mode_refusal(mode, self.ceiling)
        if refusal is not None:
            raise self.refuse(refusal, actor=by, subject="automation", requested=str(mode),
                              ceiling=str(self.ceiling), reason=reason)
        before = self.mode()
        at = self.clock()
        with self.store.atomically("set the automation mode"):
            setting = self.store.set_automation_mode(mode=mode, by=by, reason=reason, at_ms=at)
            self.audit(actor=by, event=AuditEvent.MODE, subject="automation", at_ms=at,
                       detail={"from": str(before), "to": str(mode), "reason": reason,
                               "ceiling": str(self.ceiling)})
        return setting

    # -- decisions by people --------------------------------------------------------------------

    def _proposal(self, proposal_id: int, *, actor: str) -> Proposal:
        found = self.store.proposal(proposal_id)
        if found is None:
            raise self.refuse(f"no proposal {proposal_id}; see `careflow agent list`",
                              actor=actor, subject=f"proposal {proposal_id}")
        return found

    def approve(self, proposal_id: int, *, by: str) -> Proposal:
        """Approve a pending proposal (the loop runs it); refused and audited when it is not
        pending or has expired (an expired one is moved to ``expired`` on the way)."""
        proposal = self._proposal(proposal_id, actor=by)
        refusal = approve_refusal(proposal, self.clock())
        if refusal is not None:
            if proposal.state == _P.PENDING:  # stale: say so in its state too
                self._move(proposal, to=_P.EXPIRED, event=AuditEvent.EXPIRED, actor=AGENT)
            raise self.refuse(refusal, actor=by, subject=f"proposal {proposal_id}",
                              attempted="approve", state=str(proposal.state))
        moved = self._move(proposal, to=_P.APPROVED, event=AuditEvent.APPROVED, actor=by, by=by)
        if moved is None:
            raise self.refuse(f"proposal {proposal_id} changed meanwhile; look again",
                              actor=by, subject=f"proposal {proposal_id}", attempted="approve")
        return moved

    def reject(self, proposal_id: int, *, by: str, reason: str) -> Proposal:
        """Reject a pending proposal, with why."""
        proposal = self._proposal(proposal_id, actor=by)
        refusal = reject_refusal(proposal)
        if refusal is None:
            moved = self._move(proposal, to=_P.REJECTED, event=AuditEvent.REJECTED, actor=by,
                               by=by, reason=reason)
            if moved is not None:
                return moved
            refusal = f"proposal {proposal_id} changed meanwhile; look again"
        raise self.refuse(refusal, actor=by, subject=f"proposal {proposal_id}",
                          attempted="reject", state=str(proposal.state))

    # -- proposing ------------------------------------------------------------------------------

    def runbook_for(self, rule: str) -> Runbook | None:
        """The runbook that answers ``rule``."""
        for runbook in self.runbooks:
            if rule in runbook.rules:
                return runbook
        return None

    def _context(self) -> actions.ActionContext:
        if self.ctx is None:
            msg = "this agent was built without an action context (it cannot run actions)"
            raise ConfigError(msg)
        return self.ctx

    def propose(self, incident_id: int, *, actor: str = AGENT, action: str | None = None,
                params: Mapping[str, Any] | None = None, why: str | None = None,
                planner: str | None = None) -> ProposeResult:
        """Diagnose an incident and write a pending proposal for it.

        Runs the runbook's diagnose steps (read actions only), gathers evidence (recent
        events, device state, presence history, related incidents at the same site), and
        records the planner's choice; or, when ``action`` is given (the LLM planner, the MCP
        server), that action, after the same checks. Nothing runs here: a proposal waits for
        a person (or, in auto, for the loop).

        Args:
            incident_id: the incident.
            actor: who asks (a person's name, ``careflow-agent``, ``mcp:<client>``).
            action: a registry action to propose instead of the planner's choice.
            params: its parameters (validated against the action's JSON Schema).
            why: why, in words (with ``action``).
            planner: who chose (``runbook``, a model's name); default the planner's name.

        Returns:
            The incident, the proposal (None for a care alarm or when the runbook has no
            action that fits: then ``note`` says why) and the evidence.

        Raises:
            RefusedError: (audited) the mode is off; no such incident or it is resolved; no
                runbook answers its rule; the action is not one the runbook lists, or is
                unknown; a parameter the schema refuses (e.g. shell metacharacters).
        """
        subject = f"incident {incident_id}"
        if self.mode() == AutomationMode.OFF:
            raise self.refuse("the agent is off (`careflow agent mode manual` to turn it on): "
                              "it proposes nothing", actor=actor, subject=subject)
        incident = self.store.incident(incident_id)
        if incident is None:
            raise self.refuse(f"no incident {incident_id}; see `careflow incidents list`",
                              actor=actor, subject=subject)
        if incident.state not in UNRESOLVED:
            raise self.refuse(f"incident {incident_id} is {incident.state}: nothing to do",
                              actor=actor, subject=subject)
        runbook = self.runbook_for(incident.rule)
        if runbook is None:
            raise self.refuse(f"no runbook answers rule {incident.rule!r} (`careflow runbooks "
                              "list`)", actor=actor, subject=subject, rule=incident.rule)
        ctx = self._context()
        evidence = gather_evidence(ctx, incident, runbook)
        care = incident.rule in CARE_ALARM_RULES or runbook.read_only or not runbook.actions
        if care:
            if action is not None:
                raise self.refuse(f"{incident.rule} is a care alarm: the agent gathers evidence "
                                  "only, a person acts", actor=actor, subject=subject,
                                  action=action)
            note = ("care alarm: evidence only, no action (a person goes and looks)"
                    if incident.rule in CARE_ALARM_RULES or runbook.read_only else
                    f"runbook {runbook.id} lists no action for the agent")
            self.audit(actor=actor, event=AuditEvent.DIAGNOSED, subject=subject,
                       detail={"runbook": runbook.id, "note": note,
                               "evidence": sorted(evidence)})
            return ProposeResult(incident, None, evidence, note)
        if action is None:
            plan = self.planner.plan(incident, runbook, evidence)
            if plan is None:
                note = f"runbook {runbook.id}: no action fits this incident now"
                self.audit(actor=actor, event=AuditEvent.DIAGNOSED, subject=subject,
                           detail={"runbook": runbook.id, "note": note})
                return ProposeResult(incident, None, evidence, note)
        else:
            plan = self._given_plan(incident, runbook, action, params or {}, why, actor)
        plan = self._checked(incident, runbook, plan, actor)
        evidence = {**evidence, **plan.notes}  # a model planner's summary and ranking
        live = [p for p in self.store.proposals(incident_id=incident.id, states=list(_LIVE))
                if p.action == plan.action and dict(p.params) == dict(plan.params)]
        if live:  # one write approved twice would run twice (two restarts of one gateway)
            return ProposeResult(incident, live[0], evidence,
                                 f"already proposed: proposal {live[0].id} is {live[0].state}")
        return ProposeResult(incident, self._record(incident, runbook, plan, evidence, actor,
                                                    planner or plan.planner), evidence, plan.why)

    def _given_plan(self, incident: Incident, runbook: Runbook, action: str,
                    params: Mapping[str, Any], why: str | None, actor: str) -> Plan:
        listed = next((step for step in runbook.actions if step.action == action), None)
        if listed is None:
            raise self.refuse(
                f"{action!r} is not an action runbook {runbook.id} lists for {incident.rule} "
                f"(it lists: {', '.join(s.action for s in runbook.actions) or 'none'})",
                actor=actor, subject=f"incident {incident.id}", action=action,
                params=dict(params))
        return Plan(action=action, params=dict(params), why=why or listed.why,
                    planner=self.planner.name)

    def _checked(self, incident: Incident, runbook: Runbook, plan: Plan, actor: str) -> Plan:
        """The runbook lists the action, the registry knows it, its parameters pass the
        schema; refused and audited otherwise."""
        subject = f"incident {incident.id}"
        if plan.action not in {step.action for step in runbook.actions}:
            raise self.refuse(f"{plan.action!r} is not an action runbook {runbook.id} lists",
                              actor=actor, subject=subject, action=plan.action)
        try:
            checked = actions.validate_params(plan.action, plan.params)
        except RefusedError as exc:
            raise self.refuse(f"refused parameters: {exc}", actor=actor, subject=subject,
                              action=plan.action, params=dict(plan.params)) from exc
        return replace(plan, params=checked)

    def _record(self, incident: Incident, runbook: Runbook, plan: Plan,
                evidence: Mapping[str, Any], actor: str, planner: str) -> Proposal:
        found = actions.action(plan.action)
        argv = actions.command_line(plan.action, plan.params)
        verify_texts = [found.verification.summary + f" (within {found.verification.deadline_s:g} s)"
                        ] if found.verification is not None else []
        if runbook.verify is not None:
            verify_texts.append(f"{runbook.verify.check} {dict(runbook.verify.params)} within "
                                f"{runbook.verify.within_s} s")
        if found.never_automated:
            dry_run = f"for a person to run (never automated): {' '.join(argv)}"
        else:
            dry_run = f"would run {plan.action} {dict(plan.params)} (as `{' '.join(argv)}`)"
        at = self.clock()
        with self.store.atomically("record a proposal"):
            proposal = self.store.add_proposal(
                incident_id=incident.id, runbook=runbook.id, action=plan.action,
                params=plan.params, why=plan.why, evidence=mask_secrets(dict(evidence)),
                dry_run=dry_run, expected=found.summary,
                verify="; ".join(verify_texts) or "nothing to verify", planner=planner,
                at_ms=at, expires_ms=at + self.expiry_ms)
            self.audit(actor=actor, event=AuditEvent.PROPOSED, subject=f"proposal {proposal.id}",
                       at_ms=at, detail={"incident": incident.id, "runbook": runbook.id,
                                         "action": plan.action, "params": dict(plan.params),
                                         "why": plan.why, "planner": planner})
        return proposal

    # -- the loop ---------------------------------------------------------------------------------

    def run_once(self) -> list[str]:
        """One pass: expire stale proposals; unless off, propose for incidents not yet
        considered, run approved ones (in auto also the pending ones the registry allows),
        and look at the verifications of executed ones. What it did, in words."""
        mode = self.mode()
        done = self._propose_new() if mode != AutomationMode.OFF else []
        return done + self._advance(mode)

    def _advance(self, mode: AutomationMode) -> list[str]:
        """The next step of every live proposal, oldest first."""
        done: list[str] = []
        live = self.store.proposals(states=[_P.PENDING, _P.APPROVED, _P.EXECUTED], limit=500)
        for proposal in reversed(live):  # oldest first
            found = actions.REGISTRY.get(proposal.action)
            # auto mode runs only what the runbook itself chose: a model's or an assistant's
            # (mcp) pick always waits for a person, so no model can act on its own
            auto_allowed = (found is not None and found.auto and not found.never_automated
                            and proposal.planner in AUTO_PLANNERS)
            step = next_step(proposal, mode=mode, auto_allowed=auto_allowed, now_ms=self.clock())
            try:
                done += self._take(step, proposal)
            except Exception:  # a bug in one proposal's step must not hold up those behind it
                log.exception("the agent could not take a step", extra={
                    "proposal": proposal.id, "step": str(step)})
        return done

    def _propose_new(self) -> list[str]:
        considered = self.store.cursor(_CURSOR)
        # the oldest after the cursor, a bounded stretch per pass: a flood of incidents is
        # worked through over several passes, none passed over
        after = self.store.incidents_changed(since_ms=0, after_id=considered, limit=200)
        done = []
        for incident in after:
            if incident.state not in UNRESOLVED:
                self.store.set_cursor(_CURSOR, incident.id)
                continue
            if self.runbook_for(incident.rule) is not None and not self.store.proposals(
                    incident_id=incident.id, limit=1):
                try:
                    made = self.propose(incident.id)
                except CareflowError as exc:
                    log.warning("no proposal", extra={"incident": incident.id,
                                                      "why": str(exc)})
                except Exception:  # a bug (a planner's): logged, and the pass goes on
                    log.exception("no proposal: proposing failed unexpectedly",
                                  extra={"incident": incident.id})
                else:
                    done.append(f"incident {incident.id}: " + (
                        f"proposed {made.proposal.id} ({made.proposal.action})"
                        if made.proposal else made.note))
            self.store.set_cursor(_CURSOR, incident.id)
        return done

    def _take(self, step: Step, proposal: Proposal) -> list[str]:
        if step == Step.EXPIRE:
            self._move(proposal, to=_P.EXPIRED, event=AuditEvent.EXPIRED, actor=AGENT)
            return [f"proposal {proposal.id} expired"]
        if step == Step.AUTO_APPROVE:
            approved = self._move(proposal, to=_P.APPROVED, event=AuditEvent.APPROVED,
                                  actor=AGENT, by=f"{AGENT} (auto mode)")
            if approved is None:
                return []
            return [f"proposal {proposal.id} approved (auto)", *self._execute(approved)]
        if step == Step.EXECUTE:
            return self._execute(proposal)
        if step == Step.VERIFY:
            return self._verify(proposal)
        return []

    def _execute(self, proposal: Proposal) -> list[str]:
        """Claim the proposal (approved → executed, compare-and-set) and only then run its
        action: two loops (the hub's, `careflow agent run`) never both run one write. What it
        returned goes into the proposal and the trail; an action that could not run, or
        failed in a way nobody foresaw, is failed and escalated: a person must hear of it."""
        ctx = self._context()
        claimed = self._move(proposal, to=_P.EXECUTED, event=AuditEvent.EXECUTED, actor=AGENT,
                             detail={"params": dict(proposal.params)})
        if claimed is None:
            return []  # another loop has it
        try:
            gone = unreachable(ctx, proposal.action, proposal.params)
            if gone is not None:  # it would only wait out the timeout, holding the loop
                raise RefusedError(gone)
            result = actions.execute(ctx, proposal.action, proposal.params)
        except Exception as exc:  # whatever it was, a person must hear of it
            if not isinstance(exc, CareflowError):
                log.exception("an action failed unexpectedly", extra={
                    "proposal": proposal.id, "action": proposal.action})
            why = f"{proposal.action} could not run: {exc}"
            failed = self._move(claimed, to=_P.FAILED, event=AuditEvent.FAILED, actor=AGENT,
                                reason=why)
            return [f"proposal {proposal.id} failed: {why}",
                    *([] if failed is None else self._escalate(failed))]
        at = self.clock()
        masked = mask_secrets(dict(result))
        with self.store.atomically(f"keep what proposal {proposal.id} returned"):
            done = self.store.move_proposal(proposal.id, from_states=[_P.EXECUTED],
                                            to=_P.EXECUTED, at_ms=at, result=masked)
            if done is not None:
                self.audit(actor=AGENT, event=AuditEvent.RESULT, at_ms=at,
                           subject=f"proposal {proposal.id}",
                           detail={"action": proposal.action, "result": masked})
        if done is None:
            return []  # verified (or failed) meanwhile by another loop
        return [f"proposal {proposal.id} executed ({proposal.action})", *self._verify(done)]

    def _looks(self, proposal: Proposal) -> list[tuple[actions.Check, int]]:
        """One look at each verification (the runbook's, the action's), each with its
        deadline in ms. When the runbook's check passes (the incident is handled), that look
        alone is the answer: the action's own effect no longer matters (an acknowledged
        incident that has since resolved)."""
        ctx = self._context()
        started = proposal.executed_ms or proposal.created_ms
        looks: list[tuple[actions.Check, int]] = []
        incident = self.store.incident(proposal.incident_id)
        runbook = self.runbook_for(incident.rule) if incident is not None else None
        if runbook is not None and runbook.verify is not None and incident is not None:
            spec = runbook.verify
            check_params = render(spec.params, incident)
            handled = _look(lambda: actions.run_check(ctx, spec.check, check_params,
                                                      started_ms=started))
            if handled.ok:
                return [(handled, 0)]
            looks.append((handled, spec.within_s * 1000))
        verification = actions.action(proposal.action).verification
        if verification is not None:
            gone = unreachable(ctx, proposal.action, proposal.params)
            looks.append((actions.Check(False, gone) if gone is not None else
                          _look(lambda: verification.check(ctx, proposal.params, started)),
                          int(verification.deadline_s * 1000)))
        return looks

    def _verify(self, proposal: Proposal) -> list[str]:
        looks = self._looks(proposal)
        outcome = verification_outcome(
            [(check.ok, deadline) for check, deadline in looks],
            started_ms=proposal.executed_ms or proposal.created_ms, now_ms=self.clock())
        seen = {"checks": [{"ok": c.ok, "detail": c.detail} for c, _ in looks]}
        if outcome == Outcome.PASSED:
            self._move(proposal, to=_P.VERIFIED, event=AuditEvent.VERIFIED, actor=AGENT,
                       detail=seen)
            return [f"proposal {proposal.id} verified"]
        if outcome == Outcome.WAITING:
            return []
        why = "verification failed by its deadline: " + "; ".join(
            c.detail for c, _ in looks if not c.ok)
        failed = self._move(proposal, to=_P.FAILED, event=AuditEvent.FAILED, actor=AGENT,
                            reason=why, detail=seen)
        return [f"proposal {proposal.id} failed: {why}",
                *([] if failed is None else self._escalate(failed))]

    def _escalate(self, proposal: Proposal) -> list[str]:
        """Tell the on-call route (the runbook's ``escalate.to``), through the outbox, that the
        agent's action did not help; the incident stays open: a person has it now."""
        at = self.clock()
        incident = self.store.incident(proposal.incident_id)
        runbook = None if incident is None else self.runbook_for(incident.rule)
        channel = runbook.escalate.to if runbook is not None and runbook.escalate.to \
            else self.escalate_channel
        if incident is not None and fnmatch.fnmatchcase(incident.gateway, CHECK_GATEWAYS):
            channel = CHECK_CHANNEL  # careflow-check.sh's synthetic gateways never page on-call
        source = "" if incident is None else \
            f" ({incident.rule} {incident.gateway}/{incident.device})"
        title = (f"ESCALATED: the agent's {proposal.action} did not help incident "
                 f"{proposal.incident_id}{source}")
        say = f" {runbook.escalate.say}." if runbook is not None and runbook.escalate.say else ""
        body = (f"Proposal {proposal.id} ({proposal.action} {dict(proposal.params)}): "
                f"{proposal.reason or 'it did not verify'}. The incident is still open: a "
                f"person takes it from here.{say} See `careflow incidents show "
                f"{proposal.incident_id}` and `careflow agent show {proposal.id}`.")
        with self.store.atomically("escalate a proposal"):
            moved = self._move(proposal, to=_P.ESCALATED, event=AuditEvent.ESCALATED,
                               actor=AGENT, detail={"channel": channel})
            if moved is None:
                return []
            note = self.store.queue_notification(channel, kind=NotificationKind.ESCALATION,
                                                 title=title, body=mask_text(body), at_ms=at)
            if incident is not None:
                self.store.record_action(incident.id, at_ms=at, action="agent escalated",
                                         by=AGENT, via="agent",
                                         detail=f"proposal {proposal.id}: {proposal.reason}")
        return [f"proposal {proposal.id} escalated to {channel} (notification {note})"]

    def run(self, stop: threading.Event, *, interval_s: float = 1.0) -> None:
        """:meth:`run_once` every ``interval_s`` until ``stop`` is set; an error in one pass
        is logged and the next pass runs."""
        while not stop.is_set():
            try:
                for line in self.run_once():
                    log.info("agent: %s", line)
            except Exception:
                log.exception("the agent's pass failed; trying again")
            stop.wait(interval_s)


class AgentLoop:
    """The agent's loop in a thread of the hub, on its own store connection (started and
    stopped with the hub; each pass reads the mode, so `careflow agent mode off` takes effect
    at the next pass)."""

    def __init__(self, agent: Agent, *, interval_s: float = 1.0) -> None:
        self.agent = agent
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run passes in a daemon thread."""
        self._thread = threading.Thread(target=self.agent.run, args=(self._stop,),
                                        kwargs={"interval_s": self.interval_s},
                                        name="careflow-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the pass under way (a gateway command waits at most its timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def agent_for(settings: Settings, store: Store, *, runbooks: Sequence[Runbook] | None = None,
              gateway: GatewayCommands | None = None, clock: Clock = now_ms,
              expiry_ms: int = DEFAULT_EXPIRY_MS) -> Agent:
    """The agent as the hub and `careflow agent` run it: the runbooks of CAREFLOW_RUNBOOKS_DIR
    (else the shipped ones), gateway commands over the configured broker, the default planner,
    and CAREFLOW_AUTOMATION as the ceiling.

    Raises:
        ConfigError: the runbooks folder is missing or a runbook has a problem.
    """
    books = list(load_runbooks().values()) if runbooks is None else list(runbooks)
    ctx = actions.ActionContext(store=store, settings=settings,
                                gateway=gateway or MqttGatewayCommands(settings), clock=clock,
                                pki_dir=settings.pki_dir, gateway_timeout_s=5.0)
    planner = model_planner(os.environ, fallback=RunbookPlanner(ctx), audit=store, clock=clock)
    return Agent(store, ceiling=parse_mode(settings.automation), ctx=ctx, runbooks=books,
                 planner=planner, clock=clock, expiry_ms=expiry_ms)


def _look(check: Callable[[], actions.Check]) -> actions.Check:
    """One look; a gateway that does not answer yet is "not yet", not the end. A check that
    fails in a way nobody foresaw is "not yet" too: by its deadline the proposal fails and a
    person hears of it (it would otherwise stay executed, unverified, forever)."""
    try:
        return check()
    except Exception as exc:
        if not isinstance(exc, CareflowError):
            log.exception("a verification failed unexpectedly")
        return actions.Check(False, f"{type(exc).__name__}: {exc}")
