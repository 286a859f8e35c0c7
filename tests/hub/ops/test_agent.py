"""The operations agent: pure lifecycle decisions (table tests with ``now`` passed in), secret
masking, and the service over a real SQLite store with runbooks written here.

The gateway's side is a stand-in for the MQTT round trip (its own tests, and the end-to-end
scenarios in tests/hub/test_agent_e2e.py, use a real broker and agent); everything of ours is
real: the store, the registry, the runbooks parser, the audit chain.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from careflow.core.errors import ConfigError, RefusedError
from careflow.edge.stamper import Stamper
from careflow.hub.ops.agent import (
    AGENT,
    Agent,
    Outcome,
    Step,
    agent_for,
    approve_refusal,
    effective_mode,
    mode_refusal,
    next_step,
    parse_mode,
    verification_outcome,
)
from careflow.hub.ops.audit import MASK, chain_problem, mask_secrets, mask_text
from careflow.hub.ops.runbooks import load_runbooks
from careflow.hub.store.records import AutomationMode, Proposal, ProposalState
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import make_settings
from tests.hub.conftest import batch_of
from tests.hub.store.conftest import presence

M = AutomationMode
P = ProposalState

SECTIONS = "\n".join(f"## {name}\n\ntext\n" for name in (
    "Meaning", "Impact", "Diagnosis", "Mitigation", "Verify", "Rollback", "When to escalate"))
RUNBOOKS = {
    "gateway-offline": """---
id: gateway-offline
title: A gateway went offline
rules: [gateway-offline]
diagnose:
  - action: gateway.ping
    params: {gateway: "{{incident.gateway}}"}
actions:
  - action: incident.ack
    params: {incident: "{{incident.id}}"}
    why: someone has it while the gateway comes back
  - action: gateway.resend
    params: {gateway: "{{incident.gateway}}"}
verify: {check: incident.resolved, params: {incident: "{{incident.id}}"}, within: 2s}
escalate: {to: oncall, say: send a technician}
---
""",
    "care-alarm": """---
id: care-alarm
title: A care alarm
rules: [care-alarm]
read_only: true
diagnose:
  - action: device.show
    params: {gateway: "{{incident.gateway}}", device: "{{incident.device}}"}
actions: []
verify: {check: incident.acknowledged, params: {incident: "{{incident.id}}"}, within: 5m}
escalate: {to: oncall, say: call the care setting}
---
""",
}


class Gateways:
    """The gateway side of the MQTT round trip: answers every command ok."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        self.sent.append((gateway, name))
        return {"id": "x", "name": name, "ok": True, "result": {"outbox_waiting": 0},
                "elapsed_ms": 1}


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Agent, SqliteStore, Clock, Gateways]]:
    books = tmp_path / "runbooks"
    books.mkdir()
    for name, head in RUNBOOKS.items():
        (books / f"{name}.md").write_text(head + SECTIONS)
    settings = make_settings(tmp_path / "data", None, CAREFLOW_AUTOMATION="auto")
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    clock, gateways = Clock(), Gateways()
    agent = agent_for(settings, store, runbooks=list(load_runbooks(books).values()),
                      gateway=gateways, clock=clock, expiry_ms=60_000)
    yield agent, store, clock, gateways
    store.close()


def _incident(store: SqliteStore, rule: str = "gateway-offline", device: str = "gw-1",
              at_ms: int = 999_000) -> int:
    made = store.open_incident(rule=rule, gateway="gw-1", device=device, severity="critical",
                               summary=f"{rule} gw-1", detail="", at_ms=at_ms)
    assert made is not None
    return made


def _events(store: SqliteStore) -> list[tuple[str, str]]:
    return [(e.event, e.subject) for e in store.audit_log()]


def _proposal(**changes: Any) -> Proposal:
    fields: dict[str, Any] = {
        "id": 1, "incident_id": 2, "runbook": "r", "action": "incident.ack", "params": {},
        "why": "", "evidence": {}, "dry_run": "", "expected": "", "verify": "",
        "planner": "runbook", "state": P.PENDING, "created_ms": 0, "expires_ms": 100, **changes}
    return Proposal(**fields)


# -- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stored", "ceiling", "expected"), [
    (None, M.AUTO, M.MANUAL), (None, M.OFF, M.OFF), (M.AUTO, M.AUTO, M.AUTO),
    (M.AUTO, M.MANUAL, M.MANUAL), (M.OFF, M.AUTO, M.OFF), (M.MANUAL, M.OFF, M.OFF)])
def test_it_keeps_the_mode_under_the_ceiling(stored: M | None, ceiling: M, expected: M) -> None:
    assert effective_mode(stored, ceiling) == expected


