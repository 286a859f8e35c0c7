"""Hostile input: hypothesis strategies that every careflow parser must survive.

Shared by the tests of every side that reads untrusted bytes (hub ingest and its decode worker,
the gateway's spool, the provisioning claim handler). Import the strategies; keep the
assertions where the parser under test lives. What a parser must do with any of these: never
raise, never hang, and end as accepted or refused with a reason.

Depth and size are built as text, not as nested Python values: building (or ``json.dumps``-ing)
a 100,000-deep value would itself exhaust the recursion limit of the test.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from careflow.schemas.limits import (
    MAX_BATCH_EVENTS,
    MAX_DATA_DEPTH,
    MAX_EVENT_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_DEPTH,
)

__all__ = [
    "HOSTILE_DEPTHS",
    "batch_payloads",
    "deep_data",
    "event_at_size",
    "events",
    "hostile_event_payloads",
    "hostile_messages",
    "hostile_payloads",
    "json_depth",
    "nan_infinity_payloads",
    "nested_json",
    "non_utf8_payloads",
    "sized_event_payloads",
    "uuid7s",
]

# Depths around the contract's limit, around Python's recursion limit (1000), and far beyond.
HOSTILE_DEPTHS = (MAX_DATA_DEPTH - 1, MAX_DATA_DEPTH, MAX_DATA_DEPTH + 1, MAX_PAYLOAD_DEPTH,
                  MAX_PAYLOAD_DEPTH + 1, 100, 500, 900, 950, 990, 1000, 1010, 3000, 100_000)

_NAMES = st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,11}\Z")
_TIMES = st.datetimes(allow_imaginary=False).map(lambda t: t.isoformat(timespec="milliseconds")
                                                 + "Z")


def nested_json(depth: int, *, leaf: str = "1", shape: str = "object") -> str:
    """JSON text nesting ``depth`` levels (objects, arrays, or alternating) around ``leaf``.

    ``depth`` counts containers as the contract does: ``{"a": 1}`` is depth 1, ``1`` is 0.
    """
    opens: list[str] = []
    closes: list[str] = []
    for level in range(depth):
        as_array = shape == "array" or (shape == "mixed" and level % 2)
        opens.append("[" if as_array else '{"a":')
        closes.append("]" if as_array else "}")
    return "".join(opens) + leaf + "".join(reversed(closes))


def json_depth(value: Any) -> int:
    """Containers around the deepest leaf of a decoded JSON value, walked without recursion.

    Counts as the contract does: ``{"a": 1}`` is depth 1, ``1`` is 0.
    """
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((child, level) for child in (
                item.values() if isinstance(item, dict) else item))
    return deepest


@st.composite
def uuid7s(draw: st.DrawFn) -> str:
    """A lowercase UUIDv7, as the contract wants event ids."""
    hexes = f"{draw(st.integers(0, 2**122 - 1)):031x}"
    variant = "89ab"[draw(st.integers(0, 3))]
    return f"{hexes[:8]}-{hexes[8:12]}-7{hexes[12:15]}-{variant}{hexes[15:18]}-{hexes[18:30]}"


@st.composite
def events(draw: st.DrawFn, *, gateway: str = "gw-1", device: str | None = None,
           data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid contract-v1 heartbeat of ``gateway`` (its own, or ``device``'s)."""
    return {
        "v": 1,
        "id": draw(uuid7s()),
        "type": "heartbeat",
        "gateway": gateway,
        "device": device or draw(st.sampled_from([gateway, "s-1", "door-2"])),
        "time": draw(_TIMES),
        "boot": draw(_NAMES),
        "seq": draw(st.integers(1, 2**53 - 1)),
        "data": {"interval_s": 60} if data is None else data,
    }


def _with_data_text(event: dict[str, Any], data_text: str) -> str:
    """The event as JSON text with ``data`` replaced by raw JSON text (which may be huge)."""
    marker = '"__DATA__"'
    return json.dumps({**event, "data": "__DATA__"}).replace(marker, data_text, 1)


@st.composite
def deep_data(draw: st.DrawFn, *, depths: tuple[int, ...] = HOSTILE_DEPTHS) -> str:
    """The text of a ``data`` object nesting one of ``depths`` levels (``data`` itself counts)."""
    depth = draw(st.sampled_from(depths))
    shape = draw(st.sampled_from(["object", "array", "mixed"]))
    inner = nested_json(max(depth - 1, 0), shape=shape)
    return '{"interval_s": 60, "x": ' + inner + "}"


@st.composite
def hostile_event_payloads(draw: st.DrawFn, *, gateway: str = "gw-1") -> tuple[dict[str, Any],
                                                                             bytes]:
    """A valid envelope (returned too, for its topic) whose data nests to a hostile depth."""
    event = draw(events(gateway=gateway))
    return event, _with_data_text(event, draw(deep_data())).encode()


