"""The alert stage on a real SQLite store: incidents survive a hub restart without duplicates."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from careflow.core import clock
from careflow.core.errors import StoreError
from careflow.edge.stamper import Stamper
from careflow.hub.alerting import incidents as alerting
from careflow.hub.alerting import plan as planning
from careflow.hub.alerting.evaluate import Evaluator
from careflow.hub.alerting.incidents import ALERTS_CURSOR, AlertStage, conflicting_alarm
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import DeadLetter, EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from tests.hostile import hostile_payloads
from tests.hub.conftest import batch_of

RULES = """
rules:
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
"""
ALARM_RULE = """
  - name: care-alarm
    kind: event
    type: alert
    severity: critical
    where: {state: raised}
"""


def test_it_keeps_one_incident_across_a_restart_and_resolves_it_later(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    rules = load_rules([tmp_path / "r.yaml"])
    store = SqliteStore(tmp_path / "db")
    door = Stamper(gateway="gw", device="door")
    stage = AlertStage(store, rules)
    stored = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 5})]))
    stage.handle(stored.stored, now_ms=10**13)
    assert [i.state for i in store.incidents()] == ["open"]

    restarted = AlertStage(store, rules)  # a new hub process on the same store
    again = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 4})]))
    restarted.handle(again.stored, now_ms=10**13 + 1)
    assert len(store.incidents(states=None)) == 1
    healed = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 90})]))
    restarted.handle(healed.stored, now_ms=10**13 + 2)
    assert [i.state for i in store.incidents()] == ["resolved"]
    assert store.count(EventFilter()) == 3


class FlakyStore(SqliteStore):
    """A real store whose incident writes fail a given number of times (disk full, locked)."""

    failures = 0

    def open_incident(self, **kwargs: Any) -> int | None:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            msg = "cannot open an incident in the event store: database is locked"
            raise StoreError(msg)
        return super().open_incident(**kwargs)


CHANNELS = {"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/oncall",
            "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/ops"}
T0 = 10**13


def stage_on(store: SqliteStore, tmp_path: Path) -> AlertStage:
    """A stage as a (re)started hub builds it: rules, channels, the store as it is."""
    return AlertStage(store, load_rules([tmp_path / "r.yaml"]), load_channels(CHANNELS))


def announced(store: SqliteStore) -> list[tuple[str, str, str]]:
    """(rule, device, kind) of every notification written, oldest first."""
    incidents = {i.id: i for i in store.incidents(limit=1000)}
    return [(incidents[n.incident_id].rule, incidents[n.incident_id].device, n.kind)
            for n in reversed(store.notifications(limit=1000))]


def test_a_change_the_store_refused_is_evaluated_again_from_the_log_in_order(
        tmp_path: Path) -> None:
    """The evaluator counts a change as done once reported; if the store refuses it, the stage
    rebuilds the evaluator and evaluates again from its cursor: nothing dropped or reordered."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = FlakyStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]))
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    store.failures = 2  # the first attempt, then the first retry
    stored = store.append(batch_of([
        door.stamp("status", {"state": "ok", "battery_pct": 5}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=T0)  # must not raise, nor skip the alarm
    assert store.incidents() == [] and stage.record_errors == 1
    assert stage.unrecorded == 2 and store.cursor(ALERTS_CURSOR) < stored.stored[0].pos
    stage.tick(T0 + 1_000)  # resumes from the log; refused again
    assert store.incidents() == [] and stage.record_errors == 2
    assert stage.lag(T0 + 1_500)[0] >= 1_500  # the wait shows as evaluation lag
    stage.tick(T0 + 2_000)
    assert [i.rule for i in reversed(store.incidents())] == ["battery-low", "care-alarm"]
    assert stage.unrecorded == 0 and store.cursor(ALERTS_CURSOR) == stored.stored[-1].pos


def test_it_evaluates_after_a_restart_what_a_crash_left_unevaluated(tmp_path: Path) -> None:
    """Committed and acknowledged, then the hub died before the rules saw it: the restarted
    stage catches up from its cursor, and announces the alarm exactly once."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage_on(store, tmp_path)
    sos = Stamper(gateway="gw", device="sos")
    store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    # the hub is killed here: no handle()
    restarted = stage_on(store, tmp_path)
    restarted.tick(T0)
    assert announced(store) == [("care-alarm", "sos", "firing")]
    again = stage_on(store, tmp_path)  # killed and restarted once more: nothing twice
    again.tick(T0 + 1)
    assert announced(store) == [("care-alarm", "sos", "firing")]


def test_a_change_the_store_refused_survives_a_crash(tmp_path: Path) -> None:
    """Refused changes are not held in memory only: the log and the cursor keep them."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = FlakyStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    store.failures = 1_000  # the disk stays full until the hub is killed
    sos = Stamper(gateway="gw", device="sos")
    stored = store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=T0)
    stage.tick(T0 + 1_000)
    assert store.incidents() == []
    healthy = SqliteStore(tmp_path / "db")  # restarted on a disk with room again
    stage_on(healthy, tmp_path).tick(T0 + 2_000)
    assert announced(healthy) == [("care-alarm", "sos", "firing")]


def test_events_evaluated_again_after_a_crash_change_nothing(tmp_path: Path) -> None:
    """Change-free progress is saved at most once a second; what a crash makes the stage
    evaluate again had no changes the first time, and has none the second."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    first = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 5}),
                                   sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(first.stored, now_ms=T0)  # two incidents, saved with the cursor
    assert store.cursor(ALERTS_CURSOR) == first.stored[-1].pos
    calm = store.append(batch_of([door.stamp("status", {"state": "ok", "battery_pct": 4}),
                                  sos.stamp("alert", {"kind": "sos", "state": "ended"})]))
    stage.handle(calm.stored, now_ms=T0 + 10)
    assert store.cursor(ALERTS_CURSOR) == first.stored[-1].pos  # no fsync for no change
    before = announced(store)
    stage_on(store, tmp_path).tick(T0 + 20)  # killed before the cursor was saved
    assert announced(store) == before and len(before) == 2
    stage.tick(T0 + 2_000)  # a live stage saves its progress within a second
    assert store.cursor(ALERTS_CURSOR) == calm.stored[-1].pos


def conflicting_alarm_batch(boot: str) -> tuple[IncomingBatch, IncomingBatch]:
    """A heartbeat at seq 1, then, after a reboot that kept the boot id, an alarm at seq 1."""
    before = Stamper(gateway="gw", device="fall", boot=boot)
    after = Stamper(gateway="gw", device="fall", boot=boot)
    return (batch_of([before.stamp("heartbeat", {"interval_s": 60})]),
            batch_of([after.stamp("alert", {"kind": "fall", "state": "raised"})]))


def test_an_alarm_refused_as_a_conflict_still_opens_its_incident(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    heartbeat, alarm = conflicting_alarm_batch("boot-kept")
    stage.handle(store.append(heartbeat).stored, now_ms=T0)
    result = store.append(alarm)
    assert result.stored == () and result.conflicts == 1
    stage.handle(result.stored, now_ms=T0 + 1, conflicts=result.conflicts)
    assert announced(store) == [("care-alarm", "fall", "firing")]
    (incident,) = store.incidents()
    (letter,) = store.dead_letters(code="conflict")  # and the conflict stays visible
    assert f"dead letter #{letter.pos}" in incident.detail and "boot-kept" in incident.detail


def test_a_conflicting_alarm_left_unevaluated_by_a_crash_is_evaluated_after_it(
        tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    heartbeat, alarm = conflicting_alarm_batch("boot-kept")
    stage.handle(store.append(heartbeat).stored, now_ms=T0)
    assert store.append(alarm).conflicts == 1  # confirmed to the gateway; then killed
    stage_on(store, tmp_path).tick(T0 + 1)
    assert announced(store) == [("care-alarm", "fall", "firing")]
    stage_on(store, tmp_path).tick(T0 + 2)  # and only once
    assert len(announced(store)) == 1


def test_a_conflict_may_raise_an_alarm_but_never_clear_one(tmp_path: Path) -> None:
    """A position collision means the source's numbering is broken: raising on its word is
    safe, silencing an alarm on it is not."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    before = Stamper(gateway="gw", device="fall", boot="b")
    stage.handle(store.append(batch_of([
        before.stamp("alert", {"kind": "fall", "state": "raised"})])).stored, now_ms=T0)
    rebooted = Stamper(gateway="gw", device="fall", boot="b")
    result = store.append(batch_of([rebooted.stamp("alert", {"kind": "fall",
                                                             "state": "cleared"})]))
    stage.handle(result.stored, now_ms=T0 + 1, conflicts=result.conflicts)
    assert result.conflicts == 1 and [i.state for i in store.incidents()] == ["open"]


def test_a_conflict_after_dead_letters_were_pruned_is_still_evaluated(tmp_path: Path) -> None:
    """Pruning never gives a position out again: a conflict placed behind the cursor would
    never be evaluated."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db", dead_letter_max_rows=1, dead_letter_max_bytes=1)
    stage = stage_on(store, tmp_path)
    for device in ("fall-1", "fall-2"):
        before = Stamper(gateway="gw", device=device, boot="b")
        after = Stamper(gateway="gw", device=device, boot="b")
        stage.handle(store.append(batch_of([before.stamp("heartbeat", {"interval_s": 60})])
                                  ).stored, now_ms=T0)
        result = store.append(batch_of([after.stamp("alert", {"kind": "fall",
                                                              "state": "raised"})]))
        stage.handle(result.stored, now_ms=T0 + 1, conflicts=result.conflicts)
        junk = store.append(batch_of([{"gateway": "gw", "not": "an event"}]))
        assert junk.dead_lettered == 1  # and the evaluated conflict is pruned
    assert sorted(i.device for i in store.incidents()) == ["fall-1", "fall-2"]


def test_a_conflict_of_another_event_type_opens_nothing(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    before = Stamper(gateway="gw", device="door", boot="b")
    after = Stamper(gateway="gw", device="door", boot="b")
    stage.handle(store.append(batch_of([before.stamp("status", {"state": "ok"})])).stored,
                 now_ms=T0)
    result = store.append(batch_of([after.stamp("status", {"state": "ok", "battery_pct": 3})]))
    stage.handle(result.stored, now_ms=T0 + 1, conflicts=result.conflicts)
    assert result.conflicts == 1 and store.incidents() == []


def test_a_new_database_starts_evaluation_at_the_end_of_its_log(tmp_path: Path) -> None:
    """A database from before the cursor: its past is not raised again at the upgrade."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    sos = Stamper(gateway="gw", device="sos")
    old = store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage_on(store, tmp_path).tick(T0)
    assert store.incidents() == [] and store.cursor(ALERTS_CURSOR) == old.stored[-1].pos


def test_messages_link_the_runbook_when_a_base_url_is_configured(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(ALARM_RULE.replace(
        "    where: {state: raised}", "    where: {state: raised}\n    runbook: runbooks/care-alarm.md"
    ).replace("\n  - name", "rules:\n  - name", 1))
    store = SqliteStore(tmp_path / "db")
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), channels,
                       runbook_url="https://git.example.org/careflow/blob/main/")
    sos = Stamper(gateway="gw", device="sos")
    stored = store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=10**13)
    (notification,) = store.notifications()
    assert "https://git.example.org/careflow/blob/main/runbooks/care-alarm.md" in notification.body