def test_it_refuses_a_mode_above_the_ceiling_only() -> None:
    assert mode_refusal(M.AUTO, M.MANUAL) is not None
    assert "CAREFLOW_AUTOMATION=manual" in (mode_refusal(M.AUTO, M.MANUAL) or "")
    assert mode_refusal(M.MANUAL, M.OFF) is not None
    assert mode_refusal(M.OFF, M.OFF) is None
    assert mode_refusal(M.MANUAL, M.AUTO) is None
    with pytest.raises(ConfigError, match="yolo"):
        parse_mode("yolo")


def test_it_approves_only_a_pending_proposal_before_it_expires() -> None:
    assert approve_refusal(_proposal(), 99) is None
    assert "expired" in (approve_refusal(_proposal(), 100) or "")
    assert "rejected" in (approve_refusal(_proposal(state=P.REJECTED), 1) or "")


@pytest.mark.parametrize(("state", "mode", "auto", "now", "step"), [
    (P.PENDING, M.MANUAL, True, 50, Step.WAIT),
    (P.PENDING, M.AUTO, True, 50, Step.AUTO_APPROVE),
    (P.PENDING, M.AUTO, False, 50, Step.WAIT),
    (P.PENDING, M.AUTO, True, 100, Step.EXPIRE),
    (P.PENDING, M.OFF, False, 100, Step.EXPIRE),
    (P.APPROVED, M.MANUAL, False, 50, Step.EXECUTE),
    (P.APPROVED, M.OFF, True, 50, Step.WAIT),
    # an approval does not outlive its proposal: given while off (or the hub down), it
    # must not act hours later on a fleet that has moved on
    (P.APPROVED, M.MANUAL, False, 500, Step.EXPIRE),
    (P.APPROVED, M.OFF, False, 100, Step.EXPIRE),
    (P.EXECUTED, M.MANUAL, False, 50, Step.VERIFY),
    (P.ESCALATED, M.AUTO, True, 50, Step.WAIT),
])
def test_it_decides_the_next_step(state: P, mode: M, auto: bool, now: int, step: Step) -> None:
    assert next_step(_proposal(state=state), mode=mode, auto_allowed=auto, now_ms=now) == step


def test_it_waits_for_each_verification_until_its_own_deadline() -> None:
    assert verification_outcome([(True, 10), (True, 10)], started_ms=0,
                                now_ms=99) == Outcome.PASSED
    assert verification_outcome([(True, 10), (False, 10)], started_ms=0,
                                now_ms=9) == Outcome.WAITING
    assert verification_outcome([(False, 10)], started_ms=5, now_ms=15) == Outcome.FAILED
    assert verification_outcome([(False, 60), (False, 10)], started_ms=0,
                                now_ms=10) == Outcome.FAILED  # the shorter deadline decides
    assert verification_outcome([(True, 10), (False, 60)], started_ms=0,
                                now_ms=59) == Outcome.WAITING


def test_it_masks_secrets_in_audit_details() -> None:
    masked = mask_secrets({"broker_password": "hunter2", "api_key": "k", "gateway": "gw-1",
                           "nested": [{"token": "t"}], "url": "mqtt://hub:s3cret@h:1883",
                           "hook": "https://h.example/x?token=abc&site=a",
                           "channel": "json://hooks.example/T0/B1/secret"})
    assert masked == {"broker_password": MASK, "api_key": MASK, "gateway": "gw-1",
                      "nested": [{"token": MASK}], "url": f"mqtt://hub:{MASK}@h:1883",
                      "hook": f"https://h.example/x?token={MASK}&site=a",
                      "channel": f"json://{MASK}"}
    assert "s3cret" not in mask_text("see mqtts://u:s3cret@broker for details")


# -- the service -----------------------------------------------------------------------------


def test_it_proposes_the_runbooks_action_with_evidence(world: Any) -> None:
    agent, store, _clock, gateways = world
    incident = _incident(store)
    made = agent.propose(incident)
    proposal = made.proposal
    assert proposal is not None and proposal.state == P.PENDING
    assert (proposal.action, proposal.params, proposal.runbook, proposal.planner) == (
        "incident.ack", {"incident": incident}, "gateway-offline", "runbook")
    assert proposal.why == "someone has it while the gateway comes back"
    assert {"incident", "device_state", "recent_events", "presence_history",
            "related_incidents", "diagnose"} <= set(proposal.evidence)
    assert proposal.evidence["diagnose"][0]["action"] == "gateway.ping"
    assert gateways.sent == [("gw-1", "ping")]  # the diagnose step ran (a read)
    assert "careflow incidents ack" in proposal.dry_run
    assert "incident.resolved" in proposal.verify
    assert proposal.expires_ms == 1_060_000
    assert _events(store) == [("proposed", f"proposal {proposal.id}")]


