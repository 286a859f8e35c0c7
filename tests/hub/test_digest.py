"""Status digests: `routing.digests:` parsed and checked, scheduling by local time (DST, a hub
that was down), and the message, written with a frozen clock from a real store."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from careflow.core.errors import ConfigError, StoreError
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.digest import (
    LATE_AFTER_MS,
    MAX_LISTED,
    Due,
    FleetNow,
    compose,
    due_digests,
    latest_slot_ms,
    next_slot_ms,
    slot_ms,
)
from careflow.hub.alerting.digest_scheduler import DigestScheduler, cursor_name
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import Digest, load_rules
from careflow.hub.app import build_hub
from careflow.hub.ingest.decode import PresenceUpdate
from careflow.hub.store.records import Incident, IncidentState, IncomingBatch, Severity
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import careflow_cmd, make_settings, store_event, wait_until


def utc_ms(text: str) -> int:
    """``2026-03-29 05:00`` (UTC) in ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1000


def digest(at: str = "07:00", timezone: str = "Europe/Berlin", **more: object) -> Digest:
    return Digest.model_validate({"at": at, "timezone": timezone, "channel": "ops", **more})


# -- parsing -----------------------------------------------------------------------------------

DIGESTS = """\
routing:
  routes: []
  digests:
    - at: "07:00"
      timezone: Europe/Berlin
      channel: ops
    - name: night-shift
      at: "19:30"
      timezone: America/New_York
      channel: oncall
      low_battery_pct: 15
"""


def test_it_reads_digests_with_their_lines(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(DIGESTS)
    ruleset = load_rules([tmp_path])
    morning, night = ruleset.routing.digests
    assert (morning.key, morning.at, morning.timezone, morning.channel,
            morning.low_battery_pct) == ("ops-0700", "07:00", "Europe/Berlin", "ops", 20)
    assert (night.key, night.hour_minute, night.low_battery_pct) == ("night-shift", (19, 30), 15)
    assert ruleset.digest_origins == (f"{tmp_path / 'r.yaml'}:4", f"{tmp_path / 'r.yaml'}:7")


@pytest.mark.parametrize(("entry", "problem"), [
    ('{at: "07:00", timezone: Europe/Berlim, channel: ops}',
     r"r.yaml:4: routing: digests.1.timezone: .*unknown time zone 'Europe/Berlim': give an IANA"),
    ('{at: "7:00pm", timezone: UTC, channel: ops}',
     r"r.yaml:4: .*digests.1.at: .*'7:00pm' is not a time of day such as \"07:30\""),
    ('{at: "24:00", timezone: UTC, channel: ops}', r"r.yaml:4: .*'24:00' is not a time of day"),
    ("{at: 19:00, timezone: UTC, channel: ops}",
     r"r.yaml:4: .*an unquoted time as a number \(1140\): quote it, e.g. at: \"19:00\""),
    ('{at: "07:00", timezone: UTC}', r"r.yaml:4: .*digests.1.channel: Field required"),
    ('{at: "07:00", timezone: UTC, channel: Ops!}', r"r.yaml:4: .*digests.1.channel: String"),
    ('{at: "07:00", timezone: UTC, channel: ops, every: 1h}', r"r.yaml:4: .*digests.1.every"),
    ('{at: "07:00", timezone: UTC, channel: ops}',  # same default name as the first
     r"r.yaml:4: digest 'ops-0700' is already declared at .*r.yaml:3; give each a `name:`"),
])
def test_it_names_file_and_line_of_a_bad_digest(tmp_path: Path, entry: str,
                                                problem: str) -> None:
    (tmp_path / "r.yaml").write_text("routing:\n  digests:\n"
                                     '    - {at: "07:00", timezone: Asia/Tokyo, channel: ops}\n'
                                     f"    - {entry}\n")
    with pytest.raises(ConfigError, match=problem):
        load_rules([tmp_path])


# -- scheduling --------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "day", "due_utc"), [
    (digest(), date(2026, 1, 15), "2026-01-15 06:00"),  # CET, UTC+1
    (digest(), date(2026, 7, 15), "2026-07-15 05:00"),  # CEST, UTC+2
    (digest(), date(2026, 3, 28), "2026-03-28 06:00"),  # the day before clocks spring forward
    (digest(), date(2026, 3, 29), "2026-03-29 05:00"),  # the day they do (02:00 -> 03:00)
    (digest(), date(2026, 10, 25), "2026-10-25 06:00"),  # the day they fall back
    # 02:30 does not exist on 29 March in Berlin: on time by the hours elapsed (03:30 CEST)
    (digest("02:30"), date(2026, 3, 29), "2026-03-29 01:30"),
    # 02:30 happens twice on 25 October: the first (CEST)
    (digest("02:30"), date(2026, 10, 25), "2026-10-25 00:30"),
    (digest("07:00", "America/New_York"), date(2026, 3, 8), "2026-03-08 11:00"),  # EDT begins
    (digest("00:00", "UTC"), date(2026, 12, 31), "2026-12-31 00:00"),
    (digest("23:59", "Pacific/Kiritimati"), date(2026, 6, 1), "2026-06-01 09:59"),  # UTC+14
])
def test_it_is_due_at_its_local_time_of_day(entry: Digest, day: date, due_utc: str) -> None:
    assert slot_ms(entry, day) == utc_ms(due_utc)


