"""RFC 3339 timestamps: one parser shared by the pydantic layer and the JSON Schema format check."""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["RFC3339_PATTERN", "format_rfc3339", "is_rfc3339", "parse_rfc3339"]

RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})(?![\s\S])"
)
_SHAPE = re.compile(RFC3339_PATTERN)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset; ValueError if it is not one.

    The shape is checked first so that Python's more lenient ISO parser cannot widen the contract.
    """
    if not _SHAPE.match(text):
        msg = f"{text!r} is not an RFC 3339 date-time such as 2026-11-27T05:00:00Z"
        raise ValueError(msg)
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"{text!r} is not a valid date-time: {exc}"
        raise ValueError(msg) from exc


def is_rfc3339(value: object) -> bool:
    """JSON Schema format check: non-strings pass (the ``type`` keyword judges those)."""
    if not isinstance(value, str):
        return True
    try:
        parse_rfc3339(value)
    except ValueError:
        return False
    return True


def format_rfc3339(moment: datetime) -> str:
    """Render an aware datetime as RFC 3339 UTC with millisecond precision."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
