"""Bytes to validated events: the only way a payload becomes an :class:`EventHead`.

Each step raises :class:`ContractError` with a stable ``code`` and a message that says what is
wrong and, where it helps, what the sender should do instead.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Mapping
from datetime import datetime
from itertools import accumulate
from typing import Any

from pydantic import ValidationError

from careflow.core.errors import ContractError
from careflow.schemas.limits import MAX_BATCH_EVENTS, MAX_DATA_DEPTH
from careflow.schemas.models import (
    CONTRACT_VERSION,
    EVENT_TYPES,
    NAME_PATTERN,
    RFC3339_SHAPE,
    UUID7_PATTERN,
    EventHead,
    Presence,
    event_adapter,
    event_list_adapter,
    presence_adapter,
)

__all__ = [
    "EVENT_DEPTH",
    "check_depth",
    "decode_batch",
    "decode_json",
    "describe_validation_error",
    "parse_event",
    "parse_presence",
    "validate_event",
    "validate_events",
    "value_depth",
]

_MAX_REPORTED_ERRORS = 5
_PATTERN_MEANING = {
    NAME_PATTERN: "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit",
    UUID7_PATTERN: "must be a lowercase UUIDv7 (time-ordered), assigned once at the origin",
    RFC3339_SHAPE: "must be an RFC 3339 time with an offset, like 2026-11-27T05:00:00Z",
}


class _NotFiniteError(ValueError):
    """NaN, Infinity, or a number too large for a float (which would decode to infinity and
    be written back out as ``Infinity``, which is not JSON)."""


def _reject_constant(name: str) -> float:
    msg = f"{name} is not valid JSON"
    raise _NotFiniteError(msg)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        msg = f"{text[:40]} is too large for a number (it would be infinity)"
        raise _NotFiniteError(msg)
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)

# The deepest an event may nest: the event object around a `data` of MAX_DATA_DEPTH levels.
EVENT_DEPTH = MAX_DATA_DEPTH + 1
# JSON strings (whose brackets do not count) and brackets, for measuring depth exactly.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1, +1, -1, -1 as signed


def _too_deep(limit: int) -> ContractError:
    return ContractError(
        "too_deep", f"payload nests more than {limit} levels deep; an event's data may nest at "
                    f"most {MAX_DATA_DEPTH} levels (MAX_DATA_DEPTH of the contract): flatten it")


def _deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests more than ``limit`` objects/arrays deep.

    Almost every event has a handful of brackets in all, so two C-speed counts settle it; only
    text with more brackets than ``limit`` is measured: strings dropped, then the brackets as +1
    and -1 summed up, all in C (a 200 KB reading costs ~2 ms, not the ~15 ms of a Python loop).
    Meant for valid JSON (an unterminated string would count its brackets).
    """
    if text.count("{") + text.count("[") <= limit:
        return False
    brackets = _STRING.sub("", text).encode().translate(None, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets.translate(_BRACKET_STEPS))), default=0) > limit