def test_it_refuses_and_audits_what_the_runbook_does_not_list(world: Any) -> None:
    agent, store, _clock, _gw = world
    incident = _incident(store)
    with pytest.raises(RefusedError, match="not an action runbook gateway-offline lists"):
        agent.propose(incident, actor="mcp:helper", action="devices.pause",
                      params={"gateway": "gw-1", "for": "1h", "reason": "x"})
    with pytest.raises(RefusedError, match="refused parameters"):
        agent.propose(incident, actor="mcp:helper", action="gateway.resend",
                      params={"gateway": "gw;rm -rf /"})
    assert store.proposals() == []
    log = store.audit_log()
    assert [(e.event, e.actor) for e in log] == [("refused", "mcp:helper")] * 2
    assert log[1].detail["params"] == {"gateway": "gw;rm -rf /"}


def test_it_gives_a_care_alarm_evidence_only(world: Any) -> None:
    agent, store, _clock, _gw = world
    alarm = _incident(store, rule="care-alarm", device="fall-1")
    made = agent.propose(alarm)
    assert made.proposal is None and "care alarm" in made.note
    assert made.evidence["diagnose"][0]["action"] == "device.show"
    with pytest.raises(RefusedError, match="care alarm"):
        agent.propose(alarm, action="incident.ack", params={"incident": alarm})
    assert store.proposals() == []
    assert [e.event for e in store.audit_log()] == ["diagnosed", "refused"]


def test_it_proposes_nothing_when_off_and_refuses_a_mode_above_the_ceiling(
        world: Any, tmp_path: Path) -> None:
    agent, store, _clock, _gw = world
    incident = _incident(store)
    agent.set_mode(M.OFF, by="ana", reason="storm")
    assert agent.run_once() == []
    with pytest.raises(RefusedError, match="off"):
        agent.propose(incident)
    assert store.proposals() == []
    capped = Agent(store, ceiling=M.MANUAL, clock=agent.clock)
    with pytest.raises(RefusedError, match="above CAREFLOW_AUTOMATION=manual"):
        capped.set_mode(M.AUTO, by="bo", reason="night")
    assert store.automation_mode() is not None and store.automation_mode().mode == M.OFF
    log = store.audit_log()
    assert [(e.event, e.actor) for e in log] == [("mode", "ana"), ("refused", AGENT),
                                                 ("refused", "bo")]
    assert log[0].detail == {"from": "manual", "to": "off", "reason": "storm",
                             "ceiling": "auto"}


def test_it_refuses_and_audits_approving_an_expired_proposal(world: Any) -> None:
    agent, store, clock, _gw = world
    proposal = agent.propose(_incident(store)).proposal
    clock.ms += 60_000
    with pytest.raises(RefusedError, match="expired"):
        agent.approve(proposal.id, by="ana")
    assert store.proposal(proposal.id).state == P.EXPIRED
    assert _events(store)[-2:] == [("expired", f"proposal {proposal.id}"),
                                   ("refused", f"proposal {proposal.id}")]


def test_an_approved_proposal_runs_and_verifies(world: Any) -> None:
    agent, store, clock, _gw = world
    incident = _incident(store)
    proposal = agent.propose(incident).proposal
    assert agent.run_once() == []  # manual: nothing runs unapproved
    agent.approve(proposal.id, by="ana")
    done = agent.run_once()
    assert done[0] == f"proposal {proposal.id} executed (incident.ack)"
    assert store.incident(incident).state == "acknowledged"
    assert store.proposal(proposal.id).state == P.EXECUTED  # the incident is not resolved yet
    store.resolve_incident(incident, by="nurse", at_ms=clock.ms)
    clock.ms += 500
    assert agent.run_once() == [f"proposal {proposal.id} verified"]
    assert [e.event for e in store.audit_log()] == [
        "proposed", "approved", "executed", "result", "verified"]
    assert store.audit_log()[3].detail["result"]["state"] == "acknowledged"
    assert chain_problem(store.audit_log()) is None


