"""The gateway's pure refusal decisions: batch packing, stored bodies, report size."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from careflow.core.errors import ContractError
from careflow.edge.refusal import (
    pack_batches,
    refusal_report,
    sniff_type,
    undeliverable_reason,
    unreadable_report,
)
from careflow.edge.stamper import Stamper
from careflow.schemas import parse_event
from careflow.schemas.limits import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_MESSAGE_BYTES


@settings(max_examples=300)
@given(sizes=st.lists(st.integers(min_value=1, max_value=MAX_EVENT_BYTES), max_size=400),
       max_events=st.integers(min_value=1, max_value=MAX_BATCH_EVENTS))
def test_it_packs_every_item_once_in_order_into_messages_within_the_limits(
    sizes: list[int], max_events: int,
) -> None:
    runs = pack_batches(sizes, max_events=max_events, max_bytes=MAX_MESSAGE_BYTES)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    for run in runs:
        assert 1 <= len(run) <= max_events
        assert 2 + sum(sizes[i] for i in run) + len(run) - 1 <= MAX_MESSAGE_BYTES
    for first, second in itertools.pairwise(runs):  # no run could have taken more
        grown = 2 + sum(sizes[i] for i in first) + len(first) + sizes[second.start]
        assert len(first) == max_events or grown > MAX_MESSAGE_BYTES


def test_it_packs_by_bytes_not_only_by_count() -> None:
    sizes = [20_000] * 100  # 100 events, 2 MB: one message by count, eleven by bytes
    runs = pack_batches(sizes, max_events=100, max_bytes=MAX_MESSAGE_BYTES)
    assert [len(run) for run in runs] == [13] * 7 + [9]


def test_it_finds_stored_bodies_the_hub_would_refuse() -> None:
    event = Stamper(gateway="gw-1").stamp("heartbeat", {"interval_s": 60})
    body = json.dumps(event)
    assert undeliverable_reason(body) is None
    assert _code(body.replace('"interval_s": 60', '"interval_s": NaN')) == "not_json"
    assert _code(json.dumps({**event, "data": {"interval_s": 60, "x": "y" * MAX_EVENT_BYTES}})) == (
        "oversized")
    deep = "[" * 40 + "]" * 40
    assert _code(body.replace('"interval_s": 60', f'"interval_s": 60, "d": {deep}')) == "too_deep"
    nan_in_text = json.dumps({**event, "data": {"interval_s": 60, "note": "NaN, Infinity"}})
    assert undeliverable_reason(nan_in_text) is None


def _code(body: str) -> str | None:
    problem = undeliverable_reason(body)
    return None if problem is None else problem.code


@settings(max_examples=200)
@given(text=st.text(min_size=1, max_size=5_000), device=st.one_of(st.none(), st.text()),
       refused_type=st.one_of(st.none(), st.sampled_from(["alert", "status"]), st.text()),
       reason=st.text(max_size=10_000), size=st.integers(min_value=1, max_value=10**12))
def test_a_refusal_report_is_always_a_small_valid_error_event(
    text: str, device: str | None, refused_type: str | None, reason: str, size: int,
) -> None:
    data = refusal_report(text=text, size=size, reason=ContractError("schema", reason),
                          source="spool a.jsonl line 1", refused_type=refused_type,
                          refused_device=device)
    event = Stamper(gateway="gw-1").stamp("error", data)
    parse_event(event)
    assert len(json.dumps(event)) < MAX_EVENT_BYTES
    assert (data["severity"] == "critical") == (refused_type == "alert")


def test_it_recognises_a_care_alarm_in_a_line_it_could_not_parse() -> None:
    assert sniff_type(None, '{"device": "sos-1", "type": "alert", "data": {"x": "' + "y" * 10) == (
        "alert")
    assert sniff_type({"type": " ALERT "}, "") == "alert"
    assert sniff_type(None, "garbage") is None


_BROKEN = '{"device": "sos-1", "data": {"kind": "sos", "state": "raised", "x": "y'  # cut short


@pytest.mark.parametrize(("value", "text"), [
    (None, '{"device": "sos-1", "data": {"kind": "sos", "message": "' + "m" * 5_000
     + '"}, "type": "alert", "x": '),
    (None, '{"device": "sos-1", "data": {"type": "fall-v2"}, "type": "alert", "x": '),
    (None, _BROKEN),
    (None, '[{"device": "sos-1", "type": "alert", "data": {"kind": "sos"}}]'),
    ({"device": "sos-1", "data": {"kind": "sos", "state": "raised"}}, ""),
    ({"device": "sos-1", "type": "alarm", "data": {"kind": "sos", "state": "Raised"}}, ""),
    ({"device": "sos-1", "type": ["alert"], "data": {"kind": "sos", "state": "raised"}}, ""),
], ids=["type-after-4000-chars", "type-inside-data-first", "no-type-state-raised", "an-array",
        "no-type", "type-alarm", "type-not-a-string"])
def test_it_recognises_a_mangled_care_alarm(value: object, text: str) -> None:
    """A refused line that meant to be a care alarm must be reported critical (the rule
    refused-care-alarm keys on it): a type it does not say, or says wrong, or says late."""
    assert sniff_type(value, text) == "alert"


@pytest.mark.parametrize(("value", "text", "expected"), [
    ({"device": "s1", "type": "status", "data": {"state": "raised"}}, "", "status"),
    (None, '{"device": "s1", "type": "status", "data": {"state": "ok", "x": "y', "status"),
    ({"device": "s1", "type": "heartbeat", "data": {"interval_s": "x"}}, "", "heartbeat"),
    ({"device": "s1", "type": "reading", "data": {"state": "ok"}}, "", "reading"),
    (None, "garbage", None),
])
def test_it_does_not_take_a_refused_reading_for_a_care_alarm(
    value: object, text: str, expected: str | None,
) -> None:
    assert sniff_type(value, text) == expected


_anything = st.text(alphabet=st.characters(blacklist_categories=()), max_size=3_000)


@settings(max_examples=150, deadline=None)
@given(text=_anything, device=st.one_of(st.none(), _anything), reason=_anything,
       name=_anything.filter(bool), refused_type=st.one_of(st.none(), _anything))
def test_reports_stay_valid_and_storable_whatever_they_carry(
    tmp_path_factory: pytest.TempPathFactory, text: str, device: str | None, reason: str,
    name: str, refused_type: str | None,
) -> None:
    """Lone surrogates (a non-UTF-8 file name, a JSON escape), NUL and control characters in
    every field a report copies: it is still a valid, small event the outbox can store."""
    from careflow.edge.outbox import Outbox  # noqa: PLC0415 - a real SQLite outbox

    box = Outbox(tmp_path_factory.mktemp("o") / "outbox.db", gateway="gw-1", boot="b",
                 synchronous="off")
    reports = [
        refusal_report(text=text, size=len(text), reason=ContractError("schema", reason),
                       source=f"spool {name} line 1", refused_type=refused_type,
                       refused_device=device),
        unreadable_report(name=name, reason=reason, lines_read=3,
                          quarantined_to=f"quarantine/{name}"),
    ]
    for data in reports:
        event = box.add("gw-1", "error", data)
        parse_event(event)
    for pending in box.due(now_ms=0, resend_after_ms=0, limit=10):
        assert len(pending.body) <= MAX_EVENT_BYTES
        pending.body.encode("utf-8")  # storable and sendable as it is
    box.close()
