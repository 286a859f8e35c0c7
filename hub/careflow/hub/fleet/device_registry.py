"""Pure folding of stored events into device-registry updates.

"Newest wins" is by event time, not arrival, so an old event replayed from a gateway's buffer
never overwrites a newer battery level or status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from careflow.hub.store.records import StoredEvent

__all__ = ["FACTS", "JSON_FACTS", "DeviceUpdate", "SourceUpdate", "beyond_bound", "summarize"]

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


def _facts_for(event_type: str) -> tuple[tuple[str, str], ...]:
    """(fact name, data key) of every fact an event of this type may carry."""
    return tuple((name, key) for name, (only_type, key) in FACTS.items()
                 if only_type is None or only_type == event_type)


def summarize(
    events: Iterable[tuple[StoredEvent, Mapping[str, Any]]],
) -> tuple[list[DeviceUpdate], list[SourceUpdate]]:
    """Fold (event, its data) pairs into one update per device and one per (device, boot)."""
    # This loop runs once per stored event on the commit path: plain comparisons instead of
    # min()/max() calls, and only the facts the event's type can carry.
    devices: dict[tuple[str, str], DeviceUpdate] = {}
    sources: dict[tuple[str, str, str], SourceUpdate] = {}
    facts_by_type: dict[str, tuple[tuple[str, str], ...]] = {}
    for ev, data in events:
        received_ms, time_ms, seq = ev.received_ms, ev.time_ms, ev.seq
        update = devices.get((ev.gateway, ev.device))
        if update is None:
            update = DeviceUpdate(ev.gateway, ev.device, received_ms, received_ms, 0,
                                  time_ms, ev.type, ev.boot, seq, received_ms - time_ms)
            devices[(ev.gateway, ev.device)] = update
        update.events += 1
        if received_ms < update.first_seen_ms:  # noqa: PLR1730 - no call per event
            update.first_seen_ms = received_ms
        if received_ms > update.last_seen_ms:  # noqa: PLR1730
            update.last_seen_ms = received_ms
        if (time_ms, seq) >= (update.last_time_ms, update.seq):  # newest wins, by event time
            update.last_time_ms, update.last_type = time_ms, ev.type
            update.boot, update.seq = ev.boot, seq
            update.skew_ms = received_ms - time_ms
        fact_keys = facts_by_type.get(ev.type)
        if fact_keys is None:
            fact_keys = facts_by_type[ev.type] = _facts_for(ev.type)
        facts = update.facts
        for name, key in fact_keys:
            if key in data:
                known = facts.get(name)
                if known is None or time_ms >= known[1]:
                    facts[name] = (data[key], time_ms)
        source = sources.get((ev.gateway, ev.device, ev.boot))
        if source is None:
            source = SourceUpdate(ev.gateway, ev.device, ev.boot, seq, 0, received_ms)
            sources[(ev.gateway, ev.device, ev.boot)] = source
        if seq > source.max_seq:  # noqa: PLR1730
            source.max_seq = seq
        source.received += 1
    return list(devices.values()), list(sources.values())


def beyond_bound(new_devices: Mapping[str, Sequence[str]], registered: Mapping[str, int], *,
                 bound: int) -> set[tuple[str, str]]:
    """The devices new to the registry that do not fit under the per-gateway bound.

    ``new_devices``: per gateway, the devices not registered yet, in order of first arrival;
    ``registered``: how many devices each gateway has registered. The first newcomers take the
    places left; a gateway itself (device == gateway) is always admitted and never counted
    against its bound. Known devices are never refused, even when a gateway is beyond its bound
    already (say, the bound was lowered): only growth is stopped.
    """
    refused: set[tuple[str, str]] = set()
    for gateway, devices in new_devices.items():
        room = bound - registered.get(gateway, 0)
        for device in devices:
            if device == gateway:
                continue
            if room > 0:
                room -= 1
            else:
                refused.add((gateway, device))
    return refused