def test_a_failed_verification_escalates_and_leaves_the_incident_open(world: Any) -> None:
    agent, store, clock, _gw = world
    incident = _incident(store)
    proposal = agent.propose(incident).proposal
    agent.approve(proposal.id, by="ana")
    agent.run_once()
    clock.ms += 2_000  # past the runbook's deadline (2 s; the ack's own is 5 s)
    done = agent.run_once()
    assert done[-1].startswith(f"proposal {proposal.id} escalated to oncall")
    ended = store.proposal(proposal.id)
    assert ended.state == P.ESCALATED and "incident 1 is acknowledged" in (ended.reason or "")
    assert store.incident(incident).state != "resolved"
    note = store.notifications()[0]
    assert (note.channel, note.kind) == ("oncall", "escalation")
    assert "send a technician" in note.body
    assert [a.action for a in store.incident_actions(incident)] == ["acknowledge",
                                                                    "agent escalated"]
    assert [e.event for e in store.audit_log()][-2:] == ["failed", "escalated"]


def test_a_check_gateways_failed_action_escalates_to_the_check_channel_never_oncall(
        world: Any) -> None:
    agent, store, clock, _gw = world
    made = store.open_incident(rule="gateway-offline", gateway="check-host-1",
                               device="check-host-1", severity="critical",
                               summary="gateway-offline check-host-1", detail="", at_ms=999_000)
    assert made is not None
    proposal = agent.propose(made).proposal
    agent.approve(proposal.id, by="ana")
    agent.run_once()
    clock.ms += 2_000
    done = agent.run_once()
    assert done[-1].startswith(f"proposal {proposal.id} escalated to check")
    assert [n.channel for n in store.notifications()] == ["check"]


def test_a_flood_of_incidents_is_worked_through_none_passed_over(world: Any) -> None:
    agent, store, _clock, _gw = world
    agent.set_mode(M.MANUAL, by="ana", reason="day")
    made = [store.open_incident(rule="gateway-offline", gateway=f"gw-{n}", device=f"gw-{n}",
                                severity="critical", summary=f"gw-{n} offline", detail="",
                                at_ms=999_000) for n in range(1, 251)]
    for _ in range(3):
        agent.run_once()
    considered = {p.incident_id for p in store.proposals(limit=1000)}
    assert considered == set(made)  # 250 > one pass's 200: the oldest are not skipped


def test_in_auto_the_loop_proposes_and_runs_what_the_registry_allows(world: Any) -> None:
    agent, store, _clock, gateways = world
    agent.set_mode(M.AUTO, by="ana", reason="night")
    store.append(batch_of([Stamper(gateway="gw-1").stamp("heartbeat", {"interval_s": 60})]))
    incident = _incident(store)
    store.acknowledge_incident(incident, by="bo", at_ms=999_500)  # incident.ack no longer fits
    done = agent.run_once()
    proposal = store.proposals()[0]
    assert proposal.action == "gateway.resend"
    assert done[:2] == [f"incident {incident}: proposed {proposal.id} (gateway.resend)",
                        f"proposal {proposal.id} approved (auto)"]
    assert ("gw-1", "resend") in gateways.sent
    assert store.proposal(proposal.id).decided_by == f"{AGENT} (auto mode)"
    assert agent.run_once() == []  # considered once


def test_the_audit_chain_names_an_edited_row(world: Any, tmp_path: Path) -> None:
    agent, store, _clock, _gw = world
    agent.set_mode(M.MANUAL, by="ana", reason="day")
    agent.set_mode(M.AUTO, by="ana", reason="night")
    with sqlite3.connect(tmp_path / "careflow.db") as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE pos = 1")
    broken = chain_problem(store.audit_log())
    assert broken is not None and broken[0].pos == 1 and "edited" in broken[1]


def test_two_loops_never_both_run_one_approved_write(world: Any) -> None:
    agent, store, _clock, gateways = world
    store.append(batch_of([Stamper(gateway="gw-1").stamp("heartbeat", {"interval_s": 60})]))
    incident = _incident(store)
    store.acknowledge_incident(incident, by="bo", at_ms=999_500)
    proposal = agent.propose(incident).proposal
    assert proposal.action == "gateway.resend"
    agent.approve(proposal.id, by="ana")
    approved = store.proposal(proposal.id)
    other = Agent(store, ceiling=agent.ceiling, ctx=agent.ctx, runbooks=agent.runbooks,
                  clock=agent.clock)
    assert other.run_once()[0] == f"proposal {proposal.id} executed (gateway.resend)"
    assert agent._take(Step.EXECUTE, approved) == []  # read as approved, claimed already
    assert gateways.sent.count(("gw-1", "resend")) == 1


class Exploding(Gateways):
    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        if name == "resend":
            raise ZeroDivisionError("a bug")
        return super().send(gateway, name, args, timeout_s=timeout_s)