@settings(max_examples=300, deadline=None)
@given(payload=hostile_payloads())
def test_no_conflict_payload_is_an_error_and_only_an_alert_is_an_alarm(payload: bytes) -> None:
    """What a conflict dead letter holds is read back by the alert stage: whatever it is, it is
    an alarm or nothing, never an exception that would stall evaluation."""
    letter = DeadLetter(1, T0, "careflow/v1/gw-1/fall/alert", "conflict", "taken", payload,
                        len(payload), None)
    alarm = conflicting_alarm(letter)
    assert alarm is None or (alarm.type == "alert" and alarm.received_ms == T0)


# What a device can send in one commit: alarms raised and cleared, batteries low and fine, and
# an alarm after a reboot that kept the boot id (seq 1 again: a conflict once seq 1 is stored).
_MOVES = st.tuples(st.sampled_from(["a", "b"]),
                   st.sampled_from(["raise", "clear", "low", "ok", "reboot-raise"]))


def _commits(plan: list[list[tuple[str, str]]]) -> list[IncomingBatch]:
    stampers = {device: Stamper(gateway="gw", device=device, boot=f"boot-{device}")
                for device in ("a", "b")}
    batches = []
    for moves in plan:
        events = []
        for device, move in moves:
            source = stampers[device]
            if move == "reboot-raise":
                source = Stamper(gateway="gw", device=device, boot=f"boot-{device}")
            kind, data = {"raise": ("alert", {"kind": "fall", "state": "raised"}),
                          "reboot-raise": ("alert", {"kind": "fall", "state": "raised"}),
                          "clear": ("alert", {"kind": "fall", "state": "cleared"}),
                          "low": ("status", {"state": "ok", "battery_pct": 5}),
                          "ok": ("status", {"state": "ok", "battery_pct": 90})}[move]
            events.append(source.stamp(kind, data))
        batches.append(batch_of(events))
    return batches


