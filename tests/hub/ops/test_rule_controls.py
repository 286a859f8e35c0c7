"""Which rules a person may quiet, what is in force, and which silences are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.ops.rule_controls import (
    MAX_MUTE_MS,
    describe,
    in_force,
    mute_refusal,
    quiet_refusal,
    silence_refusal,
)
from careflow.hub.store.records import RuleControl, RuleControlKind

RULES = Path(__file__).resolve().parents[3] / "rules"
SHIPPED = {rule.name: rule.severity for rule in load_rules([RULES]).rules}
M, D = RuleControlKind.MUTED, RuleControlKind.DISABLED


def _control(rule: str, kind: RuleControlKind = M, until_ms: int | None = 1_000,
             at_ms: int = 0) -> RuleControl:
    return RuleControl(rule, kind, until_ms, "ana", "noisy", at_ms)


@pytest.mark.parametrize("rule", [*sorted(n for n, s in SHIPPED.items() if s == "critical"),
                                  *SELF_RULES])
def test_it_never_quiets_a_critical_rule_nor_the_hubs_own(rule: str) -> None:
    assert quiet_refusal(rule, SHIPPED.get(rule, SELF_RULES.get(rule))) is not None


def test_it_quiets_the_shipped_warnings_only() -> None:
    allowed = {rule for rule, severity in SHIPPED.items() if quiet_refusal(rule, severity) is None}
    assert allowed == {"device-silent", "battery-low", "error-burst"}


@given(st.sampled_from(["info", "warning", "critical"]))
def test_a_care_alarm_is_never_quieted_whatever_severity_a_rules_file_gives_it(
        severity: str) -> None:
    for rule in ("care-alarm", "refused-care-alarm", "hub-anything"):
        refusal = quiet_refusal(rule, severity)
        assert refusal is not None and rule in refusal


def test_it_refuses_a_rule_that_is_not_loaded() -> None:
    assert "careflow rules list" in (quiet_refusal("batery-low", None) or "")


@pytest.mark.parametrize(("duration_ms", "refused"), [
    (None, True), (0, True), (-1, True), (1, False), (MAX_MUTE_MS, False),
    (MAX_MUTE_MS + 1, True)])
def test_a_mute_must_end_within_a_week(duration_ms: int | None, refused: bool) -> None:
    assert (mute_refusal(duration_ms) is not None) == refused


def test_a_mute_is_in_force_until_it_ends_a_disable_until_enabled() -> None:
    controls = [_control("battery-low", until_ms=1_000), _control("error-burst", D, None)]
    now = in_force(controls, SHIPPED, 999)
    assert set(now.muted) == {"battery-low"} and set(now.disabled) == {"error-burst"}
    assert now.quieted("battery-low") == controls[0] and now.quieted("device-silent") is None
    later = in_force(controls, SHIPPED, 1_000)
    assert not later.muted and set(later.disabled) == {"error-burst"} and later
    assert not in_force([], SHIPPED, 0)


@given(rule=st.sampled_from([*SHIPPED, *SELF_RULES]), kind=st.sampled_from([M, D]),
       until=st.none() | st.integers(-10**12, 10**12), now=st.integers(0, 10**12))
def test_a_stored_control_never_quiets_what_may_not_be_quieted(
        rule: str, kind: RuleControlKind, until: int | None, now: int) -> None:
    """A row written behind careflow's back (or a rule made critical since) is ignored."""
    severities = {**SHIPPED, **SELF_RULES}
    quieted = in_force([_control(rule, kind, until)], severities, now).quieted(rule)
    if quiet_refusal(rule, severities[rule]) is not None:
        assert quieted is None
    if quieted is not None and kind is M:
        assert until is not None and now < until and now < MAX_MUTE_MS


def test_a_stored_mute_without_an_end_or_too_long_is_over() -> None:
    assert not in_force([_control("battery-low", until_ms=None)], SHIPPED, 0)
    forever = _control("battery-low", until_ms=10**15, at_ms=5)
    assert in_force([forever], SHIPPED, 5 + MAX_MUTE_MS - 1).muted
    assert not in_force([forever], SHIPPED, 5 + MAX_MUTE_MS)
    assert not in_force([_control("no-such-rule")], SHIPPED, 0)


def test_it_describes_a_control_for_people() -> None:
    assert describe(_control("battery-low"), iso="2026-11-30T14:00:00Z") == (
        "battery-low muted until 2026-11-30T14:00:00Z by ana: noisy")
    assert describe(_control("error-burst", D, None)) == "error-burst disabled by ana: noisy"


@pytest.mark.parametrize(("gateway", "rule", "refused"), [
    ("*", "care-alarm", True), ("*", "*", True), ("gw-*", "care-*", True),
    ("gw-00?1", "*alarm", True), ("*", "hub-*", True), ("*", "gateway-offline", True),
    ("[g]w-1", "care-alarm", True),
    ("gw-0001", "care-alarm", False), ("gw-0001", "*", False),
    ("*", "battery-*", False), ("*", "battery-low", False), ("*", "error-burst", False)])
def test_a_silence_of_a_critical_rule_must_name_one_gateway(gateway: str, rule: str,
                                                           refused: bool) -> None:
    refusal = silence_refusal(gateway=gateway, rule=rule, severities=SHIPPED)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert "name one gateway" in refusal
