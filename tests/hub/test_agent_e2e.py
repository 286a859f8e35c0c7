"""The operations agent end to end (issue 14's acceptance): for gateway offline, device silent,
battery low and error burst, the incident is caused by the fleet simulator (real gateway agents)
against a real Mosquitto and a real hub running the agent's loop; the agent proposes; approved
with `careflow agent approve` it acts and verifies once the cause is gone; with the cause kept in
place its verification fails and the proposal ends escalated (a notification queued for
on-call) with the incident still open; in `auto` it acts without approval; in `off` nothing is
proposed. Then the trail: `careflow agent log --verify` passes, and fails naming the row after
one row is edited in SQLite.

Short rules and runbooks written here keep it fast (verification deadlines of seconds, not the
shipped runbooks' minutes): every gateway is its own simulator, so each fault hits the gateway
the test means.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.simulator import Fault, FleetSimulator
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import Incident, Proposal
from tests.conftest import Mosquitto, RunningHub, careflow_cmd, make_settings, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RULES = """
rules:
  - name: gateway-offline
    kind: absence
    only_gateways: true
    grace: 2
    severity: critical
  - name: device-silent
    kind: absence
    grace: 3
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
    for: 1s
  - name: error-burst
    kind: rate
    type: error
    more_than: 10
    within: 3s
"""
SECTIONS = "\n".join(f"## {name}\n\ntext\n" for name in (
    "Meaning", "Impact", "Diagnosis", "Mitigation", "Verify", "Rollback", "When to escalate"))
WITHIN_S = 10


def _runbook(rule: str) -> str:
    device = "" if rule == "gateway-offline" else ', device: "{{incident.device}}"'
    return f"""---
id: {rule}
title: {rule}
rules: [{rule}]
diagnose:
  - action: device.show
    params: {{gateway: "{{{{incident.gateway}}}}"{device}}}
actions:
  - action: gateway.resend
    params: {{gateway: "{{{{incident.gateway}}}}"}}
    why: ask the gateway for what it has not had confirmed
