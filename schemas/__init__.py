"""The event contract, shared by edge and hub: JSON Schema files, pydantic models, topics, codec."""

from careflow.schemas.codec import decode_batch, decode_json, parse_event, validate_event
from careflow.schemas.models import CONTRACT_VERSION, EVENT_TYPES, Event, event_adapter
from careflow.schemas.timefmt import format_rfc3339, parse_rfc3339
from careflow.schemas.topics import (
    EVENT_SUBSCRIPTIONS,
    BatchTopic,
    EventTopic,
    batch_topic,
    event_topic,
    parse_topic,
)

__all__ = [
    "CONTRACT_VERSION",
    "EVENT_SUBSCRIPTIONS",
    "EVENT_TYPES",
    "BatchTopic",
    "Event",
    "EventTopic",
    "batch_topic",
    "decode_batch",
    "decode_json",
    "event_adapter",
    "event_topic",
    "format_rfc3339",
    "parse_event",
    "parse_rfc3339",
    "parse_topic",
    "validate_event",
]
