"""The alerting planners, pure: a snapshot in, actions out; no store, no clock, no broker."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.alerting.mute import Silence
from careflow.hub.alerting.plan import (
    SILENCED_RECHECK_MS,
    Remind,
    ReminderSnapshot,
    Reschedule,
    Setup,
    plan_reminders,
)
from careflow.hub.alerting.routing import Reminder, decide, next_reminder_ms
from careflow.hub.alerting.rules import RuleSet, load_rules
from careflow.hub.store.interface import Incident

T0 = 1_800_000_000_000
S, M, H = 1_000, 60_000, 3_600_000
RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    severity: critical
    where: {state: raised}
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
  - name: gateway-offline
    kind: absence
    only_gateways: true
    severity: critical
  - name: device-silent
    kind: absence
escalation:
  - severity: critical
    steps:
      - after: 5m
        channels: [oncall]
      - after: 10m
        channels: [backup]
"""


def ruleset(text: str) -> RuleSet:
    """Rules from YAML text, as the hub loads them from a file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(text)
        return load_rules([path])


def setup_of(rules: RuleSet, channels: tuple[str, ...] = ("oncall", "ops", "backup")) -> Setup:
    """The planners' view of a stage with these rules and channels (no sites, no kinds)."""
    return Setup(
        rules={rule.name: rule for rule in rules.rules}, escalation=rules.escalation,
        routing=rules.routing, channels=channels, group_wait_ms=rules.routing.group_wait,
        runbook_url=None,
        decide=lambda rule, severity, gateway, device: decide(
            rules.routing, {"severity": severity, "rule": rule, "gateway": gateway,
                            "device": device, "site": "unassigned", "kind": ""},
            rules.escalation))


SETUP = setup_of(ruleset(RULES))


def incident(rule: str = "care-alarm", *, id_: int = 1, gateway: str = "gw", device: str = "sos",
             state: str = "open", sent: int = 0, triggered_ms: int = T0) -> Incident:
    severity = {"care-alarm": "critical", "gateway-offline": "critical"}.get(rule, "warning")
    return Incident(id_, rule, gateway, device, severity, state, f"{rule} on {device}",
                    "detail", triggered_ms, None, None, None, None, escalation_sent=sent)


def silence(*, rule: str = "*", gateway: str = "*", device: str = "*",
            ends_ms: int = T0 + 10 * H) -> Silence:
    return Silence(7, gateway, device, rule, T0 - H, ends_ms, "ola", "maintenance")


def walk(*due: Incident, now_ms: int, silences: tuple[Silence, ...] = (),
         offline: frozenset[str] = frozenset(),
         firing: dict[str, tuple[str, ...]] | None = None) -> tuple[Remind | Reschedule, ...]:
    return plan_reminders(ReminderSnapshot(now_ms=now_ms, due=due, silences=silences,
                                           offline=offline, gateway_firing=firing or {}),
                          SETUP)


def test_it_looks_again_when_the_next_step_is_due_if_none_is_due_yet() -> None:
    (action,) = walk(incident(), now_ms=T0 + 4 * M)
    assert action == Reschedule(incident_id=1, next_due_ms=T0 + 5 * M)


def test_it_never_reminds_about_an_incident_no_longer_open() -> None:
    for state in ("acknowledged", "resolved"):
        assert walk(incident(state=state), now_ms=T0 + H) == (
            Reschedule(incident_id=1, next_due_ms=None),)


@pytest.mark.parametrize(("sent", "channels", "after"), [
    (0, ("oncall",), T0 + 10 * M),  # the first step; the second is due at 10 min
    (1, ("backup",), T0 + 10 * M + 4 * H),  # the last step; then repeats every 4 h
])
def test_it_sends_each_escalation_step_to_its_own_channels(
    sent: int, channels: tuple[str, ...], after: int,
) -> None:
    (action,) = walk(incident(sent=sent), now_ms=T0 + 10 * M)
    assert isinstance(action, Remind)
    assert (action.kind, action.sent_before, action.channels, action.group_key,
            action.next_due_ms) == (Reminder.ESCALATE, sent, channels, "", after)
    assert [channel for channel, _, _ in action.notify] == list(channels)
    assert all(title.startswith("[CRITICAL] NOT ACKNOWLEDGED") for _, title, _ in action.notify)