MORNING = digest()  # 07:00 Europe/Berlin


@pytest.mark.parametrize(("last", "now", "slot", "late"), [
    ("2026-03-27 06:00", "2026-03-28 05:59", None, False),  # not yet 07:00 CET
    ("2026-03-27 06:00", "2026-03-28 06:00", "2026-03-28 06:00", False),  # on the minute
    ("2026-03-28 06:00", "2026-03-28 06:00", None, False),  # just sent: not again
    ("2026-03-28 06:00:10", "2026-03-28 23:00", None, False),  # sent; nothing until tomorrow
    ("2026-03-28 06:00", "2026-03-29 05:00", "2026-03-29 05:00", False),  # 07:00 CEST
    # down from Friday to Monday 09:00: one digest, late, for Monday's 07:00 (not three)
    ("2026-03-27 06:00", "2026-03-30 07:00", "2026-03-30 05:00", True),
    ("2026-03-27 06:00", "2026-03-28 06:00:30", "2026-03-28 06:00", False),  # polled late
    ("2026-03-27 06:00", "2026-03-28 06:11", "2026-03-28 06:00", True),
    ("2026-03-29 05:00", "2026-03-28 12:00", None, False),  # clock set back: no repeat
])
def test_it_is_due_once_per_time_of_day_and_once_after_downtime(
        last: str, now: str, slot: str | None, late: bool) -> None:
    due = due_digests([MORNING], {MORNING.key: utc_ms(last)}, utc_ms(now))
    if slot is None:
        assert due == []
        return
    assert due == [Due(MORNING, utc_ms(slot), utc_ms(last), late=late)]


def test_it_is_not_due_before_it_was_scheduled() -> None:
    assert due_digests([MORNING], {}, utc_ms("2026-03-28 06:00")) == []


def test_it_knows_the_next_and_latest_time() -> None:
    now = utc_ms("2026-03-28 12:00")
    assert latest_slot_ms(MORNING, now) == utc_ms("2026-03-28 06:00")
    assert next_slot_ms(MORNING, now) == utc_ms("2026-03-29 05:00")
    assert latest_slot_ms(MORNING, utc_ms("2026-03-28 06:00")) == utc_ms("2026-03-28 06:00")


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",  # a 30 min DST
         "America/Santiago", "Asia/Kolkata", "Pacific/Chatham", "Europe/Dublin"]
START = utc_ms("2026-01-01 00:00")


@settings(max_examples=150, deadline=None)
@given(hour=st.integers(0, 23), minute=st.integers(0, 59), zone=st.sampled_from(ZONES),
       offset=st.integers(0, 365 * 86_400_000),
       steps=st.lists(st.integers(1, 3 * 86_400_000), min_size=1, max_size=40))
