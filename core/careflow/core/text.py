"""Text from devices and people, shown safely: one rule for the CLI and the on-call web.

Much of what careflow shows comes from devices (names, site labels, firmware, error messages,
dead-letter payloads). Control characters in it would act on a terminal (ESC sequences, CR and
BS overwriting what was printed) and bidirectional controls reorder what follows them (a
device name that reads as another's), in a terminal and a browser alike.
"""

from __future__ import annotations

import re

__all__ = ["format_age", "literal"]

# C0 controls but tab and newline, DEL, C1 and the bidirectional controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _code(char: str) -> str:
    return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"


def literal(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` or ``\\uNNNN`` instead of acting
    (HTML escaping is the templates' business: autoescape)."""
    return _CONTROL.sub(lambda match: _code(match[0]), text)


def format_age(ms: int | None, *, now_ms: int) -> str:
    """How long before ``now_ms``, compactly: ``4s``, ``3m``, ``2h``, ``5d`` (``-``: never)."""
    if ms is None:
        return "-"
    seconds = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
