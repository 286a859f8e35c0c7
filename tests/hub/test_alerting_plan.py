"""The alerting planners, pure: a snapshot in, actions out; no store, no clock, no broker."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.alerting.evaluate import Transition
from careflow.hub.alerting.mute import Silence
from careflow.hub.alerting.plan import (
    EVALUATION_FAILED_RULE,
    SILENCED_RECHECK_MS,
    Change,
    ChangeSnapshot,
    GroupTiming,
    Open,
    RaiseAgain,
    Remind,
    ReminderSnapshot,
    Reschedule,
    Resolve,
    SetAside,
    Setup,
    Supersede,
    plan_changes,
    plan_failure_alert,
    plan_reminders,
    plan_self_check,
)
from careflow.hub.alerting.routing import Reminder, decide, next_reminder_ms
from careflow.hub.alerting.rules import RuleSet, load_rules
from careflow.hub.alerting.selfwatch import HUB_DEVICE, HUB_GATEWAY
from careflow.hub.store.records import Incident

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


# -- the changes of one step ------------------------------------------------------------------

def fires(rule: str, device: str = "sos", *, at_ms: int = T0, gateway: str = "gw") -> Transition:
    severity = SETUP.rules[rule].severity if rule in SETUP.rules else "warning"
    return Transition(rule, gateway, device, "firing", at_ms, severity, "detail")


def clears(rule: str, device: str = "sos", *, at_ms: int = T0, gateway: str = "gw") -> Transition:
    return replace(fires(rule, device, at_ms=at_ms, gateway=gateway), status="resolved")


def changes(*transitions: Transition, **snapshot: Any) -> tuple[Change | SetAside, ...]:
    return plan_changes(transitions, ChangeSnapshot(**snapshot), SETUP).actions


def test_a_care_alarm_raised_twice_in_one_commit_opens_and_then_raises_that_incident() -> None:
    opened, again = changes(fires("care-alarm"), fires("care-alarm"))
    assert isinstance(opened, Open) and isinstance(again, RaiseAgain)
    assert (opened.expect_new, opened.group_wait_ms, opened.next_due_ms) == (True, 0, T0 + 5 * M)
    assert again.incident == opened.ref < 0 and again.raises == 2
    assert [c for c, _, _ in again.notify] == ["oncall"]
    assert "RAISED AGAIN" in again.notify[0][1] and "raised 2 times" in again.notify[0][2]


def test_an_acknowledged_alarm_raised_twice_is_followed_by_one_incident_raised_again() -> None:
    acked = replace(incident(id_=5), state="acknowledged", acknowledged_by="kari",
                    acknowledged_ms=T0 - M, triggered_ms=T0 - H)
    follows, again = changes(fires("care-alarm"), fires("care-alarm", at_ms=T0 + 1),
                             unresolved={("care-alarm", "gw", "sos"): acked})
    assert isinstance(follows, Supersede) and isinstance(again, RaiseAgain)
    assert (follows.incident, follows.raises, follows.next_due_ms) == (5, 2, T0 + 5 * M)
    assert "acknowledged by kari" in follows.notify[0][2]
    assert (again.incident, again.raises) == (follows.ref, 3)
    assert "acknowledged by" not in again.notify[0][2]  # the new one is open: nobody has it


def test_a_non_critical_change_joins_the_batch_its_group_holds_already() -> None:
    recent = GroupTiming(last_sent_ms=T0 - M, pending_at_ms=None)
    first, second = changes(fires("battery-low", "door-1"), fires("battery-low", "door-2"),
                            groups={("ops", "gw"): recent})
    assert isinstance(first, Open) and isinstance(second, Open)
    assert first.group_wait_ms == second.group_wait_ms == 4 * M  # group_interval after the last
    fresh, joined = changes(fires("battery-low", "door-1"), fires("battery-low", "door-2"),
                            groups={("ops", "gw"): GroupTiming(None, None)})
    assert fresh.group_wait_ms == joined.group_wait_ms == 30 * S  # type: ignore[union-attr]


def test_a_condition_swinging_within_one_step_is_flapping_by_its_third_trigger() -> None:
    key = ("battery-low", "gw", "door")
    actions = changes(fires("battery-low", "door"), clears("battery-low", "door"),
                      fires("battery-low", "door"),
                      triggers={key: (T0 - 10 * M, T0 - 5 * M)},
                      groups={("ops", "gw"): GroupTiming(None, None)})
    assert [type(a) for a in actions] == [Open, Resolve, Open]
    assert [a.muted is not None for a in actions] == [False, True, True]  # type: ignore[union-attr]
    assert all(a.notify == () for a in actions[1:])  # type: ignore[union-attr]
    assert [a.expect_new for a in (actions[0], actions[2])] == [True, True]  # type: ignore[union-attr]


def test_a_change_while_its_incident_is_unresolved_is_not_expected_to_open_one() -> None:
    held = incident("battery-low", device="door", state="acknowledged")
    (action,) = changes(fires("battery-low", "door"),
                        unresolved={("battery-low", "gw", "door"): held},
                        groups={("ops", "gw"): GroupTiming(None, None)})
    assert isinstance(action, Open) and not action.expect_new


def test_it_mutes_what_a_silence_covers_and_what_an_offline_gateway_explains() -> None:
    (silenced,) = changes(fires("battery-low", "door"), silences=(silence(rule="battery-*"),),
                          groups={("ops", "gw"): GroupTiming(None, None)})
    assert isinstance(silenced, Open) and silenced.notify == ()
    assert silenced.muted == "silenced by #7 (maintenance, ola)"
    (inhibited,) = changes(fires("device-silent", "door"), offline=frozenset({"gw"}))
    assert isinstance(inhibited, Open) and inhibited.notify == ()
    assert inhibited.muted == "inhibited: gateway gw is offline"
    (said,) = changes(fires("device-silent", "gw"), gateway_firing={"gw": ("gateway-offline",)})
    assert said.muted == "inhibited: gateway-offline announces gateway gw"  # type: ignore[union-attr]


def test_it_mutes_a_rule_a_person_quieted_but_never_a_critical_one() -> None:
    quieted = {"battery-low": "battery-low muted until ... by ana: x",
               "care-alarm": "care-alarm disabled by x: a row the CLI refuses"}
    muted, alarm, cleared = changes(fires("battery-low", "door"), fires("care-alarm"),
                                    clears("battery-low", "door"), quieted=quieted,
                                    groups={("ops", "gw"): GroupTiming(None, None)})
    assert isinstance(muted, Open) and muted.notify == ()
    assert muted.muted == "rule battery-low muted until ... by ana: x"
    assert isinstance(alarm, Open) and alarm.muted is None and alarm.notify  # announced
    assert isinstance(cleared, Resolve) and cleared.notify == ()


@given(st.dictionaries(st.sampled_from(["care-alarm", "gateway-offline", "battery-low",
                                         "device-silent", "hub-store-failing"]),
                       st.text(max_size=8)))
def test_no_quieted_map_mutes_a_care_alarm_or_a_gateway_offline(quieted: dict[str, str]) -> None:
    alarm, offline = changes(fires("care-alarm"), fires("gateway-offline", "gw"),
                             quieted=quieted)
    for change in (alarm, offline):
        assert isinstance(change, Open) and change.muted is None and change.notify


def test_the_walk_mutes_a_quieted_rules_repeats_and_never_a_critical_step() -> None:
    quieted = {"battery-low": "muted", "care-alarm": "muted"}
    (repeat,) = plan_reminders(ReminderSnapshot(
        now_ms=T0 + 4 * H, due=(incident("battery-low", device="door"),), silences=(),
        quieted=quieted), SETUP)
    assert isinstance(repeat, Remind) and repeat.kind is Reminder.REPEAT
    assert (repeat.channels, repeat.notify) == ((), ())
    (step,) = plan_reminders(ReminderSnapshot(now_ms=T0 + 5 * M, due=(incident(),),
                                              silences=(), quieted=quieted), SETUP)
    assert isinstance(step, Remind) and step.channels == ("oncall",) and step.notify


def test_a_change_a_bug_keeps_from_being_planned_is_set_aside_and_the_rest_go_on() -> None:
    aside, opened = changes(fires("removed-rule", "door"), fires("care-alarm"))
    assert isinstance(aside, SetAside) and isinstance(opened, Open)
    assert aside.what == "gw/door removed-rule firing (not recorded)" and not aside.alarm


def test_the_hub_announces_what_was_set_aside_again_at_once_while_its_alert_is_open() -> None:
    failed = [("gw/poison alert #3", True)]
    (opened,) = plan_failure_alert(failed, ChangeSnapshot(), SETUP, now_ms=T0)
    assert isinstance(opened, Open) and opened.self_alert and opened.gateway == HUB_GATEWAY
    assert "CARE ALARM" in opened.detail and [c for c, _, _ in opened.notify] == ["oncall"]
    key = (EVALUATION_FAILED_RULE, HUB_GATEWAY, HUB_DEVICE)
    (again,) = plan_failure_alert(failed, ChangeSnapshot(unresolved={key: incident(
        EVALUATION_FAILED_RULE, id_=9, gateway=HUB_GATEWAY, device=HUB_DEVICE)}), SETUP,
        now_ms=T0)
    assert isinstance(again, RaiseAgain) and again.incident == 9


def test_the_self_check_opens_once_resolves_when_passed_and_avoids_failing_channels() -> None:
    key = ("hub-broker-down", HUB_GATEWAY, HUB_DEVICE)
    held = {key: incident("hub-broker-down", id_=4, gateway=HUB_GATEWAY, device=HUB_DEVICE)}
    assert plan_self_check({"hub-broker-down": "down"}, (), ChangeSnapshot(unresolved=held),
                           SETUP, now_ms=T0) == ()  # said already
    (resolved,) = plan_self_check({}, (), ChangeSnapshot(unresolved=held), SETUP, now_ms=T0)
    assert resolved == Resolve(rule="hub-broker-down", gateway=HUB_GATEWAY, device=HUB_DEVICE,
                               at_ms=T0, by="careflow (self-check passed)", notify=())
    (failing,) = plan_self_check({"hub-notifications-failing": "oncall: 401"}, (),
                                 ChangeSnapshot(failing={"oncall": "401"}), SETUP, now_ms=T0)
    assert [c for c, _, _ in failing.notify] == ["backup", "ops"]  # type: ignore[union-attr]


_STEP = st.lists(st.tuples(st.sampled_from(["care-alarm", "battery-low", "device-silent"]),
                           st.sampled_from(["a", "b"]), st.booleans()), max_size=10)


@given(step=_STEP, held=st.dictionaries(
    st.tuples(st.sampled_from(["care-alarm", "battery-low", "device-silent"]),
              st.sampled_from(["a", "b"])),
    st.sampled_from(["open", "acknowledged"]), max_size=4),
    silenced=st.booleans(), offline=st.booleans())
def test_each_transition_gets_one_change_consistent_with_what_is_unresolved(
    step: list[tuple[str, str, bool]], held: dict[tuple[str, str], str], silenced: bool,
    offline: bool,
) -> None:
    transitions = [(fires if firing else clears)(rule, device) for rule, device, firing in step]
    unresolved = {(rule, "gw", device): replace(incident(rule, id_=n + 1, device=device),
                                                state=state)
                  for n, ((rule, device), state) in enumerate(sorted(held.items()))}
    actions = plan_changes(transitions, ChangeSnapshot(
        unresolved=unresolved, silences=(silence(),) if silenced else (),
        offline=frozenset({"gw"}) if offline else frozenset(),
        groups={(c, "gw"): GroupTiming(None, None) for c in SETUP.channels}), SETUP).actions
    assert len(actions) == len(transitions)
    model = {key: i.state for key, i in unresolved.items()}  # what is unresolved, as applied
    refs = {i.id for i in unresolved.values()}
    for transition, action in zip(transitions, actions, strict=True):
        assert not isinstance(action, SetAside)
        key = (transition.rule, transition.gateway, transition.device)
        assert (action.rule, action.gateway, action.device) == key
        assert action.muted is None or action.notify == ()
        assert not (silenced and action.notify)  # a silence mutes everything it covers
        if transition.status == "resolved":
            assert isinstance(action, Resolve)
            model.pop(key, None)
            continue
        assert not isinstance(action, Resolve)
        assert action.group_wait_ms == 0 or transition.severity != "critical"  # never held
        if isinstance(action, Open):
            assert action.expect_new == (key not in model)
            assert transition.rule != "care-alarm" or key not in model  # a raise is never lost
            if action.expect_new:
                model[key], refs = "open", refs | {action.ref}
        else:  # a care alarm raised again: of the incident unresolved now
            assert transition.rule == "care-alarm" and action.incident in refs
            assert isinstance(action, Supersede) == (model[key] == "acknowledged")
            if isinstance(action, Supersede):
                model[key], refs = "open", refs | {action.ref}
