"""Pure translation of careflow's records into InfluxDB line protocol (design: docs/influxdb.md).

Every timestamp and series key depends only on the record, so writing a record twice overwrites
its point: replays and retries never duplicate.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from careflow.hub.fleet.sites import SiteBook
from careflow.hub.store.records import DeviceRecord, Incident, PresenceChange, StoredEvent

__all__ = [
    "UNREPRESENTABLE",
    "DeviceSnapshot",
    "device_online",
    "device_status_points",
    "event_points",
    "event_timestamp_ns",
    "hub_points",
    "incident_points",
    "line",
    "presence_points",
    "tag_value_as_stored",
]

_NS_PER_MS = 1_000_000
_HEARTBEAT_NUMBERS = ("interval_s", "uptime_s", "cpu_pct", "mem_pct", "disk_pct", "rssi_dbm")
_DEFAULT_STALE_MS = 180_000  # a device that never declared an interval is late after 3 minutes

FieldValue = str | int | float | bool


_KEY_SPECIALS = re.compile(r"[,= ]")
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_LINE_BREAKS = re.compile(r"[\r\n]")
_UNSAFE_TAG = re.compile(r"[,= \r\n]|\\$")
UNREPRESENTABLE = "\ufffd"


def tag_value_as_stored(text: str) -> str:
    """What InfluxDB will hold for the tag value ``text``: the same text where line protocol can
    carry it (that is, nearly always).

    Two things a tag cannot carry, decided here and documented in docs/influxdb.md:
    a line break ends the point, so CR and LF become spaces; and a tag value cannot end in a
    backslash (InfluxDB reads it as escaping the separator after it and refuses the whole line,
    whatever escaping is tried), so a final backslash is kept and U+FFFD is added after it.
    """
    if "\n" in text or "\r" in text:
        text = _LINE_BREAKS.sub(" ", text)
    return text + UNREPRESENTABLE if text.endswith("\\") else text


def _escape_key(text: str) -> str:
    """Tag keys and field keys (careflow's own names): commas, equals signs and spaces."""
    return text.translate(_KEY_ESCAPES) if _KEY_SPECIALS.search(text) else text


def _escape_tag_value(text: str) -> str:
    """A tag value as line protocol: commas, equals signs and spaces escaped.

    A backslash is literal in InfluxDB 1.x and 2.x tag values (they unescape only ``\\,``,
    ``\\=`` and ``\\ ``), so it stays as it is; :func:`tag_value_as_stored` first makes the
    value representable. Most ids need no escaping, so one regex search decides.
    """
    if not _UNSAFE_TAG.search(text):
        return text
    return tag_value_as_stored(text).translate(_KEY_ESCAPES)


def _escape_measurement(text: str) -> str:
    return text.replace(",", "\\,").replace(" ", "\\ ")


def _field(value: FieldValue) -> str | None:
    if isinstance(value, bool):
        return f"{int(value)}i"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=65_536)
def _series(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """Measurement and escaped tags; a fleet repeats a few thousand of these endlessly."""
    tag_text = "".join(f",{_escape_key(key)}={_escape_tag_value(value)}"
                       for key, value in tags if value)
    return _escape_measurement(measurement) + tag_text


def line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue | None],
         timestamp_ns: int) -> str | None:
    """One point; None when no field has a value (InfluxDB refuses a point without fields).

    Tags are sorted (InfluxDB's own order, cheapest to index) and empty tag values are left out,
    since line protocol cannot express them.
    """
    rendered = [
        f"{_escape_key(key)}={text}"
        for key, value in fields.items()
        if value is not None and (text := _field(value)) is not None
    ]
    if not rendered:
        return None
    return f"{_series(measurement, tuple(sorted(tags.items())))} {','.join(rendered)} {timestamp_ns}"