def test_a_silenced_escalation_step_waits_for_the_silence_and_looks_again_soon() -> None:
    now = T0 + 5 * M
    (action,) = walk(incident(), now_ms=now, silences=(silence(),))
    assert action == Reschedule(incident_id=1, next_due_ms=now + SILENCED_RECHECK_MS)
    (ending,) = walk(incident(), now_ms=now, silences=(silence(ends_ms=now + 2 * S),))
    assert ending == Reschedule(incident_id=1, next_due_ms=now + 2 * S)


def test_it_repeats_an_open_incident_to_its_route_one_message_per_gateway() -> None:
    (action,) = walk(incident("battery-low", device="door"), now_ms=T0 + 4 * H)
    assert isinstance(action, Remind)
    assert (action.kind, action.channels, action.group_key, action.next_due_ms) == (
        Reminder.REPEAT, ("ops",), "gw", T0 + 8 * H)
    assert action.notify[0][1].startswith("[WARNING] STILL OPEN, NOT ACKNOWLEDGED")


@pytest.mark.parametrize("why", ["silenced", "inhibited", "skipped"])
def test_a_repeat_silenced_inhibited_or_missed_is_counted_and_sends_nothing(why: str) -> None:
    now = T0 + (8 * H if why == "skipped" else 4 * H)  # two slots passed: the first is skipped
    (action,) = walk(incident("device-silent", device="door"), now_ms=now,
                     silences=(silence(rule="device-*"),) if why == "silenced" else (),
                     offline=frozenset({"gw"}) if why == "inhibited" else frozenset())
    assert isinstance(action, Remind)
    assert action.kind is (Reminder.SKIP if why == "skipped" else Reminder.REPEAT)
    assert (action.channels, action.notify, action.sent_before) == ((), (), 0)


def test_a_gateways_own_silence_is_not_repeated_while_its_gateway_rule_fires() -> None:
    (action,) = walk(incident("device-silent", device="gw"), now_ms=T0 + 4 * H,
                     firing={"gw": ("gateway-offline",)})
    assert isinstance(action, Remind) and action.notify == ()


def test_a_repeat_goes_only_to_configured_channels() -> None:
    setup = setup_of(ruleset(RULES), channels=("oncall",))
    (action,) = plan_reminders(ReminderSnapshot(
        now_ms=T0 + 4 * H, due=(incident("battery-low", device="door"),), silences=()), setup)
    assert isinstance(action, Remind)
    assert action.channels == ("ops",) and action.notify == ()


incidents = st.builds(
    incident, st.sampled_from(["care-alarm", "battery-low", "device-silent", "removed-rule"]),
    id_=st.integers(1, 10**6), device=st.sampled_from(["gw", "door"]),
    state=st.sampled_from(["open", "open", "acknowledged", "resolved"]),
    sent=st.integers(0, 6), triggered_ms=st.integers(T0 - 10 * H, T0))


@given(due=st.lists(incidents, max_size=8), elapsed=st.integers(0, 20 * H),
       silenced=st.booleans(), offline=st.booleans())
def test_every_due_incident_gets_one_action_in_order_and_none_is_left_due(
    due: list[Incident], elapsed: int, silenced: bool, offline: bool,
) -> None:
    now = T0 + elapsed
    actions = walk(*due, now_ms=now, silences=(silence(ends_ms=now + H),) if silenced else (),
                   offline=frozenset({"gw"}) if offline else frozenset())
    assert [a.incident_id for a in actions] == [i.id for i in due]
    for item, action in zip(due, actions, strict=True):
        if isinstance(action, Reschedule):  # looked at again later, never spun on this tick
            assert action.next_due_ms is None or action.next_due_ms > now
            continue
        assert item.state == "open" and action.sent_before == item.escalation_sent
        if action.kind is not Reminder.ESCALATE:  # a repeat: muted, or to its route
            assert not (silenced and action.notify)
            assert {c for c, _, _ in action.notify} <= set(SETUP.channels)
        steps = SETUP.escalation["critical"] if item.severity == "critical" else ()
        assert action.next_due_ms == next_reminder_ms(
            tuple(s.after for s in steps), sent=item.escalation_sent + 1, state="open",
            triggered_ms=item.triggered_ms, repeat_interval_ms=4 * H)
