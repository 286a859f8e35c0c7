"""Wall-clock time in careflow's one unit: milliseconds since the Unix epoch.

Decisions take ``now_ms`` as a parameter (pure functions) or a :data:`Clock` injected at
construction (components), so a test can set the time instead of waiting for it; only adapters
and entry points read the real clock, through :func:`now_ms`. Timers that measure how long
something took use ``time.monotonic()`` instead: the wall clock can jump.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Clock", "now_ms"]

Clock: TypeAlias = Callable[[], int]
"""A source of wall-clock milliseconds: :func:`now_ms`, or a test's own."""


def now_ms() -> int:
    """The wall clock, in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
