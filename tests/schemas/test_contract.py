"""The JSON Schema files and the pydantic models accept and reject exactly the same events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.errors import ContractError
from careflow.schemas import (
    check_depth,
    decode_batch,
    decode_json,
    parse_event,
    validate_event,
    validate_events,
)
from careflow.schemas.limits import MAX_DATA_DEPTH
from careflow.schemas.published import schema_errors
from tests.hostile import json_depth, nested_json

EXAMPLES = Path(__file__).parents[2] / "schemas" / "careflow" / "schemas" / "examples"
VALID = sorted(EXAMPLES.glob("*.json"))
INVALID = sorted(p for p in (EXAMPLES / "invalid").glob("*.json") if p.name != "reasons.json")
REASONS: dict[str, str] = json.loads((EXAMPLES / "invalid" / "reasons.json").read_text())


def pydantic_accepts(obj: Any) -> bool:
    try:
        parse_event(obj)
    except ContractError:
        return False
    return True


def jsonschema_accepts(obj: Any) -> bool:
    return not schema_errors(obj)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_it_accepts_every_valid_example_in_both_validators(path: Path) -> None:
    obj = json.loads(path.read_text())
    assert schema_errors(obj) == []
    assert pydantic_accepts(obj)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_it_rejects_every_invalid_example_in_both_validators(path: Path) -> None:
    obj = json.loads(path.read_text())
    assert schema_errors(obj), "jsonschema accepted it"
    assert not pydantic_accepts(obj), "pydantic accepted it"


def test_it_documents_a_reason_for_every_invalid_example() -> None:
    assert {p.stem for p in INVALID} == set(REASONS)
    assert all(len(reason) > 10 for reason in REASONS.values())


def test_it_ships_examples_of_every_event_type() -> None:
    types = {json.loads(p.read_text())["type"] for p in VALID}
    assert types == {"heartbeat", "status", "error", "provision", "alert"}


def test_it_names_the_field_and_the_rule_in_rejections() -> None:
    obj = json.loads((EXAMPLES / "invalid" / "battery-over-100.json").read_text())
    with pytest.raises(ContractError) as info:
        parse_event(obj)
    assert info.value.code == "schema"
    assert "data.battery_pct" in str(info.value)
    assert "100" in str(info.value)


def test_it_calls_an_unknown_version_by_its_name() -> None:
    obj = json.loads((EXAMPLES / "invalid" / "unknown-version.json").read_text())
    with pytest.raises(ContractError) as info:
        parse_event(obj)
    assert info.value.code == "unsupported_version"


# -- generated events: valid ones with zero to two near-miss mutations ---------------------

valid_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
bad_names = st.one_of(
    st.sampled_from(["", "gw/1", "+", "#", "-gw", "gw\n", "gw 1", "\u00e4", "x" * 65, "$SYS",
                     "\u0661\u0662"]),
    st.text(max_size=70), st.integers(),
)
uuid7s = st.builds(
    lambda hi, lo, var: f"{hi:08x}-{lo >> 48 & 0xFFFF:04x}-7{lo >> 36 & 0xFFF:03x}-"
    f"{var}{lo >> 24 & 0xFFF:03x}-{lo & 0xFFFFFF:06x}{hi & 0xFFFFFF:06x}",
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.sampled_from("89ab"),
)
bad_ids = st.one_of(uuid7s.map(str.upper), uuid7s.map(lambda u: u + "\n"),
                    st.just("3b241101-e2bb-4255-8caf-4136c566a962"), st.text(max_size=40))
valid_times = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2})\Z"),
)
bad_times = st.one_of(
    st.sampled_from(["2026-11-27T05:00:00z", "2026-11-27 05:00:00Z", "2026-11-27T24:00:00Z",
                     "2026-11-27T23:59:60Z", "2026-13-01T00:00:00Z", "2026-11-27T05:00:00+24:00",
                     "2026-11-27T05:00:00Z\n", "2026-11-27T05:00:00", "\u0662026-11-27T05:00:00Z"]),
    st.text(max_size=30), st.integers(),
)
seqs = st.one_of(st.integers(1, 9007199254740991), st.just(1.0), st.just(42.0))
bad_ints = st.sampled_from([0, -1, 7.5, True, False, "1", None, 9007199254740992, [], {}])
pcts = st.one_of(st.floats(0, 100), st.integers(0, 100))
bad_pcts = st.sampled_from([-0.5, 100.01, 140, "50", True, None, [1]])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                    st.floats(allow_nan=False, allow_infinity=False))

# type -> field -> (valid values, invalid values, required)
DATA: dict[str, dict[str, tuple[Any, Any, bool]]] = {
    "heartbeat": {
        "interval_s": (st.one_of(st.integers(1, 86400), st.just(60.0)), bad_ints, True),
        "uptime_s": (st.floats(0, 1e9), st.sampled_from([-1, "5"]), False),
        "battery_pct": (pcts, bad_pcts, False),
        "firmware": (st.text(min_size=1, max_size=64), st.sampled_from(["", "x" * 65, 3]), False),
        "rssi_dbm": (st.floats(-200, 0), st.sampled_from([1, -201, "x"]), False),
    },
    "status": {
        "state": (st.sampled_from(["ok", "degraded", "fault"]), st.sampled_from(["OK", 3]), True),
        "battery_pct": (pcts, bad_pcts, False),
        "message": (st.text(max_size=20), st.just("m" * 1025), False),
    },
    "error": {
        "code": (st.text(min_size=1, max_size=64), st.sampled_from(["", None]), True),
        "message": (st.text(min_size=1, max_size=20), st.sampled_from(["", 5]), True),
        "severity": (st.sampled_from(["info", "warning", "error", "critical"]),
                     st.just("fatal"), False),
    },
    "provision": {
        "action": (st.sampled_from(["added", "updated", "removed"]), st.just("moved"), True),
        "kind": (st.text(min_size=1, max_size=64), st.just(""), True),
        "labels": (st.dictionaries(valid_names, st.text(max_size=10), max_size=3),
                   st.one_of(st.dictionaries(bad_names.filter(lambda n: isinstance(n, str)),
                                             st.text(max_size=3), min_size=1, max_size=2),
                             st.just({"room": 5}), st.just([])), False),
    },
    "alert": {
        "kind": (st.sampled_from(["sos", "fall", "door", "wander", "other"]), st.just("party"),
                 True),
        "state": (st.sampled_from(["raised", "cleared"]), st.just("open"), True),
    },
}
ENVELOPE: dict[str, tuple[Any, Any]] = {
    "v": (st.sampled_from([1, 1.0]), st.sampled_from([2, 0, True, "1", None])),
    "id": (uuid7s, bad_ids),
    "gateway": (valid_names, bad_names),
    "device": (valid_names, bad_names),
    "boot": (valid_names, bad_names),
    "time": (valid_times, bad_times),
    "seq": (seqs, bad_ints),
}


@st.composite
def events(draw: st.DrawFn) -> Any:
    """A valid event, then up to two mutations: a bad value, a missing key or an extra one."""
    event_type = draw(st.sampled_from(sorted(DATA)))
    data: dict[str, Any] = {}
    for key, (good, _bad, required) in DATA[event_type].items():
        if required or draw(st.booleans()):
            data[key] = draw(good)
    envelope: dict[str, Any] = {key: draw(good) for key, (good, _bad) in ENVELOPE.items()}
    envelope["type"] = event_type
    envelope["data"] = data
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["envelope", "data", "drop", "extra", "type", "data-type"]))
        if where == "envelope":
            key = draw(st.sampled_from(sorted(ENVELOPE)))
            envelope[key] = draw(ENVELOPE[key][1])
        elif where == "data":
            key = draw(st.sampled_from(sorted(DATA[event_type])))
            data[key] = draw(DATA[event_type][key][1])
        elif where == "drop":
            target = draw(st.sampled_from([envelope, data]))
            if target:
                target.pop(draw(st.sampled_from(sorted(target))))
        elif where == "extra":
            target = draw(st.sampled_from([envelope, data]))
            target[draw(st.text(max_size=8))] = draw(scalars)
        elif where == "type":
            envelope["type"] = draw(st.sampled_from([*sorted(DATA), "telemetry", 1]))
        else:
            envelope["data"] = draw(scalars)
    return envelope


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_it_never_lets_the_two_validators_drift(obj: Any) -> None:
    assert jsonschema_accepts(obj) == pydantic_accepts(obj)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=4))
def test_it_validates_a_batch_in_one_call_exactly_as_item_by_item(objs: list[Any]) -> None:
    one_by_one = []
    for obj in objs:
        try:
            one_by_one.append(validate_event(obj))
        except ContractError:
            assert validate_events(objs) is None
            return
    assert validate_events(objs) == one_by_one


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner,
                                                                      max_size=3))))
def test_it_agrees_on_arbitrary_json(obj: Any) -> None:
    assert jsonschema_accepts(obj) == pydantic_accepts(obj)


def optional_fields() -> list[tuple[str, str]]:
    """(example file, data field) for every optional field of every event type's schema."""
    cases = []
    for path in VALID:
        event_type = json.loads(path.read_text())["type"]
        schema = json.loads((EXAMPLES.parent / f"{event_type}.json").read_text())
        cases += [(path.name, name) for name in schema["properties"]
                  if name not in schema.get("required", [])]
    return cases