def _announced_after(tmp: Path, batches: list[IncomingBatch], ticks: list[bool],
                     crash_at: int | None) -> list[Any]:
    """Run the commits through a stage, with a clock tick after those ``ticks`` says; at
    ``crash_at`` the hub dies after the commit and before its evaluation, and a new stage
    takes over."""
    store = SqliteStore(tmp / "db")
    stage = stage_on(store, tmp)
    for index, (batch, tick) in enumerate(zip(batches, ticks, strict=False)):
        now = T0 + index * 600  # a tick saves change-free progress at most once a second
        result = store.append(batch)
        if index == crash_at:
            stage = stage_on(store, tmp)  # killed: this commit's evaluation never ran
        else:
            stage.handle(result.stored, now, result.data, conflicts=result.conflicts)
        if tick:
            stage.tick(now + 1)
    stage.tick(T0 + len(batches) * 600)
    return sorted(announced(store))


@settings(max_examples=60, deadline=None)
@example(plan=[[("a", "reboot-raise"), ("a", "clear"), ("a", "clear")], [("a", "raise")]],
         ticks=[False] * 6, crash_at=0)  # a conflict read back after a later commit's alarm
@example(plan=[[("a", "ok"), ("a", "reboot-raise")], [("a", "clear")]],
         ticks=[False] * 6, crash_at=0)  # a conflicting raise read back after a later clear