def test_it_is_never_due_twice_for_one_time_and_never_misses_one(
        hour: int, minute: int, zone: str, offset: int, steps: list[int]) -> None:
    entry = digest(f"{hour:02d}:{minute:02d}", zone)
    last = now = START + offset
    first_day = datetime.fromtimestamp(now / 1000, UTC).date() - timedelta(days=2)
    slots = sorted(slot_ms(entry, first_day + timedelta(days=n)) for n in range(
        (sum(steps) // 86_400_000) + 6))
    sent: set[int] = set()
    for step in steps:
        now += step
        due = due_digests([entry], {entry.key: last}, now)
        assert len(due) <= 1
        passed = [s for s in slots if last < s <= now]
        assert bool(due) == bool(passed)  # a time passed since the last: one digest, now
        if due:
            (one,) = due
            assert one.slot_ms == passed[-1]  # the latest time passed, not every one
            assert one.slot_ms not in sent
            sent.add(one.slot_ms)
            last = now  # the scheduler saves when it sent


# -- the message -------------------------------------------------------------------------------

def incident(id_: int, state: IncidentState, *, severity: Severity = Severity.WARNING,
             at_ms: int = 0) -> Incident:
    return Incident(id_, "r", "gw-1", f"dev-{id_}", severity, state, f"summary {id_}", "d",
                    at_ms, None, None, None, None)


def listed_open(body: str) -> list[int]:
    """The incident ids the "Open, not acknowledged" section lists."""
    section = body.split("Open, not acknowledged", 1)[1].split("\n\n", 1)[0]
    return [int(n) for n in re.findall(r"^- #(\d+) ", section, re.MULTILINE)]


def test_it_keeps_each_list_short_for_a_chat_message() -> None:
    many = [incident(n, IncidentState.OPEN) for n in range(1, 31)]
    fleet = FleetNow(offline=tuple((f"gw-{n}", "will") for n in range(25)))
    due = Due(MORNING, 0, 0, late=False)
    title, body = compose(due, now_ms=1, incidents=many, changed=[], fleet=fleet)
    assert title == ("[STATUS] ops-0700: 30 open and unacknowledged, 25 gateway(s) offline, "
                     "0 low batteries")
    assert len(listed_open(body)) == MAX_LISTED
    assert "- and 20 more (careflow incidents list --state open)" in body
    assert "- and 15 more (careflow devices list)" in body
    assert len(body) < 2000


def test_it_tells_the_newest_changes_since_the_last_digest_and_counts_the_earlier() -> None:
    changed = [incident(n, IncidentState.OPEN, at_ms=100 + n) for n in range(1, 16)]
    _, body = compose(Due(MORNING, 50, 0, late=False), now_ms=1_000, incidents=[],
                      changed=changed, fleet=FleetNow())
    section = body.split("Since ", 1)[1]
    told = [int(n) for n in re.findall(r"#(\d+) opened", section)]
    assert told == list(range(6, 16))  # a handover needs the latest, in order
    assert "- and 5 earlier (careflow incidents list --state all)" in section


def test_it_lists_only_open_incidents_whatever_it_is_given() -> None:
    given_ = [incident(1, IncidentState.OPEN), incident(2, IncidentState.ACKNOWLEDGED),
              incident(3, IncidentState.RESOLVED),
              incident(4, IncidentState.OPEN, severity=Severity.CRITICAL, at_ms=5)]
    _, body = compose(Due(MORNING, 0, 0, late=False), now_ms=10, incidents=given_,
                      changed=[], fleet=FleetNow())
    assert listed_open(body) == [4, 1]  # critical first


def test_it_writes_the_digest_from_the_store_with_a_frozen_clock(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    now = [utc_ms("2026-11-29 17:00")]  # the frozen clock: the evening before
    woken: list[int] = []
    entry = digest("07:00", "Europe/Berlin")  # 06:00 UTC in winter
    scheduler = DigestScheduler(store, [entry], clock=lambda: now[0],
                                on_queued=lambda: woken.append(1))
    assert scheduler.run_once() == []  # first seen: scheduled from now, nothing sent
    assert store.cursor(cursor_name(entry)) == now[0]

    def open_(device: str, at: str, severity: str = "warning") -> int:
        opened = store.open_incident(rule="r", gateway="gw-1", device=device, severity=severity,
                                     summary=f"trouble at {device}", detail="d",
                                     at_ms=utc_ms(at))
        assert opened is not None
        return opened

    earlier = open_("old-ack", "2026-11-28 10:00")  # acknowledged before the last digest
    store.acknowledge_incident(earlier, by="bo", at_ms=utc_ms("2026-11-28 11:00"))
    waiting = open_("fall-1", "2026-11-29 22:00", "critical")
    also_waiting = open_("door-2", "2026-11-28 09:00")  # open since before the last digest
    acked = open_("fall-2", "2026-11-29 23:00", "critical")
    store.acknowledge_incident(acked, by="ana", at_ms=utc_ms("2026-11-29 23:05"))
    gone = open_("door-3", "2026-11-30 01:00")
    store.resolve_incident(gone, by="careflow", at_ms=utc_ms("2026-11-30 02:00"))
    gateway, door = Stamper(gateway="gw-1"), Stamper(gateway="gw-1", device="door-9")
    store_event(store, gateway, "heartbeat", {"interval_s": 60}, utc_ms("2026-11-30 05:59"))
    store_event(store, door, "status", {"state": "ok", "battery_pct": 9},
                utc_ms("2026-11-30 05:55"))
    store.append(IncomingBatch([], [], [(PresenceUpdate("gw-2", "offline", 1, "b1", "will"),
                                         utc_ms("2026-11-30 03:00"))]))

    now[0] = utc_ms("2026-11-30 05:59")
    assert scheduler.run_once() == []  # 06:59 in Berlin
    now[0] = utc_ms("2026-11-30 06:00")
    (note_id,) = scheduler.run_once()
    assert woken == [1]
    assert scheduler.run_once() == []  # not twice
    (note,) = store.notifications()
    assert (note.id, note.incident_id, note.channel, note.kind, note.state) == (
        note_id, 0, "ops", "digest", "pending")
    assert store.cursor(cursor_name(entry)) == now[0]

    assert listed_open(note.body) == [waiting, also_waiting]  # exactly the open, unacknowledged
    assert f"#{acked} [" not in note.body and f"#{earlier} [" not in note.body
    assert note.title == ("[STATUS] ops-0700: 2 open and unacknowledged, 1 gateway(s) offline, "
                          "1 low battery")
    assert note.body.startswith("Status at 07:00 (Europe/Berlin)\n")
    assert "Gateways offline (1):\n- gw-2: offline (will)\n" in note.body  # gw-1 is online
    assert "- gw-1/door-9: 9%" in note.body
    # changed since the last digest (18:00 in Berlin): three opened, one acknowledged, one
    # resolved, each in Berlin time; nothing of before it
    assert "Since Sun 29 Nov 18:00: 3 opened, 1 acknowledged, 1 resolved" in note.body
    assert f"- Sun 29 Nov 23:00 #{waiting} opened: trouble at fall-1" in note.body
    assert f"- 00:05 #{acked} acknowledged by ana: trouble at fall-2" in note.body
    assert f"- 03:00 #{gone} resolved by careflow: trouble at door-3" in note.body
    assert f"#{also_waiting} opened" not in note.body and "by bo" not in note.body
    store.close()


def test_a_crash_before_the_commit_leaves_the_digest_due(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    now = [utc_ms("2026-11-29 17:00")]
    entry = digest()
    scheduler = DigestScheduler(store, [entry], clock=lambda: now[0])
    scheduler.run_once()
    now[0] = utc_ms("2026-11-30 06:00") + LATE_AFTER_MS + 1
    store.close()  # every read and write fails from here on, as in a crash mid-way
    with pytest.raises(StoreError, match="closed"):
        scheduler.run_once()
    again = SqliteStore(tmp_path / "db", synchronous="normal")
    (note_id,) = DigestScheduler(again, [entry], clock=lambda: now[0]).run_once()
    (note,) = again.notifications()
    assert note.id == note_id and "late: it was due at 07:00 (was the hub down?)" in note.body
    again.close()


def test_a_hub_refuses_a_digest_to_a_channel_without_a_url(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text('routing:\n  digests:\n'
                                     '    - {at: "07:00", timezone: UTC, channel: night}\n')
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/ops",
                              "CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/oncall"})
    with pytest.raises(ConfigError, match=r"digest 'night-0700' \(.*r.yaml:3\) goes to channel "
                                          r"'night', which has no URL: set CAREFLOW_CHANNEL_NIGHT"):
        build_hub(make_settings(tmp_path / "data", "mqtt://127.0.0.1:9"), lock=None,
                  rules=load_rules([tmp_path]), channels=channels, web=False)


def test_the_shipped_example_loads_once_uncommented(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "rules" / "default.yaml"
    text = re.sub(r"(?m)^  # (digests:|  - |    )", lambda m: "  " + m[1], shipped.read_text())
    (tmp_path / "r.yaml").write_text(text)
    assert [d.key for d in load_rules([tmp_path]).routing.digests] == [
        "morning-handover", "ops-1900"]
    assert load_rules([shipped]).routing.digests == ()  # off as shipped


def test_a_last_sending_ahead_of_the_clock_does_not_stop_the_digests(tmp_path: Path) -> None:
    """A clock that was ahead when a digest went out (set wrong, a bad time source), then put
    right: the digest goes at its next time of day, not once the clock reaches that sending."""
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    now = [utc_ms("2026-11-29 17:00")]
    entry = digest()  # 07:00 Europe/Berlin, 06:00 UTC in winter
    scheduler = DigestScheduler(store, [entry], clock=lambda: now[0])
    scheduler.run_once()
    store.set_cursor(cursor_name(entry), utc_ms("2027-11-29 06:00"))  # sent a year "ahead"
    assert scheduler.run_once() == []  # not due now: 18:00 in Berlin
    now[0] = utc_ms("2026-11-30 06:00")
    (note_id,) = scheduler.run_once()
    assert scheduler.run_once() == []  # once
    (note,) = store.notifications()
    assert note.id == note_id
    assert store.cursor(cursor_name(entry)) == now[0]
    store.close()


def test_careflow_status_says_when_digests_cannot_be_queued(tmp_path: Path) -> None:
    """A failing check is logged and tried again; the health report carries it, so
    `careflow status` tells the operator the handovers stopped."""
    data = tmp_path / "data"
    data.mkdir()
    broken = SqliteStore(data / "careflow.db", synchronous="normal")
    broken.close()  # the scheduler's connection: every check fails
    scheduler = DigestScheduler(broken, [digest()], check_s=0.02)
    scheduler.start()
    try:
        wait_until(lambda: scheduler.errors >= 2, what="checks failing")
        status = scheduler.status()
    finally:
        scheduler.stop()
    assert status["failing_since_ms"] is not None and "closed" in status["last_error"]
    store = SqliteStore(data / "careflow.db", synchronous="normal")
    store.write_health({"connected": True, "digests": status})
    store.close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data), "COLUMNS": "200"}
    shown = subprocess.run(careflow_cmd("status"), env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert "status digests cannot be queued" in shown.stdout, shown.stdout + shown.stderr
    as_json = subprocess.run(careflow_cmd("status", "--json"), env=env, capture_output=True,
                             text=True, timeout=60, check=False)
    report = json.loads(as_json.stdout)
    assert report["digests_errors"] >= 2
    assert report["digests_failing_since_ms"] == status["failing_since_ms"]


def test_every_digest_repeats_the_rules_muted_or_disabled_while_in_force(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    now = [utc_ms("2026-11-29 17:00")]
    entry = digest("07:00", "Europe/Berlin")
    scheduler = DigestScheduler(store, [entry], clock=lambda: now[0], severities={
        "battery-low": "warning", "error-burst": "warning", "care-alarm": "critical"})
    scheduler.run_once()
    store.set_rule_control("battery-low", kind="muted", until_ms=utc_ms("2026-11-30 09:00"),
                           by="ana", reason="cells swapped", at_ms=now[0])
    store.set_rule_control("error-burst", kind="disabled", until_ms=None, by="bo",
                           reason="firmware 2.3", at_ms=now[0])
    store.set_rule_control("care-alarm", kind="disabled", until_ms=None, by="x",
                           reason="never in force", at_ms=now[0])  # the hub ignores it
    now[0] = utc_ms("2026-11-30 06:00")
    scheduler.run_once()
    now[0] = utc_ms("2026-12-01 06:00")  # the next morning: the mute is over
    scheduler.run_once()
    first, second = sorted(store.notifications(), key=lambda n: n.id)
    assert ("Rules muted or disabled (2): their incidents are not announced\n"
            "- battery-low muted until 2026-11-30 09:00 UTC by ana: cells swapped\n"
            "- error-burst disabled by bo: firmware 2.3\n") in first.body
    assert "care-alarm" not in first.body
    assert "Rules muted or disabled (1)" in second.body and "battery-low" not in second.body
    store.close()


def test_a_rule_control_row_it_cannot_read_stops_no_digest(tmp_path: Path) -> None:
    """One row of rule_controls of a kind this version does not know (a newer hub's, or one
    edited by hand) failed every digest at every check, for ever; it is left out (logged),
    the rules it would quiet are announced, and the others are still listed."""
    store = SqliteStore(tmp_path / "db", synchronous="normal")
    now = [utc_ms("2026-11-29 17:00")]
    scheduler = DigestScheduler(store, [digest("07:00", "Europe/Berlin")],
                                clock=lambda: now[0], severities={
                                    "battery-low": "warning", "error-burst": "warning"})
    scheduler.run_once()
    store.set_rule_control("error-burst", kind="disabled", until_ms=None, by="bo",
                           reason="firmware 2.3", at_ms=now[0])
    with sqlite3.connect(tmp_path / "db") as conn:
        conn.execute("INSERT INTO rule_controls VALUES ('battery-low', 'snoozed', NULL, 'x', "
                     "'a newer kind', ?)", (now[0],))
    conn.close()
    now[0] = utc_ms("2026-11-30 06:00")
    assert len(scheduler.run_once()) == 1
    body = store.notifications()[0].body
    assert "- error-burst disabled by bo: firmware 2.3" in body
    assert "battery-low" not in body
    assert scheduler.errors == 0
    store.close()