@pytest.mark.parametrize(("example", "field"), optional_fields())
def test_it_refuses_null_for_an_optional_field_in_both_validators(example: str, field: str
                                                                   ) -> None:
    """An optional field may be left out, never sent as null: the schema says so, and the
    generated events meet null only now and then, so every field is checked here."""
    obj = json.loads((EXAMPLES / example).read_text())
    obj["data"][field] = None
    assert schema_errors(obj)
    assert not pydantic_accepts(obj)


PRESENCE = {"v": 1, "state": "online", "conn": 3, "boot": "20261127T050000-abc123"}


@pytest.mark.parametrize("change", [
    {}, {"state": "offline", "reason": "lost connection"}, {"conn": 3.0}, {"extra": 1},
    {"state": "away"}, {"conn": 0}, {"conn": True}, {"boot": "a/b"}, {"v": 2}, {"reason": 5},
    {"reason": None},
])
def test_it_validates_presence_the_same_way_in_both_validators(change: dict[str, Any]) -> None:
    from careflow.schemas import parse_presence  # noqa: PLC0415

    obj = {**PRESENCE, **change}
    try:
        parse_presence(json.dumps(obj).encode())
        accepted = True
    except ContractError:
        accepted = False
    assert accepted == (schema_errors(obj, "state.json") == [])
    assert accepted == (change in ({}, {"state": "offline", "reason": "lost connection"},
                                   {"conn": 3.0}, {"extra": 1}))