@example(plan=[[("a", "raise")], [("b", "low")], [("b", "reboot-raise")], [("b", "clear")]],
         ticks=[False] * 6, crash_at=2)  # a conflict left by a kill comes before a later clear
@given(plan=st.lists(st.lists(_MOVES, min_size=1, max_size=4), min_size=1, max_size=6),
       ticks=st.lists(st.booleans(), min_size=6, max_size=6),
       crash_at=st.integers(min_value=0, max_value=5))
def test_a_hub_killed_between_any_commit_and_its_evaluation_announces_the_same(
        plan: list[list[tuple[str, str]]], ticks: list[bool], crash_at: int) -> None:
    """Exactly once: the same notifications as a hub that never died, none missing, none twice,
    wherever the kill lands and however far the saved cursor trails."""
    batches = _commits(plan)
    with tempfile.TemporaryDirectory() as calm, tempfile.TemporaryDirectory() as killed:
        for folder in (calm, killed):
            (Path(folder) / "r.yaml").write_text(RULES + ALARM_RULE)
        assert _announced_after(Path(killed), batches, ticks, crash_at) == \
            _announced_after(Path(calm), batches, ticks, None)


def test_a_hub_far_behind_catches_up_in_bounded_steps_and_says_it_lags(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """Restarted far behind its log, the stage evaluates at most CATCH_UP_PER_CALL events per
    tick (the writer thread goes back to ingest in between), keeps its progress across a kill,
    reports the wait as lag, and reaches the alarm at the end exactly once."""
    monkeypatch.setattr(alerting, "CATCH_UP_CHUNK", 10)
    monkeypatch.setattr(alerting, "CATCH_UP_PER_CALL", 50)
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage_on(store, tmp_path)  # the hub ran once (its cursors are set), then stopped evaluating
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    store.append(batch_of([door.stamp("status", {"state": "ok"}) for _ in range(180)],
                          received_ms=T0))
    store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})],
                          received_ms=T0))
    stage = stage_on(store, tmp_path)
    stage.tick(T0 + 60_000)
    assert 0 < stage.unrecorded <= 181 - 50  # one bounded step, not the whole log
    assert store.cursor(ALERTS_CURSOR) >= 50  # progress kept: a kill does not start over
    assert stage.lag(T0 + 60_000)[0] >= 60_000  # the oldest event waiting, not the last tick
    stage = stage_on(store, tmp_path)  # killed here
    for step in range(1, 10):
        stage.tick(T0 + 60_000 + step)
    assert stage.unrecorded == 0
    assert announced(store) == [("care-alarm", "sos", "firing")]


