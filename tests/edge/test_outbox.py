"""The gateway outbox against a real SQLite file: stamping once, the bound, confirmations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.edge.outbox import Outbox
from careflow.edge.spool import SpoolInput
from careflow.errors import ContractError


def outbox(tmp_path: Path, boot: str = "boot-a", **kw: int) -> Outbox:
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
    assert box.size() == 5
    assert sorted(json.loads(p.body)["device"] for p in
                  box.due(now_ms=0, resend_after_ms=0, limit=10)) == [f"s{i}" for i in range(5)]
    assert not (spool / "a.jsonl").exists()
    assert box.marks("spool:") == {}
