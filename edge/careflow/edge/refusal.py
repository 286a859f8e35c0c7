"""What the gateway refuses to send, and how it tells the hub: pure decisions, no I/O.

An event the hub would refuse must never enter the outbox: over the contract's size limit it
would take every batch it sits in (and the broker connection) down with it; nested too deep it
breaks every layer that walks it. It is refused where it is stamped, and the hub hears about it
through a small, valid ``error`` event (``E_EVENT_REFUSED``) that carries a truncated copy of the
refused input and the reason, so a rule can alert on it. A refused care alarm is ``critical``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from careflow.core.errors import ContractError
from careflow.schemas import EVENT_TYPES, check_depth, decode_json
from careflow.schemas.limits import MAX_EVENT_BYTES

__all__ = [
    "EXCERPT_CHARS",
    "E_EVENT_REFUSED",
    "E_SPOOL_UNREADABLE",
    "encode_event",
    "pack_batches",
    "refusal_report",
    "sniff_type",
    "undeliverable_reason",
    "unreadable_report",
]

E_EVENT_REFUSED = "E_EVENT_REFUSED"
E_SPOOL_UNREADABLE = "E_SPOOL_UNREADABLE"

# How much of a refused input the report carries: enough to recognise it, small enough that the
# report itself stays far below MAX_EVENT_BYTES (even when every character needs a \\u escape).
EXCERPT_CHARS = 1000
_TEXT_CHARS = 500  # device and file names inside a report
_TYPE_IN_TEXT = re.compile(r'"type"\s*:\s*"([^"\\]{1,32})"')
_RAISED_IN_TEXT = re.compile(r'"state"\s*:\s*"\s*raised\s*"', re.IGNORECASE)


def encode_event(envelope: dict[str, Any]) -> str:
    """The event as the outbox keeps and sends it; ContractError if the hub would refuse it.

    ASCII JSON (so characters equal bytes), no NaN or Infinity (not JSON: the hub refuses the
    whole batch they sit in), at most MAX_EVENT_BYTES.
    Call it after ``parse_event``, which refuses data nested too deep to encode.
    """
    try:
        body = json.dumps(envelope, allow_nan=False)
    except ValueError as exc:
        msg = f"data holds a number JSON cannot carry (NaN or Infinity): {exc}"
        raise ContractError("not_json", msg) from exc
    except RecursionError as exc:  # parse_event was skipped: still a refusal, never a crash
        raise ContractError("too_deep", "data nests too deep to encode") from exc
    except TypeError as exc:  # a set, bytes, an object: JSON has no word for it
        raise ContractError("schema", f"data holds a value JSON cannot carry: {exc}") from exc
    if len(body) > MAX_EVENT_BYTES:
        msg = (f"the event is {len(body)} bytes encoded, over the contract's {MAX_EVENT_BYTES}; "
               "send large content another way")
        raise ContractError("oversized", msg)
    return body


def undeliverable_reason(body: str) -> ContractError | None:
    """Why an event body already in the outbox cannot be delivered, or None.

    Bodies written by this agent always pass; an outbox written by an older agent (which knew no
    limits) may hold one that would take down every batch it is packed into. Cheap for the
    common body: a length, two bracket counts and two substring searches.
    """
    size = len(body.encode("utf-8"))
    if size > MAX_EVENT_BYTES:
        return ContractError("oversized", f"a stored event of {size} bytes is over the "
                                          f"contract's {MAX_EVENT_BYTES}")
    try:
        check_depth(body)
        if "NaN" in body or "Infinity" in body:  # maybe inside a string: decode to be sure
            decode_json(body.encode("utf-8"))
    except ContractError as exc:
        return exc
    return None


def pack_batches(sizes: Sequence[int], *, max_events: int, max_bytes: int) -> list[range]:
    """Split items (their encoded sizes, in order) into consecutive runs, each one JSON array.

    A run holds at most ``max_events`` items and its array (``[`` + items joined by ``,`` +
    ``]``) at most ``max_bytes``; an item too large for any run gets a run of its own (callers
    refuse such items before packing).
    """
    runs: list[range] = []
    start, used = 0, 2
    for index, size in enumerate(sizes):
        count = index - start
        extra = size + (1 if count else 0)
        if count and (count >= max_events or used + extra > max_bytes):
            runs.append(range(start, index))
            start, used, extra = index, 2, size
        used += extra
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def sniff_type(value: object, text: str) -> str | None:
    """The event type a refused input meant to be, lower-cased, if it says (best effort).

    From the decoded object when there is one, else from the raw text, so an oversized or broken
    care alarm is still recognised as one. A missing alarm is worse than a false alarm, so it is
    ``alert`` when it says so anywhere (the text may hold other ``"type"`` keys before the
    envelope's), or when it names no type the contract knows and its state is ``raised``.
    """
    if isinstance(value, dict):
        declared = value.get("type")
        said = _clip(declared.strip().lower(), 32) if isinstance(declared, str) else None
        data = value.get("data")
        state = data.get("state") if isinstance(data, dict) else None
        raised = isinstance(state, str) and state.strip().lower() == "raised"
    else:
        found = [match.strip().lower() for match in _TYPE_IN_TEXT.findall(text)]
        known = [name for name in found if name in EVENT_TYPES]
        said = "alert" if "alert" in known else (known or found or [None])[0]
        raised = _RAISED_IN_TEXT.search(text) is not None
    if said not in EVENT_TYPES and raised:
        return "alert"
    return said


def _clip(text: str, limit: int = _TEXT_CHARS) -> str:
    """At most ``limit`` characters, and no lone surrogates (JSON escapes can make them)."""
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def refusal_report(*, text: str, size: int, reason: ContractError, source: str,
                   refused_type: str | None, refused_device: object = None) -> dict[str, Any]:
    """The ``data`` of the error event that tells the hub what was refused and why.

    Args:
        text: the refused input as read (its first characters are carried).
        size: its full size in bytes.
        reason: the refusal, with its code (``oversized``, ``too_deep``, ``schema``...).
        source: where it came from, e.g. ``spool a.jsonl line 3``.
        refused_type: the type it declared (``alert`` makes the report critical).
        refused_device: the device it named, if any.
    """
    what = "care alarm" if refused_type == "alert" else (refused_type or "reading")
    data: dict[str, Any] = {
        "code": E_EVENT_REFUSED,
        "severity": "critical" if refused_type == "alert" else "error",
        "component": "edge-spool" if source.startswith("spool") else "edge-outbox",
        "message": _clip(f"the gateway refused a {what} ({source}): {reason}", 1000),
        "reason_code": _clip(reason.code, 64),
        "reason": _clip(str(reason), 1000),
        "source": _clip(source),
        "line": _clip(text, EXCERPT_CHARS),
        "line_bytes": size,
    }
    if refused_type is not None:
        data["refused_type"] = _clip(refused_type, 32)
    if isinstance(refused_device, str):
        data["refused_device"] = _clip(refused_device, 128)
    return data


def unreadable_report(*, name: str, reason: str, lines_read: int,
                      quarantined_to: str | None, may_hold_readings: bool = True,
                      ) -> dict[str, Any]:
    """The ``data`` of the error event for a spool entry the agent cannot read.

    ``critical`` when the entry may hold readings (anything but a directory): care alarms in it
    never reach the hub, so a human must look (rule ``spool-entry-unreadable``).
    """
    where = (f"moved to {quarantined_to}" if quarantined_to
             else "left in place and skipped until the agent restarts")
    return {
        "code": E_SPOOL_UNREADABLE,
        "severity": "critical" if may_hold_readings else "error",
        "component": "edge-spool",
        "message": _clip(f"cannot read spool entry {name!r}: {reason}; {where}; "
                         "check the sensor bridge that wrote it", 1000),
        "file": _clip(name),
        "reason": _clip(reason, 1000),
        "lines_read": lines_read,
        "quarantined_to": quarantined_to,
    }
