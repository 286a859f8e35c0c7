"""MQTT topics of contract v1, in one place.

``careflow/v1/{gateway}/{device}/{type}`` carries one event; ``careflow/v1/{gateway}/batch`` a JSON
array of events from one gateway. Topics never start with ``$`` (brokers reserve those).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "EVENT_SUBSCRIPTIONS",
    "BatchTopic",
    "EventTopic",
    "batch_topic",
    "event_topic",
    "parse_topic",
]

PREFIX = "careflow/v1"
EVENT_SUBSCRIPTIONS = (f"{PREFIX}/+/+/+", f"{PREFIX}/+/batch")

_TOPIC_MATCHER = re.compile(
    r"^careflow/v1/(?P<gateway>[^/+#]+)/(?:(?P<batch>batch)|(?P<device>[^/+#]+)/(?P<type>[^/+#]+))\Z"
)


@dataclass(frozen=True, slots=True)
class EventTopic:
    """A single-event topic: the source it names must match the payload."""

    gateway: str
    device: str
    type: str


@dataclass(frozen=True, slots=True)
class BatchTopic:
    """A batch topic: every event in it must come from ``gateway``."""

    gateway: str


def parse_topic(topic: str) -> EventTopic | BatchTopic | None:
    """Split a topic into its parts, or None if it is not an event topic of contract v1."""
    match = _TOPIC_MATCHER.match(topic)
    if match is None:
        return None
    if match["batch"]:
        return BatchTopic(match["gateway"])
    return EventTopic(match["gateway"], match["device"], match["type"])


def event_topic(gateway: str, device: str, event_type: str) -> str:
    """The topic a single event is published on."""
    return f"{PREFIX}/{gateway}/{device}/{event_type}"


def batch_topic(gateway: str) -> str:
    """The topic a gateway publishes batches on."""
    return f"{PREFIX}/{gateway}/batch"
