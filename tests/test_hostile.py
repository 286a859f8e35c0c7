"""The hostile-input strategies build what they claim (tests/hostile.py is shared by every side)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from careflow.schemas import parse_event
from careflow.schemas.limits import MAX_EVENT_BYTES, MAX_MESSAGE_BYTES
from tests.hostile import (
    batch_payloads,
    event_at_size,
    events,
    hostile_messages,
    json_depth,
    nested_json,
    non_utf8_payloads,
)


@given(st.integers(0, 40), st.sampled_from(["object", "array", "mixed"]))
def test_it_nests_json_exactly_as_deep_as_asked(levels: int, shape: str) -> None:
    assert json_depth(json.loads(nested_json(levels, shape=shape))) == levels


@given(events())
def test_it_builds_events_the_contract_accepts(event: dict[str, Any]) -> None:
    parse_event(event)


@given(events(), st.sampled_from([MAX_EVENT_BYTES, MAX_MESSAGE_BYTES]), st.integers(-2, 2))
def test_it_sizes_events_to_the_byte(event: dict[str, Any], limit: int, delta: int) -> None:
    payload = event_at_size(event, limit + delta)
    assert len(payload) == limit + delta
    parse_event(json.loads(payload))


@given(non_utf8_payloads())
def test_it_makes_payloads_that_are_not_utf8_json(payload: bytes) -> None:
    try:
        json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return
    raise AssertionError(payload)


@given(batch_payloads())
def test_it_joins_batch_items_into_one_array(batch: tuple[list[str], bytes]) -> None:
    texts, payload = batch
    assert payload.startswith(b"[") and payload.endswith(b"]")
    assert all(text.encode() in payload for text in texts)


@given(hostile_messages())
def test_it_makes_messages_with_a_topic_and_bytes(message: tuple[str, bytes]) -> None:
    topic, payload = message
    assert isinstance(topic, str) and isinstance(payload, bytes)
