"""The gateway outbox against a real SQLite file: stamping once, the bound, confirmations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.errors import ContractError
from careflow.edge.outbox import Outbox
from careflow.edge.spool import SpoolInput
from careflow.schemas.limits import MAX_DATA_DEPTH, MAX_EVENT_BYTES


def outbox(tmp_path: Path, boot: str = "boot-a", **kw: Any) -> Outbox:
    return Outbox(tmp_path / "outbox.db", gateway="gw-1", boot=boot, **kw)


def test_it_stamps_each_source_with_rising_seq_within_a_boot(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    seqs = [box.add(dev, "heartbeat", {"interval_s": 60})["seq"]
            for dev in ["gw-1", "s1", "gw-1", "s1", "gw-1"]]
    assert seqs == [1, 1, 2, 2, 3]
    box.close()
    after_restart = outbox(tmp_path, boot="boot-b")
    assert after_restart.add("gw-1", "heartbeat", {"interval_s": 60})["seq"] == 1
    assert after_restart.size() == 6


def test_it_keeps_events_until_the_hub_confirms_them(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    events = [box.add("gw-1", "heartbeat", {"interval_s": 60}) for _ in range(5)]
    due = box.due(now_ms=1_000_000, resend_after_ms=30_000, limit=100)
    assert [json.loads(p.body)["id"] for p in due] == [e["id"] for e in events]
    box.mark_sent(due, now_ms=1_000_000)
    assert box.due(now_ms=1_010_000, resend_after_ms=30_000, limit=100) == []
    assert len(box.due(now_ms=1_031_000, resend_after_ms=30_000, limit=100)) == 5
    assert box.confirm([events[0]["id"], events[2]["id"], "unknown-id"]) == 2
    assert box.size() == 3
    box.resend_all()
    assert len(box.due(now_ms=1_010_000, resend_after_ms=30_000, limit=100)) == 3


def test_it_refuses_events_the_hub_would_reject(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    with pytest.raises(ContractError, match=r"data\.state"):
        box.add("s1", "status", {"state": "great"})
    assert box.size() == 0
    assert box.add("s1", "status", {"state": "ok"})["seq"] == 1  # no seq was burnt


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(types=st.lists(st.sampled_from(["heartbeat", "status", "alert", "error"]), min_size=1,
                      max_size=40))
def test_it_never_drops_a_care_alarm_and_drops_heartbeats_first(tmp_path: Path,
                                                                  types: list[str]) -> None:
    db = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    box = Outbox(db / "outbox.db", gateway="gw-1", boot="b", max_events=10)
    data = {"heartbeat": {"interval_s": 60}, "status": {"state": "ok"},
            "alert": {"kind": "fall", "state": "raised"}, "error": {"code": "E", "message": "m"}}
    for event_type in types:
        box.add("s1", event_type, data[event_type])
    kept = [json.loads(p.body)["type"] for p in box.due(now_ms=0, resend_after_ms=0, limit=100)]
    assert kept.count("alert") == types.count("alert")
    assert len(kept) == max(10, types.count("alert")) if len(types) > 10 else len(kept) == len(types)
    dropped = box.take_dropped()
    assert sum(dropped.values()) == len(types) - len(kept)
    if dropped.get("status") or dropped.get("error"):
        assert "heartbeat" not in kept  # heartbeats went first
    box.close()


def test_it_reads_a_spool_file_once_even_across_a_crash(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    lines = [json.dumps({"device": f"s{i}", "type": "status", "data": {"state": "ok"}})
             for i in range(5)]
    (spool / "a.jsonl").write_text("\n".join(lines[:3]) + "\nnot json\n" + "\n".join(lines[3:]))
    # A crash after two lines: their progress mark was saved with them.
    for number, line in enumerate(lines[:2], start=1):
        reading = json.loads(line)
        box.add(reading["device"], "status", reading["data"], mark=("spool:a.jsonl", str(number)))
    report = SpoolInput(spool, box).scan()
    assert (report.queued, report.invalid) == (3, 1)
    assert box.size() == 6  # the five readings and the report of the refused line
    events = [json.loads(p.body) for p in box.due(now_ms=0, resend_after_ms=0, limit=10)]
    assert sorted(e["device"] for e in events if e["type"] == "status") == [
        f"s{i}" for i in range(5)]
    assert [e["data"]["source"] for e in events if e["type"] == "error"] == [
        "spool a.jsonl line 4"]
    assert not (spool / "a.jsonl").exists()
    assert box.marks("spool:") == {}


def test_it_gives_care_alarms_first_whatever_waits_before_them(tmp_path: Path) -> None:
    box = outbox(tmp_path, synchronous="normal")
    for _ in range(3_000):
        box.add("gw-1", "heartbeat", {"interval_s": 60})
    alarm = box.add("sos-1", "alert", {"kind": "sos", "state": "raised"})
    due = box.due(now_ms=1_000_000, resend_after_ms=30_000, limit=100)
    assert due[0].id == alarm["id"] and len(due) == 101
    box.mark_sent(box.due(now_ms=1_000_000, resend_after_ms=30_000, limit=10_000),
                  now_ms=1_000_000)
    box.resend_all()  # after an outage everything is due again: the alarm still goes first
    assert box.due(now_ms=1_000_001, resend_after_ms=30_000, limit=100)[0].id == alarm["id"]
    later = box.add("fall-1", "alert", {"kind": "fall", "state": "raised"})
    assert [p.id for p in box.due(now_ms=1_000_002, resend_after_ms=30_000, limit=5)[:2]] == [
        alarm["id"], later["id"]]


@pytest.mark.parametrize(("data", "code"), [
    ({"state": "ok", "blob": "x" * MAX_EVENT_BYTES}, "oversized"),
    ({"state": "ok", "blob": "é" * (MAX_EVENT_BYTES // 5)}, "oversized"),  # \\u00e9 on the wire
    ({"state": "ok", "deep": json.loads("[" * MAX_DATA_DEPTH + "]" * MAX_DATA_DEPTH)}, "too_deep"),
    ({"state": "ok", "v": float("nan")}, "not_json"),
    ({"state": "ok", "v": float("inf")}, "not_json"),
])
def test_it_refuses_events_over_the_contracts_limits(tmp_path: Path, data: dict[str, object],
                                                    code: str) -> None:
    box = outbox(tmp_path)
    with pytest.raises(ContractError) as refused:
        box.add("s1", "status", data)
    assert refused.value.code == code
    assert box.size() == 0
    assert box.add("s1", "status", {"state": "ok"})["seq"] == 1  # no seq was burnt


def test_it_takes_the_deepest_and_largest_event_the_contract_allows(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    deep = json.loads("[" * (MAX_DATA_DEPTH - 1) + "]" * (MAX_DATA_DEPTH - 1))
    box.add("s1", "status", {"state": "ok", "deep": deep})
    event = box.add("s1", "status", {"state": "ok", "blob": ""})
    room = MAX_EVENT_BYTES - len(json.dumps(event))
    box.add("s1", "status", {"state": "ok", "blob": "x" * room})
    assert box.size() == 3
    assert max(len(p.body) for p in box.due(now_ms=0, resend_after_ms=0, limit=5)) == (
        MAX_EVENT_BYTES)


def test_it_never_drops_the_report_of_a_refused_care_alarm(tmp_path: Path) -> None:
    box = outbox(tmp_path, max_events=3)
    alarm_report = {"code": "E_EVENT_REFUSED", "message": "m", "severity": "critical",
                    "refused_type": "alert", "line": '{"type": "alert"}'}
    look_alike = {"code": "E_EVENT_REFUSED", "message": "m", "refused_type": "status",
                  "line": '{"refused_type": "alert"}'}  # says it in its excerpt only
    kept = box.add("gw-1", "error", alarm_report)
    box.add("gw-1", "error", look_alike)
    for _ in range(5):
        box.add("gw-1", "error", {"code": "E", "message": "m"})
    ids = [p.id for p in box.due(now_ms=0, resend_after_ms=0, limit=10)]
    assert len(ids) == 3 and ids[0] == kept["id"]
    assert box.take_dropped() == {"error": 4}


def test_what_is_due_is_bounded_in_bytes_as_well_as_in_count(tmp_path: Path) -> None:
    """Valid readings near MAX_EVENT_BYTES (a hostile sensor's, or a camera bridge's): 2,000 of
    them due at once were loaded every round of the agent (123 MB on a gateway with 512 MB) to
    send one message's worth. Each lane is cut after ``max_bytes``, and never to nothing."""
    box = outbox(tmp_path, synchronous="off")
    blob = "z" * (MAX_EVENT_BYTES - 1_000)
    for n in range(40):
        box.add(f"s{n}", "status", {"state": "ok", "blob": blob})
        box.add(f"sos-{n}", "alert", {"kind": "sos", "state": "raised", "note": blob[:20_000]})
    budget = 4 * MAX_EVENT_BYTES

    due = box.due(now_ms=0, resend_after_ms=0, limit=2_000, max_bytes=budget)

    alerts = [p for p in due if p.type == "alert"]
    others = [p for p in due if p.type != "alert"]
    assert [json.loads(p.body)["device"] for p in alerts][:3] == ["sos-0", "sos-1", "sos-2"]
    assert [json.loads(p.body)["device"] for p in others] == [f"s{n}" for n in range(len(others))]
    for lane in (alerts, others):
        assert sum(len(p.body) for p in lane[:-1]) < budget <= sum(len(p.body) for p in lane)
    assert box.due(now_ms=0, resend_after_ms=0, limit=2_000, max_bytes=1)[0].type == "alert"
    assert len(box.due(now_ms=0, resend_after_ms=0, limit=2_000, max_bytes=1)) == 2


def test_the_gateways_newest_heartbeat_survives_an_outbox_full_of_care_alarms(
    tmp_path: Path,
) -> None:
    """Care alarms are never dropped, so an outbox at its bound with alarms (a flood while the
    hub is away) dropped every new heartbeat of the gateway as it was queued: the hub declared
    a gateway offline that was flooding it with alarms. The newest one is kept (the bound + 1)."""
    box = outbox(tmp_path, max_events=5)
    for n in range(5):
        box.add(f"sos-{n}", "alert", {"kind": "sos", "state": "raised"})
    first = box.add("gw-1", "heartbeat", {"interval_s": 60})
    for _ in range(3):  # readings of sensors go on arriving, and make room first
        box.add("s1", "heartbeat", {"interval_s": 60})

    def heartbeats() -> list[str]:
        return [json.loads(p.body)["id"] for p in box.due(now_ms=0, resend_after_ms=0, limit=20)
                if p.type == "heartbeat"]

    assert heartbeats() == [first["id"]]
    second = box.add("gw-1", "heartbeat", {"interval_s": 60})
    assert heartbeats() == [second["id"]]
    assert box.size() == 6
    assert box.take_dropped() == {"heartbeat": 4}
