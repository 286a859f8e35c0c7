"""Event contract v1 as pydantic models: the hub's hot-path validator.

These models must accept and reject exactly what the JSON Schema files in this folder do;
``tests/schemas/test_drift.py`` proves it on every example and on generated events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
)

from careflow.schemas.timefmt import parse_rfc3339

__all__ = [
    "CONTRACT_VERSION",
    "EVENT_TYPES",
    "AlertData",
    "AlertEvent",
    "ErrorData",
    "ErrorEvent",
    "Event",
    "EventType",
    "HeartbeatData",
    "HeartbeatEvent",
    "ProvisionData",
    "ProvisionEvent",
    "StatusData",
    "StatusEvent",
    "event_adapter",
]

CONTRACT_VERSION = 1
EventType: TypeAlias = Literal["heartbeat", "status", "error", "provision", "alert"]
EVENT_TYPES: tuple[str, ...] = ("heartbeat", "status", "error", "provision", "alert")

_END = r"(?![\s\S])"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" + _END
UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}" + _END
MAX_SAFE_INTEGER = 9007199254740991


def _integral_float_to_int(value: object) -> object:
    """JSON Schema counts 1.0 as an integer; strict pydantic would not. Align with the schema."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_timestamp(value: str) -> str:
    parse_rfc3339(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Timestamp = Annotated[str, AfterValidator(_check_timestamp)]
Percent = Annotated[float, Field(ge=0, le=100)]
Rssi = Annotated[float, Field(ge=-200, le=0)]
Text64 = Annotated[str, Field(min_length=1, max_length=64)]
LabelValue = Annotated[str, Field(max_length=256)]

_STRICT = ConfigDict(strict=True, regex_engine="python-re", frozen=True, extra="forbid")
_OPEN = ConfigDict(strict=True, regex_engine="python-re", frozen=True, extra="allow")


class HeartbeatData(BaseModel):
    """The source is alive; ``interval_s`` says when the next heartbeat is due."""

    model_config = _OPEN
    interval_s: Annotated[JsonInt, Field(ge=1, le=86400)]
    uptime_s: Annotated[float, Field(ge=0)] | None = None
    battery_pct: Percent | None = None
    cpu_pct: Percent | None = None
    mem_pct: Percent | None = None
    disk_pct: Percent | None = None
    rssi_dbm: Rssi | None = None
    firmware: Text64 | None = None


class StatusData(BaseModel):
    """A device reports its condition."""

    model_config = _OPEN
    state: Literal["ok", "degraded", "fault"]
    battery_pct: Percent | None = None
    rssi_dbm: Rssi | None = None
    firmware: Text64 | None = None
    message: Annotated[str, Field(max_length=1024)] | None = None


class ErrorData(BaseModel):
    """Something went wrong on the source."""

    model_config = _OPEN
    code: Text64
    message: Annotated[str, Field(min_length=1, max_length=4096)]
    severity: Literal["info", "warning", "error", "critical"] | None = None
    component: Text64 | None = None


class ProvisionData(BaseModel):
    """A child device was added to, changed on or removed from its gateway."""

    model_config = _OPEN
    action: Literal["added", "updated", "removed"]
    kind: Text64
    serial: Text64 | None = None
    firmware: Text64 | None = None
    labels: Annotated[dict[Name, LabelValue], Field(max_length=32)] | None = None


class AlertData(BaseModel):
    """A care alarm raised by a device: SOS button, fall, door, ..."""

    model_config = _OPEN
    kind: Literal["sos", "fall", "door", "wander", "inactivity", "smoke", "medical", "other"]
    state: Literal["raised", "cleared"]
    message: Annotated[str, Field(max_length=1024)] | None = None
    location: Annotated[str, Field(max_length=256)] | None = None


class _Envelope(BaseModel):
    model_config = _STRICT
    v: Annotated[JsonInt, Field(ge=CONTRACT_VERSION, le=CONTRACT_VERSION)]
    id: Annotated[str, Field(pattern=UUID7_PATTERN)]
    gateway: Name
    device: Name
    time: Timestamp
    boot: Name
    seq: Annotated[JsonInt, Field(ge=1, le=MAX_SAFE_INTEGER)]

    @property
    def moment(self) -> datetime:
        """The event time as an aware datetime."""
        return parse_rfc3339(self.time)


class HeartbeatEvent(_Envelope):
    """A heartbeat event."""

    type: Literal["heartbeat"]
    data: HeartbeatData


class StatusEvent(_Envelope):
    """A status event."""

    type: Literal["status"]
    data: StatusData


class ErrorEvent(_Envelope):
    """An error event."""

    type: Literal["error"]
    data: ErrorData


class ProvisionEvent(_Envelope):
    """A provision event."""

    type: Literal["provision"]
    data: ProvisionData


class AlertEvent(_Envelope):
    """A care alarm event."""

    type: Literal["alert"]
    data: AlertData


Event: TypeAlias = Annotated[
    HeartbeatEvent | StatusEvent | ErrorEvent | ProvisionEvent | AlertEvent,
    Field(discriminator="type"),
]

event_adapter: TypeAdapter[Event] = TypeAdapter(Event)

