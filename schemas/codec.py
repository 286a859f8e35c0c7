"""Bytes to validated events: the only way a payload becomes an :class:`Event`.

Each step raises :class:`ContractError` with a stable ``code`` and a message that says what is
wrong and, where it helps, what the sender should do instead.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from careflow.errors import ContractError
from careflow.schemas.models import (
    CONTRACT_VERSION,
    EVENT_TYPES,
    NAME_PATTERN,
    RFC3339_SHAPE,
    UUID7_PATTERN,
    Event,
    Presence,
    event_adapter,
)

__all__ = [
    "decode_batch",
    "decode_json",
    "describe_validation_error",
    "parse_event",
    "parse_presence",
    "validate_event",
]

_MAX_REPORTED_ERRORS = 5
_PATTERN_MEANING = {
    NAME_PATTERN: "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit",
    UUID7_PATTERN: "must be a lowercase UUIDv7 (time-ordered), assigned once at the origin",
    RFC3339_SHAPE: "must be an RFC 3339 time with an offset, like 2026-11-27T05:00:00Z",
}


def _reject_constant(name: str) -> float:
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None
    return match.end()


def _split_array(text: str) -> list[tuple[Any, str]]:
    """Parse a JSON array into (value, exact source text) pairs; ValueError if it is not one."""
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        raise ValueError
    pos = _skip(text, pos + 1)
    items: list[tuple[Any, str]] = []
    if text.startswith("]", pos):
        pos = _skip(text, pos + 1)
    else:
        while True:
            value, end = _DECODER.raw_decode(text, pos)
            items.append((value, text[pos:end]))
            pos = _skip(text, end)
            if text.startswith(",", pos):
                pos = _skip(text, pos + 1)
                continue
            if text.startswith("]", pos):
                pos = _skip(text, pos + 1)
                break
            raise ValueError
    if pos != len(text):
        raise ValueError
    return items


def decode_batch(payload: bytes) -> list[tuple[Any, str]]:
    """Decode a batch: each event's value and its exact JSON text (stored as sent, no re-encoding)."""
    try:
        return _split_array(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        value = decode_json(payload)  # raises the precise not_utf8 / not_json error
        raise ContractError("schema", f"a batch must be a JSON array of events, not "
                                      f"{type(value).__name__}") from None


def decode_json(payload: bytes) -> Any:  # noqa: ANN401 - JSON is Any until validated
    """Decode UTF-8 JSON strictly: no NaN/Infinity, no byte-order mark."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", f"payload is not UTF-8 text ({exc.reason} at byte "
                                        f"{exc.start})") from exc
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ContractError("not_json", f"payload is not JSON: {exc}") from exc


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
        return Presence.model_validate(value)
    except ValidationError as exc:
        raise ContractError("schema", describe_validation_error(exc)) from exc


def parse_event(obj: object) -> Event:
    """Validate one decoded JSON value against contract v1."""
    return validate_event(obj)[0]


def validate_event(obj: object) -> tuple[Event, int]:
    """Validate one decoded JSON value; return the event and its time in epoch milliseconds."""
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
        moment = datetime.fromisoformat(event.time)  # the pattern checked its shape
    except ValueError as exc:
        raise ContractError("schema", f"time: {event.time!r} is not a real date-time ({exc})") \
            from exc
    return event, int(moment.timestamp() * 1000)