def test_a_commit_whose_bookkeeping_failed_before_evaluation_is_evaluated_at_the_next_tick(
    tmp_path: Path,
) -> None:
    """The hub hands each commit to the stage after confirming it to its gateways; if that
    bookkeeping fails (a bug), the commit never reaches handle(). The clock finds it in the
    log anyway: an alarm, and a conflicting alarm, are announced without waiting for another
    commit (which, on a quiet night, may be long)."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    stage.tick(T0)
    sos = Stamper(gateway="gw", device="sos")
    store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.tick(T0 + 250)  # no handle() for that commit
    assert announced(store) == [("care-alarm", "sos", "firing")]
    heartbeat, alarm = conflicting_alarm_batch("boot-kept")
    stage.handle(store.append(heartbeat).stored, now_ms=T0 + 300)
    assert store.append(alarm).conflicts == 1  # no handle() for this one either
    stage.tick(T0 + 500)
    assert announced(store) == [("care-alarm", "sos", "firing"), ("care-alarm", "fall", "firing")]


RATE_RULE = """
  - name: error-burst
    kind: rate
    type: error
    more_than: 2
    within: 60s
"""


def test_a_burst_firing_across_a_restart_is_not_declared_over_by_its_next_event(
    tmp_path: Path,
) -> None:
    """A restarted stage (or one rebuilt after a refused write) does not know the rate
    windows it had: the first error after it counted as a window of one, so a burst still
    going on was announced as over. The window must be watched whole before it may clear."""
    (tmp_path / "r.yaml").write_text(RULES + RATE_RULE)
    now = clock.now_ms()  # the events carry the time they were stamped
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    noisy = Stamper(gateway="gw", device="noisy")
    for step in range(3):
        stored = store.append(batch_of([noisy.stamp("error", {"code": "E", "message": "boom"})]))
        stage.handle(stored.stored, now_ms=now + step)
    assert announced(store) == [("error-burst", "noisy", "firing")]
    stage = stage_on(store, tmp_path)  # restarted
    stored = store.append(batch_of([noisy.stamp("error", {"code": "E", "message": "boom"})]))
    stage.handle(stored.stored, now_ms=now + 1_000)
    stage.tick(now + 30_000)
    assert announced(store) == [("error-burst", "noisy", "firing")]  # not over: unknown yet
    stage.tick(now + 1_000 + 61_000)  # a whole window seen with one error: over
    assert announced(store) == [("error-burst", "noisy", "firing"),
                                ("error-burst", "noisy", "resolved")]


def test_a_burst_firing_across_a_restart_clears_when_nothing_more_comes(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES + RATE_RULE)
    now = clock.now_ms()  # the events carry the time they were stamped
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    noisy = Stamper(gateway="gw", device="noisy")
    stage.handle(store.append(batch_of([noisy.stamp("error", {"code": "E", "message": "boom"})
                                        for _ in range(3)])).stored, now_ms=now)
    stage = stage_on(store, tmp_path)  # restarted; the device then fell quiet
    stage.tick(now + 1_000)
    stage.tick(now + 1_000 + 61_000)
    assert announced(store) == [("error-burst", "noisy", "firing"),
                                ("error-burst", "noisy", "resolved")]


class SecondOpenFails(SqliteStore):
    """A real store that refuses the second incident it is asked to open (the disk fills up
    in the middle of a transaction)."""

    calls = 0

    def open_incident(self, **kwargs: Any) -> int | None:  # type: ignore[override]
        self.calls += 1
        if self.calls == 2:
            msg = "cannot open an incident in the event store: database or disk is full"
            raise StoreError(msg)
        return super().open_incident(**kwargs)


def test_the_count_of_opened_incidents_is_not_inflated_by_a_refused_transaction(
    tmp_path: Path,
) -> None:
    """The hub's health reports incidents_opened: a transaction the store refused and that
    was recorded again must count its incidents once."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SecondOpenFails(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]))
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    stored = store.append(batch_of([
        door.stamp("status", {"state": "ok", "battery_pct": 5}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
    stage.handle(stored.stored, now_ms=T0)  # the first opens, the second is refused: rollback
    assert store.incidents() == [] and stage.record_errors == 1
    stage.tick(T0 + 2_000)
    assert len(store.incidents()) == 2
    assert stage.opened == 2



def test_a_restart_does_not_count_a_sources_last_event_twice_in_a_rate_window(
    tmp_path: Path,
) -> None:
    """A restarted stage learns from the registry when each source was last heard from; that
    is not an event: a rate rule on status events must not count the last one twice (once
    from the registry, once from the log after the cursor) and fire on a single event."""
    (tmp_path / "r.yaml").write_text(RULES + """
  - name: status-storm
    kind: rate
    type: status
    more_than: 1
    within: 60s
""")
    now = clock.now_ms()
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    door = Stamper(gateway="gw", device="door")
    stage.handle(store.append(batch_of([door.stamp("status", {"state": "ok"})])).stored,
                 now_ms=now)  # nothing changed: the cursor is saved later, then the hub dies
    restarted = stage_on(store, tmp_path)
    restarted.tick(now + 1_000)
    assert store.incidents() == []


def test_an_open_incident_of_a_rule_since_removed_does_not_stop_evaluation(
    tmp_path: Path,
) -> None:
    """The operator renamed the gateway-offline rule while an incident of it was open for a
    gateway: a care alarm from behind that gateway asked whether the gateway is offline, looked
    the old rule up, and failed, again at every retry, with every alarm after it."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage_on(store, tmp_path)
    store.open_incident(rule="gateway-offline", gateway="gw", device="gw", severity="critical",
                        summary="Gateway gw has gone silent", detail="", at_ms=T0, notify=[])
    stage = stage_on(store, tmp_path)  # restarted with rules that no longer have it
    sos = Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
                 .stored, now_ms=T0 + 1_000)
    assert announced(store) == [("care-alarm", "sos", "firing")]
    assert stage.record_errors == 0


def test_a_bug_in_deciding_whether_to_mute_never_holds_an_alarm(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """Muting (silences, inhibition, flapping) looks at much state; a bug there (simulated:
    no real input is known to cause one) raised at every retry and held this alarm and every
    one after it. Better announced than held: the alarm goes out."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)

    def broken(**_: Any) -> str | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(planning, "inhibited_by", broken)
    sos = Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
                 .stored, now_ms=T0)
    assert announced(store) == [("care-alarm", "sos", "firing")]


@pytest.mark.parametrize("template", ["{device.model}", "{device[x]}", "{device[9]}", "{0}",
                                      "{device!z}", "{device:%}", "{", "{device.__class__}"])
def test_a_careless_summary_template_never_holds_an_alarm(template: str, tmp_path: Path,
                                                           ) -> None:
    """A rule's summary is an operator's str.format template; one that cannot be filled in
    (an attribute or key a name has not) was raised at every retry of the log and held this
    alarm and every one after it. The text goes out as written instead."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE + f"    summary: {json.dumps(template)}\n")
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    sos = Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
                 .stored, now_ms=T0)
    assert announced(store) == [("care-alarm", "sos", "firing")]


def test_a_change_that_cannot_be_recorded_holds_back_no_alarm_and_is_announced(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """A bug while recording one change (simulated: rendering its message fails; no real input
    is known to cause it) was raised at every retry from the log and held back every alarm
    after it. It is set aside and announced like an event the rules cannot evaluate."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    render = planning.render

    def fails_for_poison(**fields: Any) -> tuple[str, str]:
        if fields["device"] == "poison":
            raise RuntimeError("a bug")
        return render(**fields)

    monkeypatch.setattr(planning, "render", fails_for_poison)
    poison = Stamper(gateway="gw", device="poison")
    sos = Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([
        poison.stamp("alert", {"kind": "sos", "state": "raised"}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})])).stored, now_ms=T0)
    stage.tick(T0 + 2_000)
    assert ("care-alarm", "sos", "firing") in announced(store)
    (failed,) = [i for i in store.incidents() if i.rule == "hub-evaluation-failed"]
    assert "gw/poison" in failed.detail and "CARE ALARM" in failed.detail
    assert store.cursor(ALERTS_CURSOR) == store.last_pos()


