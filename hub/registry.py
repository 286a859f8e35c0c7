"""Pure folding of stored events into device-registry updates.

"Newest wins" is by event time, not arrival, so an old event replayed from a gateway's buffer
never overwrites a newer battery level or status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from careflow.hub.store import StoredEvent

__all__ = ["FACTS", "JSON_FACTS", "DeviceUpdate", "SourceUpdate", "summarize"]

# fact name -> (event type that carries it or None for any, key inside data)
FACTS: dict[str, tuple[str | None, str]] = {
    "battery_pct": (None, "battery_pct"),
    "firmware": (None, "firmware"),
    "interval_s": ("heartbeat", "interval_s"),
    "condition": ("status", "state"),  # what the device says of itself: ok, degraded, fault
    "kind": ("provision", "kind"),
    # a child device onboarded by its gateway: serial, labels {site, room, ...}, added/removed
    "serial": ("provision", "serial"),
    "labels": ("provision", "labels"),
    "membership": ("provision", "action"),
}
# facts whose values are JSON objects; stored as JSON text
JSON_FACTS = frozenset({"labels"})


@dataclass(slots=True)
class DeviceUpdate:
    """What a batch says about one device."""

    gateway: str
    device: str
    first_seen_ms: int
    last_seen_ms: int
    events: int
    last_time_ms: int
    last_type: str
    boot: str
    seq: int
    skew_ms: int
    facts: dict[str, tuple[Any, int]] = field(default_factory=dict)  # name -> (value, time_ms)


@dataclass(slots=True)
class SourceUpdate:
    """What a batch says about one boot of one source (for sequence-gap accounting)."""

    gateway: str
    device: str
    boot: str
    max_seq: int
    received: int
    first_seen_ms: int


def _newer(time_ms: int, seq: int, than_time_ms: int, than_seq: int) -> bool:
    return (time_ms, seq) >= (than_time_ms, than_seq)


def summarize(
    events: Iterable[tuple[StoredEvent, Mapping[str, Any]]],
) -> tuple[list[DeviceUpdate], list[SourceUpdate]]:
    """Fold (event, its data) pairs into one update per device and one per (device, boot)."""
    devices: dict[tuple[str, str], DeviceUpdate] = {}
    sources: dict[tuple[str, str, str], SourceUpdate] = {}
    for ev, data in events:
        update = devices.get((ev.gateway, ev.device))
        if update is None:
            update = DeviceUpdate(ev.gateway, ev.device, ev.received_ms, ev.received_ms, 0,
                                  ev.time_ms, ev.type, ev.boot, ev.seq,
                                  ev.received_ms - ev.time_ms)
            devices[(ev.gateway, ev.device)] = update
        update.events += 1
        update.first_seen_ms = min(update.first_seen_ms, ev.received_ms)
        update.last_seen_ms = max(update.last_seen_ms, ev.received_ms)
        if _newer(ev.time_ms, ev.seq, update.last_time_ms, update.seq):
            update.last_time_ms, update.last_type = ev.time_ms, ev.type
            update.boot, update.seq = ev.boot, ev.seq
            update.skew_ms = ev.received_ms - ev.time_ms
        for name, (only_type, key) in FACTS.items():
            if key in data and (only_type is None or only_type == ev.type):
                known = update.facts.get(name)
                if known is None or ev.time_ms >= known[1]:
                    update.facts[name] = (data[key], ev.time_ms)
        source = sources.get((ev.gateway, ev.device, ev.boot))
        if source is None:
            source = SourceUpdate(ev.gateway, ev.device, ev.boot, ev.seq, 0, ev.received_ms)
            sources[(ev.gateway, ev.device, ev.boot)] = source
        source.max_seq = max(source.max_seq, ev.seq)
        source.received += 1
    return list(devices.values()), list(sources.values())
