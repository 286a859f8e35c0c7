"""MQTT topics of contract v1, in one place.

``careflow/v1/{gateway}/{device}/{type}`` carries one event; ``careflow/v1/{gateway}/batch`` a JSON
array of events from one gateway; ``careflow/v1/{gateway}/state`` the gateway's retained presence
(``online``, or ``offline`` as its Last Will); ``careflow/v1/{gateway}/ack`` the hub's confirmations
of what it stored; ``careflow/v1/{gateway}/cmd`` and ``.../reply`` carry remote commands and their
answers (one level, with the command name in the payload, so they can never be mistaken for an
event topic ``careflow/v1/{gateway}/{device}/{type}``). Topics never start with ``$``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "EVENT_SUBSCRIPTIONS",
    "BatchTopic",
    "EventTopic",
    "StateTopic",
    "ack_topic",
    "batch_topic",
    "command_topic",
    "event_topic",
    "parse_topic",
    "reply_topic",
    "state_topic",
]

PREFIX = "careflow/v1"
EVENT_SUBSCRIPTIONS = (f"{PREFIX}/+/+/+", f"{PREFIX}/+/batch", f"{PREFIX}/+/state")

_TOPIC_MATCHER = re.compile(
    r"^careflow/v1/(?P<gateway>[^/+#]+)/"
    r"(?:(?P<batch>batch)|(?P<state>state)|(?P<device>[^/+#]+)/(?P<type>[^/+#]+))\Z"
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


@dataclass(frozen=True, slots=True)
class StateTopic:
    """A gateway's presence topic."""

    gateway: str


def parse_topic(topic: str) -> EventTopic | BatchTopic | StateTopic | None:
    """Split a topic into its parts, or None if it is not a topic the hub consumes."""
    match = _TOPIC_MATCHER.match(topic)
    if match is None:
        return None
    if match["batch"]:
        return BatchTopic(match["gateway"])
    if match["state"]:
        return StateTopic(match["gateway"])
    return EventTopic(match["gateway"], match["device"], match["type"])


def event_topic(gateway: str, device: str, event_type: str) -> str:
    """The topic a single event is published on."""
    return f"{PREFIX}/{gateway}/{device}/{event_type}"


def batch_topic(gateway: str) -> str:
    """The topic a gateway publishes batches on."""
    return f"{PREFIX}/{gateway}/batch"


def state_topic(gateway: str) -> str:
    """The retained presence topic of a gateway (its Last Will goes here too)."""
    return f"{PREFIX}/{gateway}/state"


def ack_topic(gateway: str) -> str:
    """Where the hub confirms to a gateway which events it has durably stored."""
    return f"{PREFIX}/{gateway}/ack"


def command_topic(gateway: str) -> str:
    """Where a gateway receives remote commands."""
    return f"{PREFIX}/{gateway}/cmd"


def reply_topic(gateway: str) -> str:
    """Where a gateway answers remote commands (the payload carries the correlation id)."""
    return f"{PREFIX}/{gateway}/reply"