def test_an_event_the_rules_cannot_evaluate_holds_back_no_alarm_and_is_announced(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """One stored event that makes evaluation itself fail (simulated: no real input is known to
    cause it) was retried from the log every second, holding back every alarm after it, for
    ever. It is set aside, the alarms after it go out, and on-call hears of it through the hub's
    own alert, written with the cursor that passed it: after a restart it is not announced
    again."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = SqliteStore(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    observe = Evaluator.observe

    def fails_on_poison(self: Evaluator, observation: Any, now_ms: int) -> Any:
        if observation.device == "poison":
            raise RuntimeError("a bug")
        return observe(self, observation, now_ms)

    monkeypatch.setattr(Evaluator, "observe", fails_on_poison)
    poison = Stamper(gateway="gw", device="poison")
    sos = Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([
        poison.stamp("alert", {"kind": "sos", "state": "raised"}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})])).stored, now_ms=T0)
    stage.tick(T0 + 2_000)
    stage.check_self({}, T0 + 2_000)
    assert ("care-alarm", "sos", "firing") in announced(store)
    (failed,) = [i for i in store.incidents() if i.rule == "hub-evaluation-failed"]
    assert failed.severity == "critical" and failed.state == "open"
    assert "gw/poison" in failed.detail and "CARE ALARM" in failed.detail
    assert store.cursor(ALERTS_CURSOR) == store.last_pos()

    again = stage_on(store, tmp_path)  # a restart: the cursor is past the poison event
    again.tick(T0 + 3_000)
    assert [i.rule for i in store.incidents()].count("hub-evaluation-failed") == 1
    assert again.evaluation_failures == 0


class ResolveFailsFor(SqliteStore):
    """A real store with a bug resolving one device's incidents (simulated: no real input is
    known to cause one): not a refusal of the store, a bug in writing one change."""

    def resolve_incidents(self, **kwargs: Any) -> int:  # type: ignore[override]
        if kwargs["device"] == "poison":
            raise RuntimeError("a bug")
        return super().resolve_incidents(**kwargs)


def test_a_bug_writing_one_change_holds_back_no_later_change_of_its_source_nor_any_alarm(
    tmp_path: Path,
) -> None:
    """A change a bug kept from being written is set aside; the changes planned after it in the
    same commit must not assume it was written. A condition that cleared (the write fails) and
    fired again in one commit was planned as a new incident, which the store (one unresolved
    per source) did not open: the step was planned again and again, then refused, and
    evaluation stopped there for good, holding every care alarm after it."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = ResolveFailsFor(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    poison, sos = Stamper(gateway="gw", device="poison"), Stamper(gateway="gw", device="sos")

    def battery(pct: int) -> dict[str, Any]:
        return poison.stamp("status", {"state": "ok", "battery_pct": pct})

    stage.handle(store.append(batch_of([battery(5)])).stored, now_ms=T0)
    stage.handle(store.append(batch_of([
        battery(90),  # clears: resolving it fails (the bug)
        battery(5)])).stored, now_ms=T0 + 1_000)  # and fires again, in the same commit
    stage.handle(store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})]))
                 .stored, now_ms=T0 + 2_000)
    stage.tick(T0 + 3_000)
    stage.tick(T0 + 5_000)
    assert ("care-alarm", "sos", "firing") in announced(store)
    (failed,) = [i for i in store.incidents() if i.rule == "hub-evaluation-failed"]
    assert "gw/poison battery-low resolved (not recorded)" in failed.detail
    assert [i.state for i in store.incidents() if i.rule == "battery-low"] == ["open"]
    assert stage.unrecorded == 0 and store.cursor(ALERTS_CURSOR) == store.last_pos()