def _value_end(text: str, pos: int) -> int:
    """Where the JSON value starting at ``pos`` ends, found without decoding it (used for a
    batch item too deep to decode); ValueError if it never closes."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text, pos):
        char = text[match.start()]
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        if depth == 0:
            return match.end()
    raise ValueError


def check_depth(text: str, *, limit: int = EVENT_DEPTH) -> None:
    """Raise ContractError ``too_deep`` if JSON ``text`` nests more than ``limit`` levels.

    For senders that check an event before publishing it; the hub's decoding checks it anyway.
    """
    if _deeper_than(text, limit):
        raise _too_deep(limit)


def value_depth(value: Any, *, limit: int) -> int:  # noqa: ANN401 - any decoded JSON value
    """How deep a decoded JSON value nests, counting at most to ``limit + 1`` (no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            if level > deepest:
                deepest = level
                if deepest > limit:
                    return deepest
            stack.extend((child, level) for child in (
                item.values() if isinstance(item, dict) else item))
    return deepest
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE_CHARS = " \t\n\r"


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None
    return match.end()


def _after_item(text: str, end: int) -> tuple[int, bool]:
    """After an array item: where the next item starts, or the end and True when the array
    closes; ValueError for anything else."""
    pos = _skip(text, end)
    if text.startswith(",", pos):
        return pos + 1, False
    if text.startswith("]", pos):
        return _skip(text, pos + 1), True
    raise ValueError


def _refused_item(text: str, pos: int, exc: Exception) -> tuple[ContractError, int]:
    """A batch item that cannot be decoded (far too deep, or NaN or an overflowing number
    inside): its refusal and where it ends, so that the items beside it still count."""
    if isinstance(exc, RecursionError):
        return _too_deep(EVENT_DEPTH), _value_end(text, pos)
    if not text.startswith(("{", "["), pos):
        raise exc
    return ContractError("not_json", f"payload is not JSON: {exc}"), _value_end(text, pos)


def _split_array(text: str) -> list[tuple[Any, str]]:
    """Parse a JSON array into (value, exact source text) pairs; ValueError if it is not one."""
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        raise ValueError
    pos = _skip(text, pos + 1)
    items: list[tuple[Any, str]] = []
    append, raw_decode = items.append, _DECODER.raw_decode
    if text.startswith("]", pos):
        pos = _skip(text, pos + 1)
    else:
        while True:
            if len(items) == MAX_BATCH_EVENTS:  # one more: refused whole, before decoding more
                raise ContractError("too_many_events", f"a batch carries at most "
                                    f"{MAX_BATCH_EVENTS} events (MAX_BATCH_EVENTS of the "
                                    "contract); this one has more: send smaller batches")
            try:
                value, end = raw_decode(text, pos)
            except (RecursionError, _NotFiniteError) as exc:  # refuse this item alone
                value, end = _refused_item(text, pos, exc)
            item = text[pos:end]
            # two C-speed counts for a usual item
            append((_too_deep(EVENT_DEPTH) if _deeper_than(item, EVENT_DEPTH) else value, item))
            # Most senders separate items with ", " (json.dumps) or ","; test those before the
            # regex, which costs a call per item (this loop runs once per event of a batch).
            if text.startswith(", ", end):
                pos = end + 2
            elif text.startswith(",", end):
                pos = end + 1
            else:
                pos, closed = _after_item(text, end)
                if closed:
                    break
            if text[pos:pos + 1] in _WHITESPACE_CHARS:  # "" (end of text) too: raw_decode fails
                pos = _skip(text, pos)
    if pos != len(text):
        raise ValueError
    return items


def decode_batch(payload: bytes) -> list[tuple[Any, str]]:
    """Decode a batch: each event's value and its exact JSON text (stored as sent, no re-encoding).

    An item nesting deeper than an event may (EVENT_DEPTH) comes back with a ContractError
    ``too_deep`` in place of its value, so that it alone is refused. A batch of more than
    MAX_BATCH_EVENTS items is refused whole (``too_many_events``): one message, one dead
    letter, never tens of thousands of them.
    """
    try:
        return _split_array(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        value = decode_json(payload, max_depth=EVENT_DEPTH + 1)  # the precise error, if any
        raise ContractError("schema", f"a batch must be a JSON array of events, not "
                                      f"{type(value).__name__}") from None


def decode_json(payload: bytes, *, max_depth: int = EVENT_DEPTH) -> Any:  # noqa: ANN401
    """Decode UTF-8 JSON strictly: no NaN/Infinity, no byte-order mark, at most ``max_depth``
    levels of objects and arrays (an event's by default: deeper nesting is refused as
    ``too_deep`` before any layer that walks values recursively can meet it)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", f"payload is not UTF-8 text ({exc.reason} at byte "
                                        f"{exc.start})") from exc
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:
        raise ContractError("not_json", f"payload is not JSON: {exc}") from exc
    if _deeper_than(text, max_depth):  # valid JSON, so the scan is exact
        raise _too_deep(max_depth)
    return value


def _is_union_member(part: str | int) -> bool:
    return isinstance(part, str) and part.startswith(("constrained-", "int", "float"))


def describe_validation_error(error: ValidationError) -> str:
    """Render pydantic errors as ``path: message`` lines a device developer can act on."""
    seen: dict[str, str] = {}
    for item in error.errors():
        # Drop the discriminator tag and union-member names pydantic puts in the location.
        loc = [part for index, part in enumerate(item["loc"])
               if not (index == 0 and part in EVENT_TYPES) and not _is_union_member(part)]
        path = ".".join(str(part) for part in loc) or "(event)"
        pattern = str((item.get("ctx") or {}).get("pattern"))
        seen.setdefault(path, _PATTERN_MEANING.get(pattern, item["msg"]))
    parts = [f"{path}: {message}" for path, message in list(seen.items())[:_MAX_REPORTED_ERRORS]]
    if len(seen) > _MAX_REPORTED_ERRORS:
        parts.append(f"... and {len(seen) - _MAX_REPORTED_ERRORS} more")
    return "; ".join(parts)


def parse_presence(payload: bytes) -> Presence:
    """Decode and validate a presence message from ``careflow/v1/{gateway}/state``."""
    value = decode_json(payload)
    if not isinstance(value, dict):
        raise ContractError("schema", "presence must be a JSON object")
    try:
        return presence_adapter.validate_python(value)
    except ValidationError as exc:
        raise ContractError("schema", describe_validation_error(exc)) from exc


def parse_event(obj: object) -> EventHead:
    """Validate one decoded JSON value against contract v1, its depth included (the hub checks
    the depth of what it receives as text, before decoding; this is for values built here)."""
    if value_depth(obj, limit=EVENT_DEPTH) > EVENT_DEPTH:
        raise _too_deep(EVENT_DEPTH)
    return validate_event(obj)[0]


def _head(event: Mapping[str, Any]) -> EventHead:
    return EventHead(event["id"], event["gateway"], event["device"], event["type"],
                     event["time"], event["boot"], int(event["seq"]))


def _epoch_ms(time_text: str) -> int:
    """An event time in epoch milliseconds; ValueError for a date the calendar lacks."""
    return int(datetime.fromisoformat(time_text).timestamp() * 1000)  # pattern checked shape


def validate_events(objs: list[Any]) -> list[tuple[EventHead, int]] | None:
    """Validate a whole batch in one call; None if any item fails, whatever the reason.

    The fast path for batches: the same pydantic validator as :func:`validate_event`, on the same
    decoded values, but one call for all items. On None the caller validates item by item, which
    gives each rejected item its own code and reason, so a bad item never costs a good one.
    """
    try:
        events = event_list_adapter.validate_python(objs)
        return [(_head(event), _epoch_ms(event["time"])) for event in events]
    except (ValidationError, ValueError):
        return None


def validate_event(obj: object) -> tuple[EventHead, int]:
    """Validate one decoded JSON value; return its envelope and its time in epoch milliseconds."""
    if not isinstance(obj, dict):
        raise ContractError("schema", f"an event must be a JSON object, not {type(obj).__name__}")
    version = obj.get("v")
    if version != CONTRACT_VERSION and isinstance(version, int) and not isinstance(version, bool):
        raise ContractError(
            "unsupported_version",
            f"contract version {version} is not understood by this hub (it speaks "
            f"v{CONTRACT_VERSION}); upgrade the hub or publish v{CONTRACT_VERSION} events",
        )
    try:
        event = event_adapter.validate_python(obj)
    except ValidationError as exc:
        raise ContractError("schema", describe_validation_error(exc)) from exc
    try:
        return _head(event), _epoch_ms(event["time"])
    except ValueError as exc:
        raise ContractError("schema", f"time: {event['time']!r} is not a real date-time "
                                      f"({exc})") from exc
