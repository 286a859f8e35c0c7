"""The action registry: parameters that can only name what they mean, and each action against a
real store (the gateway round trips are in test_actions_gateway.py, against Mosquitto)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.core.clock import now_ms
from careflow.core.errors import BrokerError, RefusedError
from careflow.edge.commands import ALLOWED
from careflow.hub.ops import actions
from careflow.hub.ops.actions import (
    CHECKS,
    REGISTRY,
    ActionContext,
    Risk,
    command_line,
    execute,
    validate_params,
    verify,
)
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.provisioning.pki import init_pki
from tests.conftest import make_settings, store_event

NOW = 1_800_000_000_000
SHELL = ";|&$`<>(){}[]*?!~#'\"\\\n\r\t /"


class NoGateway:
    """No gateway is reachable here: the gateway round trips are tested against Mosquitto."""

    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        raise BrokerError(f"no reply from {gateway}")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ctx(tmp_path: Path, clock: Clock) -> ActionContext:
    store = SqliteStore(tmp_path / "db")
    return ActionContext(store=store, settings=make_settings(tmp_path, None), gateway=NoGateway(),
                         clock=clock, sleep=clock.sleep, pki_dir=tmp_path / "pki")


def _fleet(ctx: ActionContext, stamper: Any) -> None:
    store = ctx.store
    assert isinstance(store, SqliteStore)
    store_event(store, stamper("gw-1"), "heartbeat", {"interval_s": 60}, NOW - 5_000)
    store_event(store, stamper("gw-1", "fall-1"), "status", {"state": "ok", "battery_pct": 12},
                NOW - 4_000)


# -- parameters ------------------------------------------------------------------------------


@given(st.text(min_size=1).filter(lambda text: any(char in SHELL for char in text)))
def test_it_never_takes_a_string_with_shell_metacharacters_as_an_id(text: str) -> None:
    for name, action in REGISTRY.items():
        if "gateway" in action.params["properties"]:
            with pytest.raises(RefusedError, match="gateway"):
                validate_params(name, {"gateway": text, "incident": 1, "for": "1h",
                                       "reason": "x", "rule": "r", "serial": "s", "site": "s"})


@pytest.mark.parametrize("text", ["gw;rm -rf /", "gw-1\n", "gw 1", "$(reboot)", "gw-1`id`", ""])
def test_it_refuses_the_classic_injections(text: str) -> None:
    with pytest.raises(RefusedError, match="does not match"):
        validate_params("gateway.restart-agent", {"gateway": text})


def test_it_takes_the_contracts_ids() -> None:
    assert validate_params("device.show", {"gateway": "gw-0001", "device": "fall_1.a"}) == {
        "gateway": "gw-0001", "device": "fall_1.a"}


def test_it_refuses_an_unknown_action_or_parameter() -> None:
    with pytest.raises(RefusedError, match=r"no action .gateway\.reboot.*gateway\.ping"):
        validate_params("gateway.reboot", {"gateway": "gw-1"})
    with pytest.raises(RefusedError, match="'shell' was unexpected"):
        validate_params("gateway.ping", {"gateway": "gw-1", "shell": "ls"})
    with pytest.raises(RefusedError, match="'gateway' is a required property"):
        validate_params("gateway.ping", {})


def test_every_action_declares_what_the_agent_needs() -> None:
    for name, action in REGISTRY.items():
        assert action.name == name and action.summary
        assert action.params["type"] == "object" and action.params["additionalProperties"] is False
        if action.risk is Risk.READ:
            assert action.auto and action.verification is None and action.undo is None, name
        else:
            assert action.never_automated or action.verification is not None, name
        if action.never_automated:
            assert not action.auto, name
    assert {n for n, a in REGISTRY.items() if a.never_automated} == {
        "device.revoke", "provision.replace", "replay.influx"}
    assert {n for n, a in REGISTRY.items() if a.risk is Risk.READ} >= {
        "hub.status", "device.show", "event.query", "gateway.ping", "gateway.diagnostics",
        "ca.status", "notify.list"}
    assert {n for n, a in REGISTRY.items() if a.risk is Risk.WRITE} >= {
        "gateway.resend", "gateway.restart-agent", "devices.pause", "rules.mute", "incident.ack"}
    # a person decides whether to quiet anything or to say "I have it"
    assert not any(REGISTRY[n].auto for n in ("devices.pause", "rules.mute", "incident.ack"))


def test_it_shows_each_action_as_the_careflow_command_a_person_would_run() -> None:
    assert command_line("devices.pause", {"gateway": "gw-1", "for": "2h", "reason": "visit"}) == [
        "careflow", "devices", "pause", "gw-1", "--for", "2h", "--reason", "visit", "--json"]
    assert command_line("gateway.resend", {"gateway": "gw-1", "device": "d-1", "from_seq": 3}) == [
        "careflow", "gateway", "cmd", "gw-1", "resend", "--arg=device=d-1", "--arg=from_seq=3",
        "--json"]


def test_it_never_runs_an_action_only_a_person_may_run(ctx: ActionContext) -> None:
    with pytest.raises(RefusedError, match=re.escape(
            "device.revoke is never automated: a person runs `careflow devices revoke gw-1")):
        execute(ctx, "device.revoke", {"gateway": "gw-1"})


# -- reads -----------------------------------------------------------------------------------


def test_it_reads_the_hubs_health(ctx: ActionContext, clock: Clock) -> None:
    clock.now = now_ms()  # the store stamps its health report with the wall clock
    report = execute(ctx, "hub.status", {})
    assert report["running"] is False and report["healthy"] is False
    ctx.store.write_health({"connected": True, "alert_lag_ms": 12})
    report = execute(ctx, "hub.status", {})
    assert report["running"] is True and report["healthy"] is True
    assert report["alert_lag_ms"] == 12 and report["incidents_active"] == 0


def test_it_shows_a_device_and_queries_its_events(ctx: ActionContext, stamper: Any) -> None:
    _fleet(ctx, stamper)
    shown = execute(ctx, "device.show", {"gateway": "gw-1", "device": "fall-1"})
    assert shown["known"] is True and shown["facts"]["battery_pct"] == 12
    assert shown["state"] == "online" and shown["last_type"] == "status"
    assert execute(ctx, "device.show", {"gateway": "gw-9"})["known"] is False
    found = execute(ctx, "event.query", {"gateway": "gw-1", "since": "1m"})["events"]
    assert [e["device"] for e in found] == ["fall-1", "gw-1"]
    assert execute(ctx, "event.query", {"gateway": "gw-1", "type": "status", "since": "1m"}
                   )["events"][0]["data"]["battery_pct"] == 12


def test_it_shows_an_incident_and_the_outbox(ctx: ActionContext) -> None:
    incident = ctx.store.open_incident(rule="battery-low", gateway="gw-1", device="fall-1",
                                       severity="warning", summary="low", detail="",
                                       at_ms=NOW)
    assert incident is not None
    shown = execute(ctx, "incident.show", {"incident": incident})
    assert shown["rule"] == "battery-low" and shown["state"] == "open"
    with pytest.raises(RefusedError, match="no incident 99"):
        execute(ctx, "incident.show", {"incident": 99})
    assert execute(ctx, "notify.list", {"state": "failed"}) == {"notifications": []}


def test_it_reads_the_pki_and_says_when_there_is_none(ctx: ActionContext) -> None:
    status = execute(ctx, "ca.status", {})
    assert status["configured"] is False and status["warnings"]
    assert ctx.pki_dir is not None
    init_pki(ctx.pki_dir, now=datetime.fromtimestamp(NOW / 1000, tz=UTC))
    status = execute(ctx, "ca.status", {})
    assert status["configured"] is True and status["warnings"] == []
    assert {f["file"] for f in status["files"]} >= {"claim-ca.crt", "device-ca.crt"}


# -- writes, their verification and rollback -------------------------------------------------


def test_it_pauses_verifies_and_rolls_back(ctx: ActionContext, stamper: Any) -> None:
    _fleet(ctx, stamper)
    params = {"gateway": "gw-1", "device": "fall-1", "for": "30m", "reason": "battery change"}
    assert verify(ctx, "devices.pause", params, started_ms=NOW).ok is False  # not yet
    done = execute(ctx, "devices.pause", params)
    assert done["paused"] is True
    assert verify(ctx, "devices.pause", params, started_ms=NOW).ok is True
    assert actions.rollback(ctx, "devices.pause", params)["resumed"] is True
    assert verify(ctx, "devices.pause", params, started_ms=NOW).ok is False
    with pytest.raises(RefusedError, match="not known"):
        execute(ctx, "devices.pause", {**params, "gateway": "gw-9"})


def test_it_waits_for_a_verification_until_its_deadline(ctx: ActionContext,
                                                        clock: Clock) -> None:
    check = verify(ctx, "devices.pause", {"gateway": "gw-1", "for": "1h", "reason": "x"},
                   started_ms=NOW)
    assert check.ok is False and clock.now - NOW >= 5_000  # polled until the 5 s deadline


def test_it_acknowledges_an_open_incident_once(ctx: ActionContext) -> None:
    incident = ctx.store.open_incident(rule="device-silent", gateway="gw-1", device="fall-1",
                                       severity="warning", summary="silent", detail="", at_ms=NOW)
    params = {"incident": incident, "by": "nurse-kari"}
    assert execute(ctx, "incident.ack", params)["state"] == "acknowledged"
    assert verify(ctx, "incident.ack", params, started_ms=NOW).ok is True
    assert [a.via for a in ctx.store.incident_actions(incident or 0)] == ["agent"]
    with pytest.raises(RefusedError, match="is acknowledged, not open"):
        execute(ctx, "incident.ack", params)


def test_it_mutes_a_noisy_rule_and_never_a_care_alarm(ctx: ActionContext) -> None:
    params = {"rule": "error-burst", "for": "4h", "reason": "firmware bug, vendor informed"}
    assert execute(ctx, "rules.mute", params)["kind"] == "muted"
    assert verify(ctx, "rules.mute", params, started_ms=NOW).ok is True
    assert actions.rollback(ctx, "rules.mute", params) == {"rule": "error-burst", "unmuted": True}
    assert [(a.event, a.subject) for a in ctx.store.audit_log()] == [
        ("rule.muted", "rule error-burst")]
    for rule in ("care-alarm", "gateway-offline", "hub-alerts-lagging"):
        with pytest.raises(RefusedError, match="never muted"):
            execute(ctx, "rules.mute", {**params, "rule": rule})
    with pytest.raises(RefusedError, match="at most 7 days"):
        execute(ctx, "rules.mute", {**params, "for": "8d"})
    with pytest.raises(RefusedError, match="no rule 'no-such-rule'"):
        execute(ctx, "rules.mute", {**params, "rule": "no-such-rule"})
    assert ctx.store.rule_controls() == []


def test_it_has_no_rollback_where_none_exists(ctx: ActionContext) -> None:
    with pytest.raises(RefusedError, match=r"incident\.ack has no rollback"):
        actions.rollback(ctx, "incident.ack", {"incident": 1})


def test_a_runbook_check_polls_until_it_holds(ctx: ActionContext, stamper: Any) -> None:
    assert set(CHECKS) >= {"incident.resolved", "gateway.online", "device.heard", "hub.healthy"}
    _fleet(ctx, stamper)
    heard = actions.await_check(ctx, "device.heard", {"gateway": "gw-1", "device": "fall-1"},
                                started_ms=NOW - 10_000, deadline_s=1)
    assert heard.ok is True
    late = actions.await_check(ctx, "device.heard", {"gateway": "gw-1", "device": "fall-1"},
                               started_ms=NOW, deadline_s=1)
    assert late.ok is False
    with pytest.raises(RefusedError, match="does not match"):
        actions.run_check(ctx, "gateway.online", {"gateway": "gw;ls"}, started_ms=NOW)


def test_the_gateway_commands_it_sends_are_the_ones_gateways_allow() -> None:
    sent = {"ping", "diagnostics", "resend", "restart-agent"}
    names = {argv[4] for name, action in REGISTRY.items() if name.startswith("gateway.")
             for argv in [action.command({"gateway": "gw-1"})]}
    assert names == sent and sent <= set(ALLOWED)


def test_a_rollback_unmutes_only_a_mute(ctx: ActionContext) -> None:
    ctx.store.set_rule_control("error-burst", kind="disabled", until_ms=None, by="kari",
                               reason="broken sensor model", at_ms=NOW)
    assert actions.rollback(ctx, "rules.mute", {"rule": "error-burst", "for": "1h",
                                                "reason": "x"})["unmuted"] is False
    assert [c.kind for c in ctx.store.rule_controls()] == ["disabled"]


def test_it_judges_a_clock_by_an_event_sent_since_the_action(ctx: ActionContext,
                                                              stamper: Any) -> None:
    _fleet(ctx, stamper)
    params = {"gateway": "gw-1"}
    assert actions.run_check(ctx, "clock.in_sync", params, started_ms=NOW).ok is False
    assert actions.run_check(ctx, "clock.in_sync", params, started_ms=NOW - 10_000).ok is True