class PresenceBug(SqliteStore):
    """A real store whose presence cannot be read for a bug (simulated: no real input is known
    to cause one); inhibition is the only decision that reads it."""

    def presence(self) -> Any:
        raise RuntimeError("a bug")


def test_a_bug_reading_what_inhibition_looks_at_never_holds_an_alarm(tmp_path: Path) -> None:
    """Whether a gateway is offline is read for inhibition only; a bug there was announced
    past (better announced than held) while the stage read it change by change. Read once per
    step, it failed the whole step at every retry from the log: the device's silence and every
    care alarm after it were held for good."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE + """
  - name: device-silent
    kind: absence
    grace: 2
""")
    store = PresenceBug(tmp_path / "db")
    stage = stage_on(store, tmp_path)  # with channels: the escalation walk looks too
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([door.stamp("heartbeat", {"interval_s": 30})],
                                       received_ms=T0)).stored, now_ms=T0)
    stage.tick(T0 + 10 * 60_000)  # door silent: is its gateway offline? (the bug)
    stage.handle(store.append(batch_of([sos.stamp("alert", {"kind": "sos", "state": "raised"})],
                                       received_ms=T0 + 10 * 60_000 + 1_000)).stored,
                 now_ms=T0 + 10 * 60_000 + 1_000)
    stage.tick(T0 + 10 * 60_000 + 3_000)
    assert sorted(i.rule for i in store.incidents()) == ["care-alarm", "device-silent"]
    assert ("device-silent", "door", "firing") in announced(store)
    assert stage.unrecorded == 0


class MuteReadBug(SqliteStore):
    """A real store with a bug reading the silences and the flapping history (simulated: a
    row the record cannot be built from, say)."""

    def silences(self, **_: Any) -> Any:
        raise RuntimeError("a bug")

    def incident_triggers(self, **_: Any) -> Any:
        raise RuntimeError("a bug")


def test_a_bug_reading_silences_or_flapping_history_never_holds_an_alarm(tmp_path: Path) -> None:
    """Silences and earlier triggers only decide whether to mute; a bug reading them was
    announced past while the stage read them change by change. Read once per step, it failed
    every step at every retry: no alarm was recorded any more. Announced, as before."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = MuteReadBug(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    door, sos = Stamper(gateway="gw", device="door"), Stamper(gateway="gw", device="sos")
    stage.handle(store.append(batch_of([
        door.stamp("status", {"state": "ok", "battery_pct": 5}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})])).stored, now_ms=T0)
    stage.tick(T0 + 2_000)
    assert ("care-alarm", "sos", "firing") in announced(store)
    assert ("battery-low", "door", "firing") in announced(store)
    assert stage.unrecorded == 0