def _number(value: object) -> float | None:
    """JSON numbers as floats, so a field never flips between integer and float types."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def event_timestamp_ns(event: StoredEvent) -> int:
    """The event's own time, plus up to a millisecond of offset from (boot, seq).

    InfluxDB keeps one point per series and timestamp. The offset keeps one source's events in
    the same millisecond apart (seq rises by one within a boot), and a device without a clock
    that restarts at the same time with seq 1 again apart from its earlier boot (the boot's
    CRC32 shifts the offset). It depends on nothing but the event, so replays overwrite.
    """
    offset = (zlib.crc32(event.boot.encode()) + event.seq) % _NS_PER_MS
    return event.time_ms * _NS_PER_MS + offset


def event_points(event: StoredEvent, data: Mapping[str, Any], site: str) -> list[str]:
    """The points one event becomes: always ``events``, plus its type's own measurement."""
    ts = event_timestamp_ns(event)
    where = {"site": site, "gateway": event.gateway, "device": event.device}
    # the two points nearly every event makes, rendered directly: this is the sink's hot path
    base = (("device", event.device), ("gateway", event.gateway), ("site", site))
    points: list[str | None] = [
        f"{_series('events', (*base, ('type', event.type)))} "
        f"seq={event.seq}i,skew_ms={event.received_ms - event.time_ms}i {ts}"]
    battery = _number(data.get("battery_pct"))
    if battery is not None and math.isfinite(battery):
        points.append(f"{_series('battery', base)} pct={battery!r} {ts}")
    if event.type == "heartbeat":
        numbers: dict[str, FieldValue | None] = {
            key: _number(data.get(key)) for key in _HEARTBEAT_NUMBERS}
        points.append(line("heartbeat", where,
                           {**numbers, "firmware": _text(data.get("firmware"))}, ts))
    elif event.type == "status":
        state = str(data.get("state", ""))
        points.append(line("status", {**where, "state": state},
                           {"ok": int(state == "ok"), "message": _text(data.get("message")),
                            "firmware": _text(data.get("firmware"))}, ts))
    elif event.type == "error":
        tags = {**where, "severity": str(data.get("severity") or "error"),
                "component": str(data.get("component") or "")}
        points.append(line("error", tags, {"code": _text(data.get("code")),
                                           "message": _text(data.get("message")),
                                           "seq": event.seq}, ts))
    elif event.type == "alert":
        tags = {**where, "kind": str(data.get("kind", "")), "state": str(data.get("state", ""))}
        points.append(line("alarm", tags, {"location": _text(data.get("location")),
                                           "seq": event.seq}, ts))
    elif event.type == "provision":
        tags = {**where, "action": str(data.get("action", "")), "kind": str(data.get("kind", ""))}
        points.append(line("provision", tags, {"serial": _text(data.get("serial")),
                                               "firmware": _text(data.get("firmware")),
                                               "seq": event.seq}, ts))
    return [point for point in points if point is not None]


def presence_points(change: PresenceChange, site: str) -> list[str]:
    """A gateway going online or offline (the connection counter keeps timestamps apart)."""
    ts = change.changed_ms * _NS_PER_MS + change.conn % _NS_PER_MS
    point = line("presence", {"site": site, "gateway": change.gateway},
                 {"online": int(change.state == "online"), "state": change.state,
                  "reason": change.reason}, ts)
    return [point] if point else []


def incident_points(incident: Incident, site: str) -> list[str]:
    """One point per phase the incident has reached, with time-to-acknowledge/-resolve."""
    tags = {"site": site, "gateway": incident.gateway, "rule": incident.rule,
            "severity": incident.severity}
    offset = incident.id % _NS_PER_MS
    tta_s = ((incident.acknowledged_ms - incident.triggered_ms) / 1000
             if incident.acknowledged_ms is not None else None)
    phases: list[tuple[str, int, dict[str, FieldValue | None]]] = [
        ("opened", incident.triggered_ms, {"id": incident.id, "summary": incident.summary})]
    if incident.acknowledged_ms is not None:
        phases.append(("acknowledged", incident.acknowledged_ms,
                       {"id": incident.id, "tta_s": tta_s}))
    if incident.resolved_ms is not None:
        phases.append(("resolved", incident.resolved_ms,
                       {"id": incident.id, "tta_s": tta_s,
                        "ttr_s": (incident.resolved_ms - incident.triggered_ms) / 1000}))
    points = [line("incident", {**tags, "phase": phase}, fields, at_ms * _NS_PER_MS + offset)
              for phase, at_ms, fields in phases]
    return [point for point in points if point is not None]


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device as the minute snapshot sees it."""

    gateway: str
    device: str
    online: bool
    heartbeat_age_s: float
    last_seen_ms: int


def device_online(record: DeviceRecord, *, gateway_online: bool | None, now_ms: int) -> bool:
    """Fresh enough (younger than twice its declared heartbeat interval) and reachable."""
    interval_s = record.facts.get("interval_s")
    stale_ms = (2 * int(interval_s) * 1000 if isinstance(interval_s, int | float) and interval_s
                else _DEFAULT_STALE_MS)
    return now_ms - record.last_seen_ms <= stale_ms and gateway_online is not False


def device_status_points(snapshots: Iterable[DeviceSnapshot], sites: SiteBook,
                         now_ms: int) -> list[str]:
    """The minute snapshot: online and heartbeat age of every device, for uptime charts."""
    points = []
    for snap in snapshots:
        role = "gateway" if snap.device == snap.gateway else "sensor"
        point = line("device_status",
                     {"site": sites.site_of(snap.gateway), "gateway": snap.gateway,
                      "device": snap.device, "role": role},
                     {"online": int(snap.online), "heartbeat_age_s": snap.heartbeat_age_s,
                      "last_seen_ms": snap.last_seen_ms}, now_ms * _NS_PER_MS)
        if point:
            points.append(point)
    return points


def hub_points(health: Mapping[str, Any], *, hub: str, backlog_events: int,
               open_incidents: int, now_ms: int) -> list[str]:
    """The hub's own health, so dashboards show when the watcher itself struggles."""
    point = line("hub", {"hub": hub}, {
        "events_per_s": _number(health.get("events_per_s")),
        "commit_latency_ms": _number(health.get("commit_latency_ms")),
        "event_age_ms": _number(health.get("event_age_ms")),
        "queue_depth": int(health.get("queue_depth") or 0),
        "dead_lettered": int(health.get("dead_lettered") or 0),
        "backlog_events": backlog_events,
        "open_incidents": open_incidents,
        "connected": int(bool(health.get("connected"))),
    }, now_ms * _NS_PER_MS)
    return [point] if point else []
