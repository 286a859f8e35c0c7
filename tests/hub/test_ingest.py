"""Pure decoding: every way a message can be wrong becomes a rejection with a reason."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import decode_message
from careflow.schemas.limits import MAX_BATCH_EVENTS
from tests.conftest import heartbeat

LIMIT = 256 * 1024


def single(event: dict[str, Any]) -> tuple[str, bytes]:
    topic = f"careflow/v1/{event['gateway']}/{event['device']}/{event['type']}"
    return topic, json.dumps(event).encode()


def test_it_accepts_a_valid_single_event() -> None:
    event = heartbeat(Stamper(gateway="gw-1", device="s-1", boot="b"), battery_pct=50)
    decoded = decode_message(*single(event), max_bytes=LIMIT)
    assert [a.event.id for a in decoded.accepted] == [event["id"]]
    assert decoded.accepted[0].data == {"interval_s": 60, "battery_pct": 50}
    assert decoded.rejected == ()


def test_it_rejects_a_device_speaking_for_another() -> None:
    event = heartbeat(Stamper(gateway="gw-1", device="s-1", boot="b"))
    _, payload = single(event)
    decoded = decode_message("careflow/v1/gw-1/s-2/heartbeat", payload, max_bytes=LIMIT)
    assert decoded.accepted == ()
    (rejection,) = decoded.rejected
    assert rejection.code == "topic_mismatch"
    assert "s-1" in rejection.reason and "careflow/v1/gw-1/s-2/heartbeat" in rejection.reason


def test_it_rejects_a_type_that_disagrees_with_the_topic() -> None:
    event = heartbeat(Stamper(gateway="gw-1", boot="b"))
    _, payload = single(event)
    decoded = decode_message("careflow/v1/gw-1/gw-1/alert", payload, max_bytes=LIMIT)
    assert decoded.rejected[0].code == "topic_mismatch"


def test_it_rejects_batch_members_from_another_gateway_one_by_one() -> None:
    mine = [heartbeat(Stamper(gateway="gw-1", device=f"s{i}", boot="b")) for i in range(3)]
    theirs = heartbeat(Stamper(gateway="gw-2", boot="b"))
    broken = {**mine[0], "seq": 0}
    payload = json.dumps([mine[0], theirs, mine[1], broken, mine[2]]).encode()
    decoded = decode_message("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT)
    assert [a.event.device for a in decoded.accepted] == ["s0", "s1", "s2"]
    assert [(r.index, r.code) for r in decoded.rejected] == [(1, "topic_mismatch"), (3, "schema")]
    assert json.loads(decoded.rejected[0].payload)["gateway"] == "gw-2"


def test_it_rejects_a_foreign_member_of_an_otherwise_valid_batch_alone() -> None:
    mine = [heartbeat(Stamper(gateway="gw-1", device=f"s{i}", boot="b")) for i in range(2)]
    theirs = heartbeat(Stamper(gateway="gw-2", boot="b"))
    payload = json.dumps([mine[0], theirs, mine[1]]).encode()
    decoded = decode_message("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT)
    assert [a.body for a in decoded.accepted] == [json.dumps(mine[0]), json.dumps(mine[1])]
    assert [(r.index, r.code) for r in decoded.rejected] == [(1, "topic_mismatch")]


def test_it_rejects_each_kind_of_malformed_payload_with_its_code() -> None:
    topic = "careflow/v1/gw-1/gw-1/heartbeat"
    cases = {
        b"\xff\xfe not utf-8": "not_utf8",
        b"{not json": "not_json",
        b'{"v": NaN}': "not_json",
        b"[1, 2]": "schema",
        b'{"v": 2}': "unsupported_version",
    }
    for payload, code in cases.items():
        (rejection,) = decode_message(topic, payload, max_bytes=LIMIT).rejected
        assert rejection.code == code, payload
        assert rejection.payload == payload


def test_it_rejects_a_batch_that_is_not_an_array() -> None:
    (rejection,) = decode_message("careflow/v1/gw-1/batch", b"{}", max_bytes=LIMIT).rejected
    assert rejection.code == "schema" and "array" in rejection.reason


def test_it_rejects_oversized_messages_before_parsing_them() -> None:
    payload = b"[" + b" " * 300_000 + b"]"
    (rejection,) = decode_message("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT).rejected
    assert rejection.code == "oversized"
    assert "CAREFLOW_MAX_MESSAGE_BYTES" in rejection.reason


def test_it_rejects_topics_outside_the_contract() -> None:
    (rejection,) = decode_message("careflow/v1/gw-1/a/b/c", b"{}", max_bytes=LIMIT).rejected
    assert rejection.code == "bad_topic"


@settings(max_examples=400)
@given(topic=st.one_of(st.just("careflow/v1/gw-1/batch"), st.just("careflow/v1/gw-1/gw-1/status"),
                       st.text(max_size=40)),
       payload=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_it_never_raises_on_arbitrary_bytes(topic: str, payload: bytes) -> None:
    decoded = decode_message(topic, payload, max_bytes=LIMIT)
    assert len(decoded.accepted) + len(decoded.rejected) >= 1 or payload.strip() == b"[]"
    for rejection in decoded.rejected:
        assert rejection.reason and rejection.code


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(),
              st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300)
@given(value=json_values)
def test_it_never_raises_on_arbitrary_json_in_a_batch(value: Any) -> None:
    payload = json.dumps([value, value]).encode()
    decoded = decode_message("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT)
    assert len(decoded.rejected) + len(decoded.accepted) == 2


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400 + ".0"])
def test_a_number_too_large_for_a_float_is_refused_like_infinity(number: str) -> None:
    """The finding: NaN and Infinity were refused, but 1e400 decoded to inf and was accepted
    (in uptime_s, or any extra data key), then written back out as ``Infinity``, which is not
    JSON (``careflow events --json``). In a batch only its own item is refused."""
    stamper = Stamper(gateway="gw-1", device="s-1", boot="b")
    event = heartbeat(stamper, uptime_s="NUMBER")
    text = json.dumps(event).replace('"NUMBER"', number)
    (rejection,) = decode_message("careflow/v1/gw-1/s-1/heartbeat", text.encode(),
                                  max_bytes=LIMIT).rejected
    assert rejection.code == "not_json"
    honest = json.dumps(heartbeat(stamper))
    batch = f"[{honest}, {text}, {honest.replace('s-1', 's-2')}]".encode()
    decoded = decode_message("careflow/v1/gw-1/batch", batch, max_bytes=LIMIT)
    assert [(r.index, r.code) for r in decoded.rejected] == [(1, "not_json")]
    assert len(decoded.accepted) == 2


@pytest.mark.parametrize("item", ["1", "{}", "HEARTBEAT"])
def test_a_batch_of_more_events_than_the_contract_allows_is_one_dead_letter(item: str) -> None:
    """The finding: 256 KiB of ``[1,1,...]`` was 130,001 dead letters (enough to push every
    other one out of the bounded dead-letter store) after ~1.8 s of decoding. A batch carries
    at most MAX_BATCH_EVENTS; beyond, the message is refused whole, for one reason."""
    stamper = Stamper(gateway="gw-1", device="s-1", boot="b")
    texts = [json.dumps(heartbeat(stamper)) if item == "HEARTBEAT" else item
             for _ in range(MAX_BATCH_EVENTS + 1)]
    payload = f"[{', '.join(texts)}]".encode()
    decoded = decode_message("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT)
    assert decoded.accepted == ()
    (rejection,) = decoded.rejected
    assert (rejection.code, rejection.index, rejection.payload) == ("too_many_events", None, payload)
    assert f"at most {MAX_BATCH_EVENTS}" in rejection.reason
    full = f"[{', '.join(texts[:MAX_BATCH_EVENTS])}]".encode()  # the contract's most: taken
    at_limit = decode_message("careflow/v1/gw-1/batch", full, max_bytes=LIMIT)
    assert len(at_limit.accepted) + len(at_limit.rejected) == MAX_BATCH_EVENTS
