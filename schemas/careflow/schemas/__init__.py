"""The event contract, shared by edge and hub: JSON Schema files, pydantic types, topics, codec."""

from careflow.schemas.codec import (
    check_depth,
    decode_batch,
    decode_json,
    parse_event,
    parse_presence,
    validate_event,
    validate_events,
)
from careflow.schemas.models import (
    CONTRACT_VERSION,
    EVENT_TYPES,
    Event,
    EventHead,
    Presence,
    event_adapter,
)
from careflow.schemas.timefmt import format_rfc3339, parse_rfc3339
from careflow.schemas.topics import (
    EVENT_SUBSCRIPTIONS,
    BatchTopic,
    EventTopic,
    StateTopic,
    ack_topic,
    batch_topic,
    command_topic,
    event_topic,
    parse_topic,
    reply_topic,
    state_topic,
)

__all__ = [
    "CONTRACT_VERSION",
    "EVENT_SUBSCRIPTIONS",
    "EVENT_TYPES",
    "BatchTopic",
    "Event",
    "EventHead",
    "EventTopic",
    "Presence",
    "StateTopic",
    "ack_topic",
    "batch_topic",
    "check_depth",
    "command_topic",
    "decode_batch",
    "decode_json",
    "event_adapter",
    "event_topic",
    "format_rfc3339",
    "parse_event",
    "parse_presence",
    "parse_rfc3339",
    "parse_topic",
    "reply_topic",
    "state_topic",
    "validate_event",
    "validate_events",
]
