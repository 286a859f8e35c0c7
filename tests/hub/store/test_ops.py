"""What the operations agent keeps: proposals (compare-and-set lifecycle), the hash-chained
audit trail, the automation mode, and rule controls."""

from __future__ import annotations

from typing import Any

import pytest

from careflow.hub.store.audit_chain import GENESIS, first_broken
from careflow.hub.store.records import (
    AutomationMode,
    ProposalState,
    RuleControlKind,
)
from tests.hub.store.conftest import OUT, Adapter, Store, opener

P = ProposalState


def _propose(store: Store, incident_id: int = 7, **changes: Any) -> int:
    fields: dict[str, Any] = {
        "incident_id": incident_id, "runbook": "gateway-offline", "action": "gateway.ping",
        "params": {"gateway": "gw-1"}, "why": "no heartbeat for 5 min",
        "evidence": {"events": [1, 2]}, "dry_run": "would ping gw-1", "expected": "an answer",
        "verify": "gateway online within 60 s", "planner": "runbook", "at_ms": 100,
        "expires_ms": 1_000, **changes}
    return store.add_proposal(**fields).id


def test_it_keeps_a_proposal_as_given_and_pending(store: Store) -> None:
    made = store.proposal(_propose(store))
    assert made is not None
    assert (made.incident_id, made.runbook, made.action, made.params, made.why, made.evidence,
            made.dry_run, made.expected, made.verify, made.planner, made.state, made.created_ms,
            made.expires_ms) == (
        7, "gateway-offline", "gateway.ping", {"gateway": "gw-1"}, "no heartbeat for 5 min",
        {"events": [1, 2]}, "would ping gw-1", "an answer", "gateway online within 60 s",
        "runbook", P.PENDING, 100, 1_000)
    assert (made.decided_by, made.decided_ms, made.reason, made.executed_ms, made.result,
            made.verified_ms) == (None, None, None, None, None, None)
    assert store.proposal(9999) is None


def test_it_lists_proposals_newest_first_by_state_and_incident(store: Store) -> None:
    first, second, third = _propose(store, 1), _propose(store, 2), _propose(store, 1)
    store.move_proposal(second, from_states=[P.PENDING], to=P.REJECTED, at_ms=5, by="ana",
                        reason="not now")
    assert [p.id for p in store.proposals()] == [third, second, first]
    assert [p.id for p in store.proposals(states=[P.PENDING])] == [third, first]
    assert [p.id for p in store.proposals(incident_id=1)] == [third, first]
    assert [p.id for p in store.proposals(states=[P.REJECTED], incident_id=1)] == []
    assert [p.id for p in store.proposals(limit=1)] == [third]


