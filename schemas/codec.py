"""Bytes to validated events: the only way a payload becomes an :class:`Event`.

Each step raises :class:`ContractError` with a stable ``code`` and a message that says what is
wrong and, where it helps, what the sender should do instead.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from careflow.errors import ContractError
from careflow.schemas.models import (
    CONTRACT_VERSION,
    EVENT_TYPES,
    NAME_PATTERN,
    UUID7_PATTERN,
    Event,
    event_adapter,
)

__all__ = ["decode_json", "describe_validation_error", "parse_event"]

_MAX_REPORTED_ERRORS = 5
_PATTERN_MEANING = {
    NAME_PATTERN: "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit",
    UUID7_PATTERN: "must be a lowercase UUIDv7 (time-ordered), assigned once at the origin",
}


def _reject_constant(name: str) -> float:
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


def decode_json(payload: bytes) -> Any:  # noqa: ANN401 - JSON is Any until validated
    """Decode UTF-8 JSON strictly: no NaN/Infinity, no byte-order mark."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("not_utf8", f"payload is not UTF-8 text ({exc.reason} at byte "
                                        f"{exc.start})") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ContractError("not_json", f"payload is not JSON: {exc}") from exc


def describe_validation_error(error: ValidationError) -> str:
    """Render pydantic errors as ``path: message`` lines a device developer can act on."""
    parts = []
    for item in error.errors()[:_MAX_REPORTED_ERRORS]:
        loc = list(item["loc"])
        if loc and loc[0] in EVENT_TYPES:  # the discriminator tag pydantic puts first
            loc = loc[1:]
        path = ".".join(str(part) for part in loc) or "(event)"
        pattern = (item.get("ctx") or {}).get("pattern")
        parts.append(f"{path}: {_PATTERN_MEANING.get(str(pattern), item['msg'])}")
    more = error.error_count() - _MAX_REPORTED_ERRORS
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def parse_event(obj: object) -> Event:
    """Validate one decoded JSON value against contract v1."""
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
        return event_adapter.validate_python(obj)
    except ValidationError as exc:
        raise ContractError("schema", describe_validation_error(exc)) from exc