def test_an_action_that_fails_unforeseen_is_escalated(world: Any) -> None:
    agent, store, _clock, _gw = world
    store.append(batch_of([Stamper(gateway="gw-1").stamp("heartbeat", {"interval_s": 60})]))
    incident = _incident(store)
    store.acknowledge_incident(incident, by="bo", at_ms=999_500)
    proposal = agent.propose(incident).proposal
    agent.approve(proposal.id, by="ana")
    broken = agent_for(make_settings(Path("/nonexistent"), None), store,
                       runbooks=agent.runbooks, gateway=Exploding(), clock=agent.clock)
    done = broken.run_once()
    assert done[0].startswith(f"proposal {proposal.id} failed: gateway.resend could not run")
    assert store.proposal(proposal.id).state == P.ESCALATED
    assert store.incident(incident).state == "acknowledged"


class BrokenPlanner:
    """A planner with a bug (any planner: a model's, a future one)."""

    name = "runbook"

    def plan(self, *_args: Any) -> None:
        raise ZeroDivisionError("a bug")


def test_a_bug_proposing_for_one_incident_holds_up_nothing_else(world: Any) -> None:
    agent, store, _clock, _gw = world
    first = _incident(store)
    proposal = agent.propose(first).proposal
    agent.approve(proposal.id, by="ana")
    second = _incident(store, device="gw-2")
    broken = Agent(store, ceiling=agent.ceiling, ctx=agent.ctx, runbooks=agent.runbooks,
                   planner=BrokenPlanner(), clock=agent.clock)
    # the pass raised ZeroDivisionError: nothing approved ran, every pass, while it lasted
    assert broken.run_once() == [f"proposal {proposal.id} executed (incident.ack)"]
    assert store.proposals(incident_id=second) == []  # logged; a person proposes by hand
    assert store.incident(first).state == "acknowledged"


class BrokenDiagnostics(Gateways):
    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        if name == "diagnostics":  # what gateway.resend's verification asks
            raise ZeroDivisionError("a bug")
        return super().send(gateway, name, args, timeout_s=timeout_s)


def test_a_bug_verifying_one_proposal_holds_up_nothing_and_escalates_it(world: Any) -> None:
    agent, store, clock, _gw = world
    store.append(presence("gw-1", "online", 1, "boot-1", 990_000))
    resent = _incident(store)
    store.acknowledge_incident(resent, by="bo", at_ms=999_500)  # incident.ack no longer fits
    resend = agent.propose(resent).proposal
    assert resend.action == "gateway.resend"
    agent.approve(resend.id, by="ana")
    agent.run_once()
    assert store.proposal(resend.id).state == P.EXECUTED  # waits for the incident to resolve
    ack = agent.propose(_incident(store, device="gw-2")).proposal
    agent.approve(ack.id, by="ana")
    broken = agent_for(make_settings(Path("/nonexistent"), None), store,
                       runbooks=agent.runbooks, gateway=BrokenDiagnostics(), clock=agent.clock)
    # the pass raised ZeroDivisionError at the older proposal: the one behind it never ran
    assert broken.run_once() == [f"proposal {ack.id} executed (incident.ack)"]
    clock.ms += 60_000  # past the resend's own deadline: failed, and a person hears of it
    done = broken.run_once()
    assert done[0].startswith(f"proposal {resend.id} failed: verification failed by its "
                              "deadline") and "ZeroDivisionError: a bug" in done[0]
    assert store.proposal(resend.id).state == P.ESCALATED


def test_it_does_not_wait_on_a_gateway_whose_last_will_says_offline(world: Any) -> None:
    agent, store, _clock, gateways = world
    store.append(presence("gw-1", "online", 1, "boot-1", 990_000))
    store.append(presence("gw-1", "offline", 1, "boot-1", 995_000, reason="connection lost"))
    made = agent.propose(_incident(store))
    assert gateways.sent == []  # no ping waiting out its timeout in the agent's loop
    step = made.evidence["diagnose"][0]
    assert step["action"] == "gateway.ping" and "offline" in step["skipped"]
    assert [c["state"] for c in made.evidence["presence_history"]] == ["online", "offline"]


def test_it_proposes_one_action_once_while_it_is_live(world: Any) -> None:
    agent, store, _clock, _gw = world
    incident = _incident(store)
    first = agent.propose(incident).proposal
    again = agent.propose(incident, actor="ana")
    assert again.proposal == first and "already proposed" in again.note
    assert [e.event for e in store.audit_log()] == ["proposed"]
    agent.reject(first.id, by="ana", reason="not now")
    assert agent.propose(incident).proposal.id != first.id  # a new one, once rejected
