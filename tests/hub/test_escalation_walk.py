"""The escalation walk and the hub's self-checks see every open incident, however many.

Escalation used to walk only the newest 10,000 open incidents, and the self-check only the
newest 50: a gateway that opened many incidents could stop an older care alarm's escalation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from careflow.core.errors import StoreError
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import REMIND_PER_TICK, RETRY_INTERVAL_MS, AlertStage
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.routing import next_reminder_ms, reminder_due
from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.selfwatch import HUB_DEVICE, HUB_GATEWAY
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import UNREACHABLE_CHANNELS, alert_stage
from tests.hub.conftest import batch_of

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
escalation:
  - severity: critical
    steps:
      - after: 5m
        channels: [oncall]
"""
T0 = 1_800_000_000_000
MINUTE = 60_000


@given(steps=st.lists(st.integers(0, 50_000), max_size=4).map(lambda s: tuple(sorted(s))),
       state=st.sampled_from(["open", "acknowledged", "resolved"]), sent=st.integers(0, 8),
       repeat=st.integers(0, 30_000), triggered=st.integers(-10**6, 10**6),
       now=st.integers(-10**6, 10**6))
def test_the_stored_due_time_is_exactly_when_a_reminder_becomes_due(
    steps: tuple[int, ...], state: str, sent: int, repeat: int, triggered: int, now: int,
) -> None:
    due_at = next_reminder_ms(steps, sent=sent, state=state, triggered_ms=triggered,
                              repeat_interval_ms=repeat)
    due = reminder_due(steps, sent=sent, state=state, triggered_ms=triggered, now_ms=now,
                       repeat_interval_ms=repeat)
    assert (due is not None) == (due_at is not None and now >= due_at)


def _open_many(store: SqliteStore, count: int, at_ms: int, *, due_after_ms: int = 0) -> None:
    """Newer open incidents, fast, straight through the store; due ``due_after_ms`` after
    opening (0: due at once, never looked at)."""
    for n in range(count):
        store.open_incident(rule="battery-low", gateway=f"gw-{n // 1000}", device=f"d-{n}",
                            severity="warning", summary="battery", detail="5", at_ms=at_ms + n,
                            next_due_ms=at_ms + n + due_after_ms if due_after_ms else 0)


def test_an_older_care_alarm_escalates_behind_ten_thousand_newer_open_incidents(
    tmp_path: Path,
) -> None:
    store, stage = alert_stage(tmp_path, RULES, synchronous="normal")
    button = Stamper(gateway="gw-care", device="sos-1")
    stored = store.append(batch_of([button.stamp("alert", {"kind": "sos", "state": "raised"})],
                                   received_ms=T0))
    stage.handle(stored.stored, now_ms=T0)
    stage.tick(T0 + 1)  # looked at once: due again at its first step
    # as the stage opens them: a warning without a policy is due at its repeat, 4 h on
    _open_many(store, 10_001, T0 + MINUTE, due_after_ms=240 * MINUTE)

    stage.tick(T0 + 5 * MINUTE)
    (alarm,) = [i for i in store.incidents(states=("open",), limit=20_000)
                if i.rule == "care-alarm"]
    assert alarm.escalation_sent == 1
    escalations = [n for n in store.notifications(limit=20_000) if n.kind == "escalation"]
    assert [(n.incident_id, n.channel) for n in escalations] == [(alarm.id, "oncall")]


def test_more_due_than_one_tick_takes_are_all_walked_the_longest_due_first(
    tmp_path: Path,
) -> None:
    store, stage = alert_stage(tmp_path, RULES, synchronous="normal")
    count = 2 * REMIND_PER_TICK + 10
    _open_many(store, count, T0)
    now = T0 + 10 * MINUTE
    stage.tick(now)
    left = store.due_incidents(now_ms=now, limit=count)
    assert len(left) == count - REMIND_PER_TICK
    assert min(i.triggered_ms for i in left) == T0 + REMIND_PER_TICK  # the oldest went first
    stage.tick(now + 1)
    stage.tick(now + 2)
    assert store.due_incidents(now_ms=now + 2, limit=count) == []
    # a warning without a policy is due again at its repeat (4 h), not at every tick
    (one,) = store.incidents(limit=1)
    assert one.next_due_ms == one.triggered_ms + 4 * 60 * MINUTE