def test_a_proposal_moves_once_from_a_state_and_stamps_its_time(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    made = _propose(store)
    approved = store.move_proposal(made, from_states=[P.PENDING], to=P.APPROVED, at_ms=200,
                                   by="ana")
    assert approved is not None
    assert (approved.state, approved.decided_by, approved.decided_ms) == (P.APPROVED, "ana", 200)
    assert other.move_proposal(made, from_states=[P.PENDING], to=P.REJECTED, at_ms=201,
                               by="bo") is None  # lost the race: nothing written
    executed = other.move_proposal(made, from_states=[P.APPROVED], to=P.EXECUTED, at_ms=300,
                                   result={"answered": True})
    assert executed is not None
    assert (executed.executed_ms, executed.result, executed.decided_by) == (
        300, {"answered": True}, "ana")
    verified = store.move_proposal(made, from_states=[P.EXECUTED], to=P.VERIFIED, at_ms=400)
    assert verified is not None and verified.verified_ms == 400
    assert store.move_proposal(9999, from_states=[P.PENDING], to=P.EXPIRED, at_ms=1) is None


def test_a_failed_proposal_keeps_why_and_escalates(store: Store) -> None:
    made = _propose(store)
    store.move_proposal(made, from_states=[P.PENDING], to=P.APPROVED, at_ms=1, by="ana")
    store.move_proposal(made, from_states=[P.APPROVED], to=P.EXECUTED, at_ms=2, result={})
    failed = store.move_proposal(made, from_states=[P.EXECUTED], to=P.FAILED, at_ms=3,
                                 reason="still offline after 60 s")
    assert failed is not None and (failed.state, failed.reason, failed.executed_ms) == (
        P.FAILED, "still offline after 60 s", 3)
    escalated = store.move_proposal(made, from_states=[P.FAILED], to=P.ESCALATED, at_ms=4)
    assert escalated is not None and escalated.state == P.ESCALATED
    assert escalated.reason == "still offline after 60 s"


def test_the_audit_trail_is_a_hash_chain_that_holds(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    first = store.append_audit(at_ms=1, actor="ana", event="mode", subject="automation",
                               detail={"to": "manual", "n": 1})
    second = other.append_audit(at_ms=2, actor="agent", event="proposed", subject="proposal 1",
                                detail={"action": "gateway.ping"})
    assert (first.pos, first.prev_hash) == (1, GENESIS)
    assert second.prev_hash == first.hash and second.pos > first.pos
    log = store.audit_log()
    assert log == [first, second]
    assert first_broken(log) is None
    assert store.audit_log(after_pos=first.pos) == [second]
    assert store.audit_log(limit=1) == [first]


def test_the_automation_mode_is_kept_with_who_and_why(store: Store) -> None:
    assert store.automation_mode() is None
    store.set_automation_mode(mode="auto", by="ana", reason="night shift", at_ms=5)
    setting = store.set_automation_mode(mode=AutomationMode.OFF, by="bo", reason="storm",
                                        at_ms=9)
    assert store.automation_mode() == setting
    assert (setting.mode, setting.by, setting.reason, setting.at_ms) == (
        AutomationMode.OFF, "bo", "storm", 9)
    with pytest.raises(ValueError, match="yolo"):
        store.set_automation_mode(mode="yolo", by="x", reason="", at_ms=1)


def test_a_rule_is_muted_until_it_expires_or_disabled_until_enabled(store: Store) -> None:
    muted = store.set_rule_control("battery-low", kind="muted", until_ms=100, by="ana",
                                   reason="new cells", at_ms=1)
    store.set_rule_control("error-burst", kind=RuleControlKind.DISABLED, until_ms=None,
                           by="bo", reason="firmware bug", at_ms=2)
    assert (muted.rule, muted.kind, muted.until_ms, muted.by, muted.reason, muted.at_ms) == (
        "battery-low", RuleControlKind.MUTED, 100, "ana", "new cells", 1)
    assert [c.rule for c in store.rule_controls()] == ["battery-low", "error-burst"]
    assert [c.rule for c in store.rule_controls(now_ms=99)] == ["battery-low", "error-burst"]
    assert [c.rule for c in store.rule_controls(now_ms=100)] == ["error-burst"]  # mute over
    replaced = store.set_rule_control("battery-low", kind="disabled", until_ms=None, by="cy",
                                      reason="noisy", at_ms=3)
    assert store.rule_controls(now_ms=200)[0] == replaced
    assert store.clear_rule_control("battery-low")
    assert not store.clear_rule_control("battery-low")
    assert [c.rule for c in store.rule_controls()] == ["error-burst"]


def test_it_counts_each_rules_incidents_and_notifications_since_a_moment(store: Store) -> None:
    open_ = opener(store)
    open_("battery-low", "gw-1", "s-1", at_ms=500, notify=[OUT])  # before: not counted
    store.resolve_incidents(rule="battery-low", gateway="gw-1", device="s-1", at_ms=600,
                            by="careflow")
    open_("battery-low", "gw-1", "s-1", at_ms=1_000, notify=[OUT, ("ops", "t", "b")])
    open_("battery-low", "gw-1", "s-2", at_ms=2_000)  # muted: recorded, nothing written
    open_("error-burst", "gw-2", "s-1", at_ms=3_000, notify=[OUT])
    store.resolve_incidents(rule="error-burst", gateway="gw-2", device="s-1", at_ms=4_000,
                            by="careflow", notify=[OUT])
    assert store.rule_activity(since_ms=1_000) == {"battery-low": (2, 2),
                                                   "error-burst": (1, 2)}
    assert store.rule_activity(since_ms=5_000) == {}
