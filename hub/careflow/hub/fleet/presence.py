"""Gateway presence and the device state words operators know from Healthchecks.

Pure functions: the store and the CLI pass in what they know and ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["PresenceRecord", "State", "device_state", "supersedes"]

# A source is late once its heartbeat is this much overdue, offline after one more interval.
LATE_SLACK = 0.1


class State(StrEnum):
    """new → online ⇄ late → offline; paused is set by people (maintenance)."""

    NEW = "new"
    ONLINE = "online"
    LATE = "late"
    OFFLINE = "offline"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """The last presence message the hub accepted for a gateway."""

    gateway: str
    state: str
    conn: int
    boot: str
    changed_ms: int
    reason: str | None = None


def supersedes(new_state: str, new_conn: int, old: PresenceRecord | None, *,
               boot: str | None = None, boot_seen: bool = False) -> bool:
    """Whether a presence message replaces what the hub knows.

    Within one boot of the agent, the connection counter rises with every connection, so a newer
    connection always wins, and the Last Will of an *earlier* connection (delivered late, after a
    quick reconnect) never marks a live gateway offline. Within one connection, ``offline``
    follows ``online``.

    Across boots the counters cannot be compared: a reflashed gateway starts again at 1 while
    the hub remembers, say, 57. So a ``boot`` the hub has never recorded for this gateway is
    news and wins whatever its counter (the gateway restarted; even an ``offline`` of it means
    the hub missed its ``online``), while one it has already recorded and moved past
    (``boot_seen``) is an earlier boot, whose late Will never overrides the current one.
    """
    if old is None:
        return True
    if boot is not None and boot != old.boot:
        return not boot_seen
    if new_conn > old.conn:
        return True
    return new_conn == old.conn and new_state == "offline" and old.state == "online"


def device_state(  # noqa: PLR0911 - one return per state reads best
    *,
    now_ms: int,
    last_seen_ms: int | None,
    interval_s: float | None,
    presence: PresenceRecord | None = None,
    paused: bool = False,
) -> tuple[State, str]:
    """The state word of a gateway or device, and why."""
    if paused:
        return State.PAUSED, "paused by an operator"
    if presence is not None and presence.state == "offline":
        return State.OFFLINE, f"gateway {presence.gateway} is offline ({presence.reason or 'will'})"
    if last_seen_ms is None:
        return State.NEW, "nothing received yet"
    if not interval_s:
        return State.ONLINE, "no heartbeat interval declared"
    overdue_ms = now_ms - last_seen_ms - interval_s * 1000
    if overdue_ms <= interval_s * 1000 * LATE_SLACK:
        return State.ONLINE, "heartbeat on time"
    if overdue_ms <= interval_s * 1000:
        return State.LATE, f"heartbeat {overdue_ms // 1000:.0f}s overdue"
    return State.OFFLINE, f"no heartbeat for {(now_ms - last_seen_ms) // 1000:.0f}s " \
                          f"(interval {interval_s:g}s)"