verify: {{check: incident.resolved, params: {{incident: "{{{{incident.id}}}}"}}, within: {WITHIN_S}s}}
escalate: {{to: oncall, say: send a technician}}
---
{SECTIONS}"""


FAULTS = {"gateway-offline": "outage", "device-silent": "silent", "battery-low": "battery",
          "error-burst": "errors"}


class Scene:
    """One hub with the agent, gateways each in a simulator of its own, and the CLI."""

    def __init__(self, tmp_path: Path, mosquitto: Mosquitto,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        books = tmp_path / "runbooks"
        books.mkdir()
        for rule in FAULTS:
            (books / f"{rule}.md").write_text(_runbook(rule))
        monkeypatch.setenv("CAREFLOW_RUNBOOKS_DIR", str(books))
        (tmp_path / "rules.yaml").write_text(RULES)
        settings = make_settings(tmp_path / "data", mosquitto.url, CAREFLOW_AUTOMATION="auto")
        self.hub = RunningHub(settings, load_rules([tmp_path / "rules.yaml"]),
                              agent=True).start()
        self.store = self.hub.store
        self.broker = parse_broker_url(mosquitto.url)
        self.tmp_path = tmp_path
        self.env = {**os.environ, "CAREFLOW_DATA_DIR": str(settings.data_dir),
                    "CAREFLOW_BROKER_URL": mosquitto.url, "CAREFLOW_AUTOMATION": "auto",
                    "CAREFLOW_RUNBOOKS_DIR": str(books)}
        self.sims: list[tuple[FleetSimulator, threading.Thread]] = []

    def gateway(self, kind: str, index: int) -> FleetSimulator:
        """A gateway with two devices; ``kind``'s fault hits it three seconds in (once its
        devices were heard) and stays until ``fix()``."""
        sim = FleetSimulator(broker=self.broker, gateways=1, devices_per_gateway=2,
                             interval_s=1, keepalive_s=2, prefix=f"{kind[:3]}{index}",
                             faults=(Fault(kind, 1, 3.0, 600.0),),
                             data_dir=self.tmp_path / f"sim-{kind}-{index}")
        runner = threading.Thread(target=sim.run, daemon=True)
        runner.start()
        self.sims.append((sim, runner))
        return sim

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(careflow_cmd(*args), env=self.env, capture_output=True,
                              text=True, timeout=60, check=False)
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def incident(self, rule: str, sim: FleetSimulator) -> Incident:
        gateway = sim.gateways[0].agent.config.gateway
        found: list[Incident] = []

        def opened() -> bool:
            found[:] = [i for i in self.store.incidents(states=("open", "acknowledged"))
                        if i.rule == rule and i.gateway == gateway]
            return bool(found)

        wait_until(opened, timeout_s=20, what=f"{rule} at {gateway}")
        return found[0]

    def proposal(self, incident: Incident, *states: str) -> Proposal:
        found: list[Proposal] = []

        def made() -> bool:
            found[:] = [p for p in self.store.proposals(incident_id=incident.id)
                        if not states or p.state in states]
            return bool(found)

        try:
            wait_until(made, timeout_s=30, what=f"a {'/'.join(states) or ''} proposal for "
                       f"incident {incident.id} ({incident.rule})")
        except BaseException:
            seen = [(p.id, p.state, p.reason) for p in
                    self.store.proposals(incident_id=incident.id)]
            pytest.fail(f"no {states} proposal for incident {incident.id}: {seen}; the "
                        f"incident: {self.store.incident(incident.id)}")
        return found[0]

    def close(self) -> None:
        for sim, _ in self.sims:
            sim.stop()
        for _, runner in self.sims:
            runner.join(timeout=20)
        self.hub.stop()


@pytest.fixture
def scene(tmp_path: Path, mosquitto: Mosquitto,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    made = Scene(tmp_path, mosquitto, monkeypatch)
    yield made
    made.close()


def _gateway_of(sim: FleetSimulator) -> str:
    return sim.gateways[0].agent.config.gateway


def _online(scene: Scene, sim: FleetSimulator) -> bool:
    presence = scene.store.presence().get(_gateway_of(sim))
    return presence is not None and presence.state == "online"


def test_it_proposes_acts_verifies_escalates_and_proposes_nothing_when_off(
        scene: Scene) -> None:
    """Each kind at once on gateways of its own: manual (one fixed, one kept), auto, off."""
    fixed = {rule: scene.gateway(fault, 0) for rule, fault in FAULTS.items()}
    kept = {rule: scene.gateway(fault, 1) for rule, fault in FAULTS.items()}
    fixed_incidents = {rule: scene.incident(rule, sim) for rule, sim in fixed.items()}
    kept_incidents = {rule: scene.incident(rule, sim) for rule, sim in kept.items()}
    # manual (the default): each proposal waits for a person
    proposals = [scene.proposal(incident) for incident in (*fixed_incidents.values(),
                                                           *kept_incidents.values())]
    for proposal in proposals:
        assert (proposal.state, proposal.action) == ("pending", "gateway.resend")
        assert {"recent_events", "device_state", "presence_history", "related_incidents",
                "diagnose"} <= set(proposal.evidence)
    for sim in fixed.values():
        sim.fix()  # a technician came to these
    for sim in fixed.values():
        wait_until(lambda sim=sim: _online(scene, sim), what=f"{_gateway_of(sim)} online")
    for proposal in proposals:
        approved = json.loads(scene.cli("agent", "approve", str(proposal.id), "--by", "ana",
                                        "--json").stdout)
        assert (approved["state"], approved["decided_by"]) == ("approved", "ana")

    # auto, while those run: the agent acts without approval
    scene.cli("agent", "mode", "auto", "--by", "ana", "--reason", "night shift")
    auto = {rule: scene.gateway(fault, 2) for rule, fault in FAULTS.items()}

    for rule, incident in fixed_incidents.items():
        verified = scene.proposal(incident, "verified")
        assert verified.executed_ms is not None, rule
    for rule, incident in kept_incidents.items():
        escalated = scene.proposal(incident, "escalated")
        assert escalated.reason, rule
        still = scene.store.incident(incident.id)
        assert still is not None and still.state == "open", rule
    notes = [n for n in scene.store.notifications() if n.kind == "escalation"]
    for incident in kept_incidents.values():
        assert any(n.channel == "oncall" and f"incident {incident.id} " in n.title
                   for n in notes), incident

    auto_incidents = {}
    for rule, sim in auto.items():
        auto_incidents[rule] = scene.incident(rule, sim)
        if rule != "gateway-offline":  # a cut gateway cannot be asked anything: escalated
            sim.fix()  # at once: the loop proposes and acts within a pass, verifies after
    for rule, incident in auto_incidents.items():
        acted = scene.proposal(incident, "approved", "executed", "verified", "failed",
                               "escalated")
        assert acted.decided_by == "careflow-agent (auto mode)", rule
    for rule, incident in auto_incidents.items():
        scene.proposal(incident, "escalated" if rule == "gateway-offline" else "verified")

    # off: nothing is proposed
    scene.cli("agent", "mode", "off", "--by", "ana", "--reason", "storm")
    off = {rule: scene.gateway(fault, 3) for rule, fault in FAULTS.items()}
    off_incidents = [scene.incident(rule, sim) for rule, sim in off.items()]
    scene.cli("agent", "run", "--once")  # a pass by hand too, besides the hub's loop
    listed = [json.loads(line)["incident_id"]
              for line in scene.cli("agent", "list", "--json").stdout.splitlines()]
    for incident in off_incidents:
        assert incident.id not in listed
        assert scene.store.proposals(incident_id=incident.id) == []
    assert "the audit chain holds" in scene.cli("agent", "log", "--verify").stderr


def test_it_refuses_and_audits_and_its_log_names_an_edited_row(scene: Scene) -> None:
    sim = scene.gateway("silent", 0)
    incident = scene.incident("device-silent", sim)
    proposal = scene.proposal(incident)
    capped = {**scene.env, "CAREFLOW_AUTOMATION": "manual"}
    above = subprocess.run(careflow_cmd("agent", "mode", "auto", "--by", "bo", "--reason",
                                        "night"), env=capped, capture_output=True, text=True,
                           timeout=60, check=False)
    assert above.returncode == 1 and "above CAREFLOW_AUTOMATION=manual" in above.stderr
    scene.cli("agent", "mode", "manual", "--by", "bo", "--reason", "day")
    scene.cli("agent", "reject", str(proposal.id), "--by", "bo", "--reason", "see below")
    short = scene.cli("agent", "propose", str(incident.id), "--expires", "1s", "--json")
    stale = json.loads(short.stdout)["proposal"]["id"]
    wait_until(lambda: getattr(scene.store.proposal(stale), "state", None) == "expired",
               what="the short proposal expired")
    late = scene.cli("agent", "approve", str(stale), "--by", "ana", ok=False)
    assert late.returncode == 1 and "is expired" in late.stderr
    log = [json.loads(line) for line in scene.cli("agent", "log", "--json").stdout.splitlines()]
    refusals = [row for row in log if row["event"] == "refused"]
    assert [r["actor"] for r in refusals] == ["bo", "ana"]
    assert scene.cli("agent", "log", "--verify").returncode == 0
    assert proposal.id != stale

    edited = log[len(log) // 2]["pos"]
    with sqlite3.connect(scene.hub.settings.db_path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE pos = ?", (edited,))
    broken = scene.cli("agent", "log", "--verify", ok=False)
    assert broken.returncode == 1
    assert f"audit row {edited} " in broken.stderr and "edited" in broken.stderr

