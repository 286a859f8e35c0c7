"""Event contract v1 as pydantic types: the hub's hot-path validator.

Together with ``codec.validate_event`` (which adds the calendar check), these types accept and
reject exactly what the JSON Schema files in this folder do;
``tests/schemas/test_contract.py`` proves it on every example and on generated events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple, NotRequired, TypeAlias

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    with_config,
)
from typing_extensions import TypedDict

__all__ = [
    "CONTRACT_VERSION",
    "EVENT_TYPES",
    "AlertData",
    "AlertEvent",
    "ErrorData",
    "ErrorEvent",
    "Event",
    "EventHead",
    "EventType",
    "HeartbeatData",
    "HeartbeatEvent",
    "Presence",
    "ProvisionData",
    "ProvisionEvent",
    "StatusData",
    "StatusEvent",
    "event_adapter",
    "event_list_adapter",
    "presence_adapter",
]

CONTRACT_VERSION = 1
EventType: TypeAlias = Literal["heartbeat", "status", "error", "provision", "alert"]
EVENT_TYPES: tuple[str, ...] = ("heartbeat", "status", "error", "provision", "alert")

# Patterns use pydantic's Rust regex engine, where `$` is the very end of the string. The JSON
# Schema files spell the same end as `(?![\s\S])`, because Python's `re` (used by jsonschema) lets
# `$` match before a trailing newline. The drift tests prove the two spellings agree.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
RFC3339_SHAPE = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                 r"(Z|[+-][0-9]{2}:[0-9]{2})$")
MAX_SAFE_INTEGER = 9007199254740991


def _json_int(ge: int, le: int) -> object:
    # An integer as JSON Schema means it: 7 or 7.0, never true or "7". Strict pydantic refuses
    # 7.0, so a float without fraction is a second union member (checked in Rust, no Python call
    # on the hot path). Code reading these fields converts with int().
    return Annotated[
        Annotated[int, Field(ge=ge, le=le)] | Annotated[float, Field(ge=ge, le=le, multiple_of=1)],
        Field(union_mode="left_to_right"),
    ]


if TYPE_CHECKING:
    VersionInt: TypeAlias = int | float
    SeqInt: TypeAlias = int | float
    IntervalInt: TypeAlias = int | float
else:
    VersionInt = _json_int(CONTRACT_VERSION, CONTRACT_VERSION)
    SeqInt = _json_int(1, MAX_SAFE_INTEGER)
    IntervalInt = _json_int(1, 86400)
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Uuid7 = Annotated[str, Field(pattern=UUID7_PATTERN)]
# The calendar (no February 30th) is checked by codec.validate_event, outside the Rust core,
# where the parsed time is needed anyway: one parse per event instead of two.
Timestamp = Annotated[str, Field(pattern=RFC3339_SHAPE)]
Percent = Annotated[float, Field(ge=0, le=100)]
Rssi = Annotated[float, Field(ge=-200, le=0)]
Text64 = Annotated[str, Field(min_length=1, max_length=64)]
LabelValue = Annotated[str, Field(max_length=256)]

# The events are TypedDicts, not BaseModels: validating into plain dicts measured 2-3 us per
# event against 8-10 us for building frozen model instances (bench/ingest.py's heartbeats),
# and the hub never needed the instances: it keeps the envelope as an EventHead and the data
# as the decoded JSON object.
_STRICT_DICT = ConfigDict(strict=True, extra="forbid")
_OPEN_DICT = ConfigDict(strict=True, extra="allow")


@with_config(_OPEN_DICT)
class HeartbeatData(TypedDict):
    """The source is alive; ``interval_s`` says when the next heartbeat is due."""

    interval_s: IntervalInt
    uptime_s: NotRequired[Annotated[float, Field(ge=0)]]
    battery_pct: NotRequired[Percent]
    cpu_pct: NotRequired[Percent]
    mem_pct: NotRequired[Percent]
    disk_pct: NotRequired[Percent]
    rssi_dbm: NotRequired[Rssi]
    firmware: NotRequired[Text64]


@with_config(_OPEN_DICT)
class StatusData(TypedDict):
    """A device reports its condition."""

    state: Literal["ok", "degraded", "fault"]
    battery_pct: NotRequired[Percent]
    rssi_dbm: NotRequired[Rssi]
    firmware: NotRequired[Text64]
    message: NotRequired[Annotated[str, Field(max_length=1024)]]


@with_config(_OPEN_DICT)
class ErrorData(TypedDict):
    """Something went wrong on the source."""

    code: Text64
    message: Annotated[str, Field(min_length=1, max_length=4096)]
    severity: NotRequired[Literal["info", "warning", "error", "critical"]]
    component: NotRequired[Text64]


@with_config(_OPEN_DICT)
class ProvisionData(TypedDict):
    """A child device was added to, changed on or removed from its gateway."""

    action: Literal["added", "updated", "removed"]
    kind: Text64
    serial: NotRequired[Text64]
    firmware: NotRequired[Text64]
    labels: NotRequired[Annotated[dict[Name, LabelValue], Field(max_length=32)]]


@with_config(_OPEN_DICT)
class AlertData(TypedDict):
    """A care alarm raised by a device: SOS button, fall, door, ..."""

    kind: Literal["sos", "fall", "door", "wander", "inactivity", "smoke", "medical", "other"]
    state: Literal["raised", "cleared"]
    message: NotRequired[Annotated[str, Field(max_length=1024)]]
    location: NotRequired[Annotated[str, Field(max_length=256)]]


class _Envelope(TypedDict):
    """What every event carries besides its type and data."""

    v: VersionInt
    id: Uuid7
    gateway: Name
    device: Name
    time: Timestamp
    boot: Name
    seq: SeqInt


# A TypedDict does not pass its pydantic config on to subclasses: each event type sets it.
@with_config(_STRICT_DICT)
class HeartbeatEvent(_Envelope):
    """A heartbeat event."""

    type: Literal["heartbeat"]
    data: HeartbeatData


@with_config(_STRICT_DICT)
class StatusEvent(_Envelope):
    """A status event."""

    type: Literal["status"]
    data: StatusData


@with_config(_STRICT_DICT)
class ErrorEvent(_Envelope):
    """An error event."""

    type: Literal["error"]
    data: ErrorData


@with_config(_STRICT_DICT)
class ProvisionEvent(_Envelope):
    """A provision event."""

    type: Literal["provision"]
    data: ProvisionData


@with_config(_STRICT_DICT)
class AlertEvent(_Envelope):
    """A care alarm event."""

    type: Literal["alert"]
    data: AlertData


Event: TypeAlias = Annotated[
    HeartbeatEvent | StatusEvent | ErrorEvent | ProvisionEvent | AlertEvent,
    Field(discriminator="type"),
]

event_adapter: TypeAdapter[Event] = TypeAdapter(Event)
# A whole batch in one call into the Rust core (the same validator per item as event_adapter).
event_list_adapter: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


class EventHead(NamedTuple):
    """A validated event's envelope: what the hub stores, dedupes and routes by.

    A NamedTuple (cheap to build, and a decode worker process sends it back as a plain tuple).
    """

    id: str
    gateway: str
    device: str
    type: str
    time: str
    boot: str
    seq: int

    @property
    def position(self) -> tuple[str, str, str, int]:
        """Where this event sits in its source's sequence: (gateway, device, boot, seq)."""
        return (self.gateway, self.device, self.boot, self.seq)


@with_config(_OPEN_DICT)
class Presence(TypedDict):
    """A gateway's retained presence: ``online`` on connect, ``offline`` as Last Will or on stop."""

    v: VersionInt
    state: Literal["online", "offline"]
    conn: SeqInt
    boot: Name
    reason: NotRequired[Annotated[str, Field(max_length=256)]]


presence_adapter: TypeAdapter[Presence] = TypeAdapter(Presence)
