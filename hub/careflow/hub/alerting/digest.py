"""Status digests (shift handovers) without I/O: when each is due, and what it says.

A digest (``routing.digests:`` in a rules file, :class:`~careflow.hub.alerting.rules.Digest`)
goes to one channel at a time of day in an IANA time zone. The scheduler keeps, per digest, when
the last one was sent (a cursor, written in the same transaction as the queued message) and asks
:func:`due_digests` with ``now``:

* A digest is due when its latest time of day at or before ``now`` comes after the last one sent.
  So each time of day is sent at most once, and a hub that was down over one or several of them
  sends one digest, late (saying so), not one per missed time.
* Times of day are local: 07:00 in Europe/Berlin is 06:00 UTC in winter and 05:00 in summer. A
  time the clocks skip (02:30 on the night they spring forward) is sent an hour later by the
  clock, on time by the elapsed hours; a time that happens twice (falling back) the first time.

:func:`compose` writes the message: the open, unacknowledged incidents (exactly those: an
acknowledged one has someone, a resolved one is over), gateways offline, low batteries, and what
changed since the last digest, short enough for a chat message (each list is capped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from careflow.hub.alerting.rules import Digest
from careflow.hub.fleet.presence import PresenceRecord, State, device_state
from careflow.hub.store.records import DeviceRecord, Incident, IncidentState

__all__ = [
    "LATE_AFTER_MS",
    "MAX_LISTED",
    "Due",
    "FleetNow",
    "compose",
    "due_digests",
    "fleet_now",
    "latest_slot_ms",
    "next_slot_ms",
    "slot_ms",
]

LATE_AFTER_MS = 10 * 60_000  # sent this long after its time: the digest says it is late
MAX_LISTED = 10  # lines per section; the rest is counted ("and 4 more")


def slot_ms(digest: Digest, day: date) -> int:
    """When ``digest`` is due on a calendar day of its time zone (Unix ms)."""
    hour, minute = digest.hour_minute
    # fold=0: a skipped time is read with the offset before the jump (so an hour later by
    # the clock), a repeated one as its first occurrence
    local = datetime(day.year, day.month, day.day, hour, minute,
                     tzinfo=ZoneInfo(digest.timezone))
    return int(local.timestamp()) * 1000


def _local_day(digest: Digest, at_ms: int) -> date:
    return datetime.fromtimestamp(at_ms / 1000, ZoneInfo(digest.timezone)).date()


def latest_slot_ms(digest: Digest, now_ms: int) -> int:
    """The latest time ``digest`` was due at or before ``now_ms``."""
    today = _local_day(digest, now_ms)
    return max(at for at in (slot_ms(digest, today - timedelta(days=back)) for back in range(3))
               if at <= now_ms)


def next_slot_ms(digest: Digest, now_ms: int) -> int:
    """The first time ``digest`` is due after ``now_ms``."""
    today = _local_day(digest, now_ms)
    return min(at for at in (slot_ms(digest, today + timedelta(days=ahead))
                             for ahead in range(3)) if at > now_ms)


@dataclass(frozen=True, slots=True)
class Due:
    """A digest to send now."""

    digest: Digest
    slot_ms: int  # the time of day it is sent for
    since_ms: int  # when the last one was sent (or the digest was first scheduled)
    late: bool  # sent well after its time (the hub was down, or busy)


def due_digests(digests: Sequence[Digest], last_sent: Mapping[str, int],
                now_ms: int) -> list[Due]:
    """The digests due at ``now_ms``, at most one each, given when each was last sent (by
    :attr:`Digest.key`; a digest missing there is not scheduled yet, and never due)."""
    out = []
    for digest in digests:
        last = last_sent.get(digest.key)
        if last is None:
            continue
        slot = latest_slot_ms(digest, now_ms)
        if slot > last:
            out.append(Due(digest, slot, last, late=now_ms - slot > LATE_AFTER_MS))
    return out


@dataclass(frozen=True, slots=True)
class FleetNow:
    """What a digest says about the fleet: gateways offline (with why) and low batteries."""

    offline: tuple[tuple[str, str], ...] = ()  # (gateway, why)
    low_batteries: tuple[tuple[str, str, float], ...] = ()  # (gateway, device, percent)


def fleet_now(devices: Sequence[DeviceRecord], presence: Mapping[str, PresenceRecord],
              paused: Mapping[tuple[str, str], tuple[int, str]], *, now_ms: int,
              low_battery_pct: float) -> FleetNow:
    """Gateways offline and devices whose battery is below ``low_battery_pct``; what is in
    maintenance (paused) is left out of both, as the rules leave it."""
    offline, low = [], []
    for record in devices:
        if (record.gateway, record.device) in paused or (record.gateway, "*") in paused:
            continue
        if record.device == record.gateway:
            interval = record.facts.get("interval_s")
            state, why = device_state(
                now_ms=now_ms, last_seen_ms=record.last_seen_ms,
                interval_s=interval if isinstance(interval, int | float) else None,
                presence=presence.get(record.gateway))
            if state == State.OFFLINE:
                offline.append((record.gateway, why))
        battery = record.facts.get("battery_pct")
        if isinstance(battery, int | float) and not isinstance(battery, bool) \
                and battery < low_battery_pct:
            low.append((record.gateway, record.device, float(battery)))
    known = {record.gateway for record in devices if record.device == record.gateway}
    for gateway, said in presence.items():  # its Will arrived, but no event of its own yet
        if gateway not in known and (gateway, "*") not in paused and said.state == "offline":
            offline.append((gateway, f"offline ({said.reason or 'will'})"))
    return FleetNow(tuple(sorted(offline)), tuple(sorted(low, key=lambda b: (b[2], b[0], b[1]))))


def _when(at_ms: int, zone: ZoneInfo, now_ms: int) -> str:
    """A moment as a person on shift reads it: the time, with the day when it is not today."""
    at = datetime.fromtimestamp(at_ms / 1000, zone)
    now = datetime.fromtimestamp(now_ms / 1000, zone)
    return at.strftime("%H:%M") if at.date() == now.date() else at.strftime("%a %d %b %H:%M")


def _age(ms: int) -> str:
    minutes = max(ms, 0) // 60_000
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes // (24 * 60)} days"


def _capped(lines: list[str], more: str) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    return [*lines[:MAX_LISTED], f"- and {len(lines) - MAX_LISTED} more ({more})"]


def _changes(changed: Sequence[Incident], since_ms: int, now_ms: int,
             zone: ZoneInfo) -> tuple[dict[str, int], list[str]]:
    """What happened to incidents in [since, now): counts per phase, one line per change."""
    counts = {"opened": 0, "acknowledged": 0, "resolved": 0}
    lines: list[tuple[int, str]] = []
    for incident in changed:
        for phase, at_ms, by in (("opened", incident.triggered_ms, None),
                                 ("acknowledged", incident.acknowledged_ms,
                                  incident.acknowledged_by),
                                 ("resolved", incident.resolved_ms, incident.resolved_by)):
            if at_ms is None or not since_ms <= at_ms < now_ms:
                continue
            counts[phase] += 1
            who = f" by {by}" if by else ""
            lines.append((at_ms, f"- {_when(at_ms, zone, now_ms)} #{incident.id} {phase}{who}: "
                                 f"{incident.summary}"))
    return counts, [line for _, line in sorted(lines)]


def compose(due: Due, *, now_ms: int, incidents: Sequence[Incident],
            changed: Sequence[Incident], fleet: FleetNow,
            quieted: Sequence[str] = ()) -> tuple[str, str]:
    """Title and body of a digest.

    Args:
        due: The digest and when it was due.
        now_ms: When it is written.
        incidents: The open incidents (others given are left out: only those open and not
            acknowledged are listed).
        changed: Incidents with a change since the last digest (``Incidents.incidents_changed``);
            changes in [``due.since_ms``, ``now_ms``) are told.
        fleet: Gateways offline and low batteries.
        quieted: The rules muted or disabled now, one line each (who, why, until when):
            repeated in every digest while in force, so no shift forgets a quiet rule.

    Returns:
        The title (counts, for a phone's notification line) and the body.
    """
    digest = due.digest
    zone = ZoneInfo(digest.timezone)
    waiting = sorted((i for i in incidents if i.state == IncidentState.OPEN),
                     key=lambda i: (i.severity != "critical", i.triggered_ms, i.id))
    title = (f"[STATUS] {digest.key}: {len(waiting)} open and unacknowledged, "
             f"{len(fleet.offline)} gateway(s) offline, {len(fleet.low_batteries)} low "
             "batter" + ("y" if len(fleet.low_batteries) == 1 else "ies"))
    head = f"Status at {_when(now_ms, zone, now_ms)} ({digest.timezone})"
    if due.late:
        head += (f", late: it was due at {_when(due.slot_ms, zone, now_ms)} "
                 "(was the hub down?)")
    body = [head, ""]
    if quieted:  # first: what the rest of the digest (and the night) will not say
        body += [f"Rules muted or disabled ({len(quieted)}): their incidents are not "
                 "announced", *(f"- {line}" for line in quieted), ""]
    body += [f"Open, not acknowledged ({len(waiting)}):"]
    body += _capped([f"- #{i.id} [{i.severity.upper()}] {i.summary} ({i.gateway}/{i.device}), "
                     f"for {_age(now_ms - i.triggered_ms)}" for i in waiting],
                    "careflow incidents list --state open") or ["- none"]
    body += ["", f"Gateways offline ({len(fleet.offline)}):"]
    body += _capped([f"- {gateway}: {why}" for gateway, why in fleet.offline],
                    "careflow devices list") or ["- none"]
    body += ["", f"Low batteries, below {digest.low_battery_pct:g}% "
                 f"({len(fleet.low_batteries)}):"]
    body += _capped([f"- {gateway}/{device}: {pct:g}%"
                     for gateway, device, pct in fleet.low_batteries],
                    "careflow devices list") or ["- none"]
    counts, lines = _changes(changed, due.since_ms, now_ms, zone)
    body += ["", f"Since {_when(due.since_ms, zone, now_ms)}: "
                 + ", ".join(f"{count} {phase}" for phase, count in counts.items())]
    if len(lines) > MAX_LISTED:  # a handover needs the latest: the earlier are counted first
        lines = [f"- and {len(lines) - MAX_LISTED} earlier (careflow incidents list --state all)",
                 *lines[-MAX_LISTED:]]
    body += lines
    return title, "\n".join(body)