@pytest.mark.parametrize("levels", [MAX_DATA_DEPTH - 1, MAX_DATA_DEPTH, MAX_DATA_DEPTH + 1, 990,
                                    5000])
def test_it_refuses_data_nesting_deeper_than_the_limit_as_text_and_as_value(levels: int) -> None:
    """Both ways a sender or the hub meets an event: its JSON text, or a value built in Python
    (the gateway's outbox); neither may recurse on the way to saying no."""
    event = json.loads((EXAMPLES / "heartbeat-gateway.json").read_text())
    deep: Any = 1
    for _ in range(levels - 1):
        deep = {"a": deep}
    text = json.dumps({**event, "data": "__DATA__"}).replace(
        '"__DATA__"', '{"interval_s": 60, "x": ' + nested_json(levels - 1) + "}")
    outcomes = []
    for attempt in (lambda: check_depth(text), lambda: decode_json(text.encode()),
                    lambda: parse_event({**event, "data": {"interval_s": 60, "x": deep}})):
        try:
            attempt()
            outcomes.append("ok")
        except ContractError as exc:
            outcomes.append(f"{exc.code}: {exc}")
    refused = (f"too_deep: payload nests more than {MAX_DATA_DEPTH + 1} levels deep; an event's "
               f"data may nest at most {MAX_DATA_DEPTH} levels (MAX_DATA_DEPTH of the contract): "
               "flatten it")
    assert outcomes == 3 * ["ok" if levels <= MAX_DATA_DEPTH else refused]


def test_it_counts_brackets_inside_strings_as_text_not_depth() -> None:
    brackets = "[{" * 100
    event = json.loads((EXAMPLES / "heartbeat-gateway.json").read_text())
    event["data"]["note"] = brackets
    assert validate_event(decode_json(json.dumps(event).encode()))[0].id == event["id"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:é€\n'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet='[]{}"\\ab', max_size=4), inner, max_size=4),
    max_leaves=60)


@given(_JSON, st.integers(0, 8), st.sampled_from([None, 0, 2]), st.booleans())
def test_it_measures_depth_as_the_decoded_value_nests(value: Any, limit: int,
                                                      indent: int | None, ascii_only: bool
                                                      ) -> None:
    """Brackets inside strings (escaped quotes too) never count; whitespace never matters."""
    try:
        check_depth(json.dumps(value, indent=indent, ensure_ascii=ascii_only), limit=limit)
        refused = False
    except ContractError:
        refused = True
    assert refused == (json_depth(value) > limit)


def test_it_refuses_nesting_hidden_under_a_key_that_is_repeated() -> None:
    """A repeated key: the decoder keeps the last value, but the text (which is what is stored,
    and what the store's read-back checks) still nests too deep. So depth is measured on the
    text, never on the decoded value alone, in every way the hub decodes."""
    event = json.loads((EXAMPLES / "heartbeat-gateway.json").read_text())
    text = json.dumps({**event, "data": "__DATA__"}).replace(
        '"__DATA__"', '{"x": ' + nested_json(MAX_DATA_DEPTH) + ', "x": 1, "interval_s": 60}')
    assert json_depth(json.loads(text)) == 2  # the decoded value alone looks harmless
    with pytest.raises(ContractError) as checked:
        check_depth(text)
    assert checked.value.code == "too_deep"
    with pytest.raises(ContractError) as single:
        decode_json(text.encode())
    assert single.value.code == "too_deep"
    ((item, source),) = decode_batch(f"[{text}]".encode())
    assert isinstance(item, ContractError)
    assert item.code == "too_deep"
    assert source == text