def nan_infinity_payloads() -> st.SearchStrategy[bytes]:
    """Events with NaN, Infinity, overflowing floats or integers too long to parse."""
    token = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000,
                             "1" + "0" * 400, "0." + "0" * 400 + "1"])
    return st.builds(lambda event, tok, where: (
        _with_data_text(event, '{"interval_s": ' + tok + "}") if where == "data"
        else json.dumps(event).replace('"v": 1', '"v": ' + tok, 1)).encode(),
        events(), token, st.sampled_from(["data", "envelope"]))


@st.composite
def non_utf8_payloads(draw: st.DrawFn) -> bytes:
    """An otherwise valid event with bytes that are not UTF-8 (or UTF-8 the contract refuses)."""
    body = json.dumps(draw(events())).encode()
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                b"\x80", b"\xe2\x82"]))
    where = draw(st.integers(0, len(body)))
    if draw(st.booleans()):
        return b"\xef\xbb\xbf" + body  # a byte-order mark before valid JSON
    return body[:where] + bad + body[where:]


def event_at_size(event: dict[str, Any], size: int) -> bytes:
    """``event`` padded (in ``data.pad``) so its JSON is exactly ``size`` bytes, where it can be."""
    bare = len(json.dumps({**event, "data": {**event["data"], "pad": ""}}).encode())
    return json.dumps({**event, "data": {**event["data"], "pad": "x" * max(size - bare, 0)}}
                      ).encode()


@st.composite
def sized_event_payloads(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """Events sized just below, at and above MAX_EVENT_BYTES and MAX_MESSAGE_BYTES."""
    limit = draw(st.sampled_from([MAX_EVENT_BYTES, MAX_MESSAGE_BYTES]))
    size = limit + draw(st.sampled_from([-1, 0, 1, 1024]))
    event = draw(events())
    return event, event_at_size(event, size)


@st.composite
def batch_payloads(draw: st.DrawFn, *, gateway: str = "gw-1") -> tuple[list[str], bytes]:
    """A batch mixing valid events with deep, malformed and foreign items, sometimes more than
    MAX_BATCH_EVENTS of them. Returns the items' texts and the payload."""
    def item() -> st.SearchStrategy[str]:
        valid = events(gateway=gateway).map(json.dumps)
        deep = st.builds(_with_data_text, events(gateway=gateway), deep_data())
        foreign = events(gateway="gw-other").map(json.dumps)
        junk = st.sampled_from(["1", "null", '"text"', "[]", "{}", nested_json(3000),
                                nested_json(MAX_PAYLOAD_DEPTH, shape="array")])
        return st.one_of(valid, valid, deep, foreign, junk)
    count = draw(st.one_of(st.integers(0, 8), st.sampled_from([MAX_BATCH_EVENTS,
                                                               MAX_BATCH_EVENTS + 1])))
    if count > 8:  # large batches: a few hostile items among many copies of one valid event
        base = draw(events(gateway=gateway))
        texts = [json.dumps({**base, "seq": index + 1}) for index in range(count)]
        for index in draw(st.lists(st.integers(0, count - 1), max_size=3)):
            texts[index] = draw(item())
    else:
        texts = [draw(item()) for _ in range(count)]
    separator = draw(st.sampled_from([",", ", ", " ,\n "]))
    return texts, ("[" + separator.join(texts) + "]").encode()


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    """Any hostile payload for an event topic of gw-1, whatever its kind."""
    return draw(st.one_of(
        hostile_event_payloads().map(lambda pair: pair[1]),
        nan_infinity_payloads(),
        non_utf8_payloads(),
        sized_event_payloads().map(lambda pair: pair[1]),
        st.sampled_from([b"", b" ", b"{", b"[", b"\x00", nested_json(5000).encode(),
                         nested_json(MAX_PAYLOAD_DEPTH + 1, shape="array").encode(),
                         ("[" * 100_000).encode(), ("{\"a\":" * 100_000).encode()]),
        st.binary(max_size=512),
    ))


@st.composite
def hostile_messages(draw: st.DrawFn, *, gateway: str = "gw-1") -> tuple[str, bytes]:
    """(topic, payload): a hostile payload on any topic the hub subscribes to, or a bad topic."""
    kind = draw(st.sampled_from(["event", "batch", "state", "topic"]))
    if kind == "batch":
        return f"careflow/v1/{gateway}/batch", draw(batch_payloads(gateway=gateway))[1]
    if kind == "state":
        deep = '{"v": 1, "state": "online", "conn": 1, "boot": "b", "x": ' + \
            nested_json(draw(st.sampled_from(HOSTILE_DEPTHS))) + "}"
        return f"careflow/v1/{gateway}/state", draw(st.one_of(
            st.just(deep.encode()), hostile_payloads()))
    if kind == "topic":
        topic = draw(st.sampled_from(["careflow/v1", "careflow/v1/+/x/y", "careflow/v2/gw-1/batch",
                                      "careflow/v1/" + "a" * 70 + "/s/heartbeat", ""]))
        return topic, draw(hostile_payloads())
    return f"careflow/v1/{gateway}/s-1/heartbeat", draw(hostile_payloads())