def test_the_self_check_resolves_its_own_incident_behind_many_newer_ones(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES, synchronous="normal")
    stage.check_self({"hub-store-failing": "1 store write failure(s)"}, T0)
    _open_many(store, 60, T0 + 1)  # more than a page of the newest 50
    stage.check_self({}, T0 + 1000)
    assert store.unresolved_incident(rule="hub-store-failing", gateway=HUB_GATEWAY,
                                     device=HUB_DEVICE) is None


def test_a_restart_recomputes_when_open_incidents_are_due(tmp_path: Path) -> None:
    store, stage = alert_stage(tmp_path, RULES, synchronous="normal")
    button = Stamper(gateway="gw-care", device="sos-1")
    stored = store.append(batch_of([button.stamp("alert", {"kind": "sos", "state": "raised"})],
                                   received_ms=T0))
    stage.handle(stored.stored, now_ms=T0)
    stage.tick(T0 + 1)
    store.set_incident_due(store.incidents()[0].id, next_due_ms=None)  # as if by older rules
    _, restarted = alert_stage(tmp_path, RULES, synchronous="normal")
    restarted.tick(T0 + 5 * MINUTE)
    assert store.incidents()[0].escalation_sent == 1


class EscalationFailsFor(SqliteStore):
    """A real store that cannot record the escalation of some incidents (simulated: a damaged
    row, or a bug; one incident's write fails every time it is tried)."""

    broken: frozenset[int] = frozenset()

    def escalate_incident(self, incident_id: int, **kwargs: Any) -> bool:
        if incident_id in self.broken:
            msg = "cannot escalate an incident in the event store: database disk image is malformed"
            raise StoreError(msg)
        return super().escalate_incident(incident_id, **kwargs)


@pytest.mark.parametrize("broken", [0, 1], ids=["the-longest-due", "the-next"])
def test_an_incident_whose_escalation_cannot_be_recorded_holds_back_no_other(
    tmp_path: Path, broken: int,
) -> None:
    """The walk records a tick's reminders in one transaction: one incident whose escalation
    always fails rolled back every other's, at every tick, for ever. The others escalate; the
    failure is still raised (the hub counts and logs it) and that one is tried again."""
    (tmp_path / "r.yaml").write_text(RULES)
    store = EscalationFailsFor(tmp_path / "db", synchronous="normal")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]),
                       load_channels(UNREACHABLE_CHANNELS))
    buttons = [Stamper(gateway="gw-care", device=f"sos-{n}") for n in (1, 2)]
    stage.handle(store.append(batch_of([b.stamp("alert", {"kind": "sos", "state": "raised"})
                                        for b in buttons], received_ms=T0)).stored, now_ms=T0)
    stage.tick(T0 + 1)
    alarms = sorted(store.incidents(states=("open",)), key=lambda i: i.id)
    store.broken = frozenset({alarms[broken].id})
    due = T0 + 5 * MINUTE
    with pytest.raises(StoreError, match="malformed"):
        stage.tick(due)
    stage.tick(due + 250)  # the failing one waits a moment; nothing else is due
    with pytest.raises(StoreError, match="malformed"):
        stage.tick(due + RETRY_INTERVAL_MS)  # tried again: still failing
    sent = {i.id: i.escalation_sent for i in store.incidents(states=("open",))}
    assert sent == {alarms[broken].id: 0, alarms[1 - broken].id: 1}
    escalations = [n for n in store.notifications() if n.kind == "escalation"]
    assert [n.incident_id for n in escalations] == [alarms[1 - broken].id]
    store.broken = frozenset()  # repaired: it escalates when tried again
    stage.tick(due + 2 * RETRY_INTERVAL_MS)
    assert {i.escalation_sent for i in store.incidents(states=("open",))} == {1}
