"""What the console's pages show, shaped from the store's records: pure functions, ``now``
passed in. The state words are the fleet's own (:func:`careflow.hub.fleet.presence.device_state`)
and sites the one rule of :class:`careflow.hub.fleet.sites.SiteBook`, so the console says what
``careflow devices list``, the report and the alert routes say."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from careflow.core.text import format_age
from careflow.core.text import literal as visible  # the CLI's rule, for the web's pages
from careflow.hub.fleet.presence import PresenceRecord, State, device_state
from careflow.hub.fleet.sites import UNASSIGNED, SiteBook
from careflow.hub.store.records import (
    DeadLetter,
    DeviceRecord,
    Incident,
    IncidentAction,
    Notification,
)

__all__ = [
    "LOW_BATTERY_PCT",
    "STATE_ORDER",
    "DeviceRow",
    "SiteView",
    "TimelineEntry",
    "battery",
    "compact_json",
    "device_row",
    "fleet",
    "format_age",
    "format_when",
    "payload_preview",
    "timeline",
    "visible",
]

LOW_BATTERY_PCT = 20  # the shipped battery-low rule's threshold
# Problems first: what needs someone's attention leads each site.
STATE_ORDER = (State.OFFLINE, State.LATE, State.PAUSED, State.NEW, State.ONLINE)

def format_when(ms: int | None) -> str:
    """Epoch milliseconds as ``2026-11-30 12:00:03 UTC``."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def battery(facts: Mapping[str, Any]) -> float | None:
    """The battery level a device last reported, when it is a number."""
    value = facts.get("battery_pct")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def compact_json(value: Any, *, limit: int = 200) -> str:  # noqa: ANN401 - any JSON value
    """JSON on one line, cut at ``limit`` characters with ``…``."""
    text = visible(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def payload_preview(letter: DeadLetter, *, limit: int = 160) -> str:
    """The start of a refused payload as text (undecodable bytes as U+FFFD, controls visible)."""
    text = visible(letter.payload[:limit * 4].decode("utf-8", errors="replace"))
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One gateway or device as the fleet page shows it."""

    gateway: str
    device: str
    site: str
    kind: str
    state: State
    why: str
    last_seen_ms: int
    last_type: str
    battery: float | None
    firmware: str

    @property
    def low_battery(self) -> bool:
        """Under :data:`LOW_BATTERY_PCT`."""
        return self.battery is not None and self.battery < LOW_BATTERY_PCT

    @property
    def attention(self) -> bool:
        """Worth a look: not online, or its battery is low."""
        return self.state is not State.ONLINE or self.low_battery

    @property
    def is_gateway(self) -> bool:
        """A gateway is a device of itself."""
        return self.gateway == self.device


@dataclass(slots=True)
class SiteView:
    """A site's gateways and devices, problems first, and how many are in each state."""

    name: str
    rows: list[DeviceRow] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """State word -> how many, in :data:`STATE_ORDER`, zeros left out."""
        counted = {str(state): sum(row.state is state for row in self.rows)
                   for state in STATE_ORDER}
        return {state: n for state, n in counted.items() if n}

    @property
    def attention(self) -> list[DeviceRow]:
        """Rows worth a look (not online, or a low battery), shown first and open."""
        return [row for row in self.rows if row.attention]

    @property
    def fine(self) -> list[DeviceRow]:
        """The rest: online, and a battery that is fine (or none)."""
        return [row for row in self.rows if not row.attention]


def device_row(record: DeviceRecord, *, now_ms: int, presence: Mapping[str, PresenceRecord],
               paused: Mapping[tuple[str, str], tuple[int, str]], sites: SiteBook) -> DeviceRow:
    """A device's state (as ``careflow devices list`` computes it) and its site: its own
    ``labels.site`` first, else its gateway's."""
    window = paused.get((record.gateway, record.device)) or paused.get((record.gateway, "*"))
    state, why = device_state(now_ms=now_ms, last_seen_ms=record.last_seen_ms,
                              interval_s=record.facts.get("interval_s"),
                              presence=presence.get(record.gateway), paused=window is not None)
    if window is not None:
        why = f"maintenance until {format_when(window[0])}: {window[1]}"
    labels = record.facts.get("labels")
    own_site = labels.get("site") if isinstance(labels, Mapping) else None
    return DeviceRow(
        gateway=record.gateway, device=record.device,
        site=own_site if isinstance(own_site, str) and own_site else sites.site_of(record.gateway),
        kind=str(record.facts.get("kind") or ("gateway" if record.gateway == record.device
                                              else "-")),
        state=state, why=why, last_seen_ms=record.last_seen_ms, last_type=record.last_type,
        battery=battery(record.facts), firmware=str(record.facts.get("firmware") or "-"))


def fleet(records: Iterable[DeviceRecord], *, now_ms: int,
          presence: Mapping[str, PresenceRecord],
          paused: Mapping[tuple[str, str], tuple[int, str]], sites: SiteBook) -> list[SiteView]:
    """Every device by site (sites by name, ``unassigned`` last), problems first in each."""
    by_site: dict[str, SiteView] = {}
    for record in records:
        row = device_row(record, now_ms=now_ms, presence=presence, paused=paused, sites=sites)
        by_site.setdefault(row.site, SiteView(row.site)).rows.append(row)
    for view in by_site.values():
        view.rows.sort(key=lambda r: (STATE_ORDER.index(r.state), not r.low_battery, r.gateway,
                                      r.device))
    return sorted(by_site.values(), key=lambda v: (v.name == UNASSIGNED, v.name))


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One line of an incident's timeline."""

    at_ms: int
    what: str
    who: str = ""
    detail: str = ""
    tone: str = ""  # crit, warn, ok or nothing: the colour of ``what``


_DONE = {"acknowledge": "Acknowledged", "resolve": "Resolved", "silence": "Silenced"}
_KIND = {"firing": "Alert", "escalation": "Escalation", "resolved": "Resolved message",
         "digest": "Digest"}


def _notification_entry(note: Notification) -> TimelineEntry:
    what = f"{_KIND.get(note.kind, note.kind)} to {note.channel}: {note.state}"
    if note.sent_ms is not None and note.sent_ms - note.created_ms >= 1000:
        what += f" {format_age(note.created_ms, now_ms=note.sent_ms)} later"
    detail = note.title
    if note.last_error:
        detail += f" ({note.last_error})"
    tone = {"failed": "crit", "sent": "ok", "cancelled": ""}.get(note.state, "warn")
    if note.attempts > 1:
        detail += f", {note.attempts} attempts"
    return TimelineEntry(note.created_ms, what, detail=detail, tone=tone)


def timeline(incident: Incident, actions: Sequence[IncidentAction],
             notifications: Sequence[Notification]) -> list[TimelineEntry]:
    """Everything that happened to an incident, oldest first: triggered, raised again, each
    message queued (and whether it went out), what people did (and by which way), acknowledged,
    resolved."""
    entries = [TimelineEntry(incident.triggered_ms, "Triggered", detail=incident.summary,
                             tone="crit" if incident.severity == "critical" else "warn")]
    if incident.follows_id is not None:
        entries.append(TimelineEntry(incident.triggered_ms,
                                     f"Follows incident {incident.follows_id}"))
    if incident.raises > 1 and incident.last_raised_ms is not None:
        entries.append(TimelineEntry(incident.last_raised_ms,
                                     f"Raised again ({incident.raises} raises)", tone="crit"))
    entries += [_notification_entry(note) for note in notifications]
    entries += [TimelineEntry(action.at_ms, _DONE.get(action.action, action.action),
                              who=f"{action.by} via {action.via}", detail=action.detail,
                              tone="ok") for action in actions]
    done = {action.action for action in actions}
    if incident.acknowledged_ms is not None and "acknowledge" not in done:
        entries.append(TimelineEntry(incident.acknowledged_ms, "Acknowledged",
                                     who=incident.acknowledged_by or "", tone="ok"))
    if incident.resolved_ms is not None and "resolve" not in done:
        entries.append(TimelineEntry(incident.resolved_ms, "Resolved",
                                     who=incident.resolved_by or "", tone="ok"))
    return sorted(entries, key=lambda entry: entry.at_ms)  # stable: ties keep their order