class IncidentReadBug(SqliteStore):
    """A real store with a bug reading one source's unresolved incident, and the timing of one
    gateway's groups (simulated: a row a record cannot be built from, say)."""

    def unresolved_incident(self, **kwargs: Any) -> Any:
        if kwargs["device"] == "poison":
            raise RuntimeError("a bug")
        return super().unresolved_incident(**kwargs)

    def group_timing(self, **kwargs: Any) -> Any:
        if kwargs["group_key"] == "gw-poison":
            raise RuntimeError("a bug")
        return super().group_timing(**kwargs)


def test_a_bug_reading_one_sources_incident_or_group_holds_back_no_other_alarm(
    tmp_path: Path,
) -> None:
    """Read change by change, a bug reading one source's incident set that change aside (and
    announced it), as did a bug reading a group's timing; the other changes were recorded.
    Read once per step, it failed the whole step at every retry, holding every alarm after it.
    The changes that need what cannot be read are set aside and announced again."""
    (tmp_path / "r.yaml").write_text(RULES + ALARM_RULE)
    store = IncidentReadBug(tmp_path / "db")
    stage = stage_on(store, tmp_path)
    poison, sos = Stamper(gateway="gw", device="poison"), Stamper(gateway="gw", device="sos")
    door = Stamper(gateway="gw-poison", device="door")
    stage.handle(store.append(batch_of([
        poison.stamp("alert", {"kind": "sos", "state": "raised"}),
        door.stamp("status", {"state": "ok", "battery_pct": 5}),
        sos.stamp("alert", {"kind": "sos", "state": "raised"})])).stored, now_ms=T0)
    stage.tick(T0 + 2_000)
    assert ("care-alarm", "sos", "firing") in announced(store)
    (failed,) = [i for i in store.incidents() if i.rule == "hub-evaluation-failed"]
    assert "gw/poison care-alarm firing (not recorded)" in failed.detail
    assert "gw-poison/door battery-low firing (not recorded)" in failed.detail
    assert "1 of them a CARE ALARM" in failed.detail
    assert stage.unrecorded == 0
