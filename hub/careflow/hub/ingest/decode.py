"""Pure decoding of one MQTT message into accepted events and rejections.

No I/O here: the service feeds messages in and hands the result to the store. Every way a message
can be wrong ends as a :class:`Rejected` with a stable code and a reason a person can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NamedTuple

from careflow.core.errors import ContractError
from careflow.schemas import (
    BatchTopic,
    EventHead,
    EventTopic,
    StateTopic,
    decode_batch,
    decode_json,
    parse_presence,
    parse_topic,
    validate_event,
    validate_events,
)

__all__ = [
    "Accepted",
    "Decoded",
    "EventHead",
    "PresenceUpdate",
    "Rejected",
    "decode_message",
    "shut_out",
]


class Accepted(NamedTuple):
    """A valid event, with the JSON text to store for it.

    A NamedTuple rather than a frozen dataclass: one is built per event on the hot path, and
    the frozen dataclass cost 1.9 us to build against 0.8 us.
    """

    event: EventHead
    body: str
    topic: str
    data: Mapping[str, Any]  # the decoded ``data`` object, kept to avoid parsing twice
    time_ms: int  # the event time in epoch milliseconds


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input that breaks the contract; goes to the dead-letter store with its reason."""

    topic: str
    code: str
    reason: str
    payload: bytes
    index: int | None = None  # position inside a batch
    retained: bool = False  # delivered by the broker as a retained message (again at resubscribe)


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """A gateway said it is online, or its Last Will said it is offline."""

    gateway: str
    state: str
    conn: int
    boot: str
    reason: str | None


class Decoded(NamedTuple):
    """What one MQTT message turned into (a NamedTuple: one is built per message, twice with
    a decode worker)."""

    accepted: tuple[Accepted, ...]
    rejected: tuple[Rejected, ...]
    presence: tuple[PresenceUpdate, ...] = ()


def _spoof_reason(event: EventHead, topic: str) -> str:
    return (f"payload speaks for gateway={event.gateway} device={event.device} "
            f"type={event.type} but arrived on {topic}; a source may only publish on its own topic")


def _decode_single(topic: str, parsed: EventTopic, payload: bytes, value: object) -> Decoded:
    event, time_ms = validate_event(value)
    if (event.gateway, event.device, event.type) != (parsed.gateway, parsed.device, parsed.type):
        rejection = Rejected(topic, "topic_mismatch", _spoof_reason(event, topic), payload)
        return Decoded((), (rejection,))
    assert isinstance(value, dict)
    return Decoded((Accepted(event, payload.decode("utf-8"), topic, value["data"], time_ms),), ())


def _decode_batch(topic: str, parsed: BatchTopic, payload: bytes) -> Decoded:
    items = decode_batch(payload)
    outcomes: list[tuple[EventHead, int]] | list[tuple[EventHead, int] | ContractError]
    outcomes = validate_events([item for item, _ in items]) or [
        _validate_item(item) for item, _ in items]  # some item is invalid: find which, and why
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    for index, ((item, body), outcome) in enumerate(zip(items, outcomes, strict=True)):
        if isinstance(outcome, ContractError):
            rejected.append(Rejected(topic, outcome.code, str(outcome), body.encode(), index))
        elif outcome[0].gateway != parsed.gateway:
            rejected.append(Rejected(topic, "topic_mismatch", _spoof_reason(outcome[0], topic),
                                     body.encode(), index))
        else:
            accepted.append(Accepted(outcome[0], body, topic, item["data"], outcome[1]))
    return Decoded(tuple(accepted), tuple(rejected))


def _validate_item(item: object) -> tuple[EventHead, int] | ContractError:
    """One item of a batch that failed as a whole: its event, or why it is refused."""
    if isinstance(item, ContractError):  # decode_batch refused it already (too deep)
        return item
    try:
        return validate_event(item)
    except ContractError as exc:
        return exc


def _decode_presence(parsed: StateTopic, payload: bytes) -> Decoded:
    if not payload:  # a retained presence being cleared
        return Decoded((), ())
    state = parse_presence(payload)
    update = PresenceUpdate(parsed.gateway, state["state"], int(state["conn"]), state["boot"],
                            state.get("reason"))
    return Decoded((), (), (update,))


def decode_message(topic: str, payload: bytes, *, max_bytes: int) -> Decoded:
    """Decode, validate and source-check one message; never raises for bad input."""
    if len(payload) > max_bytes:
        reason = (f"payload is {len(payload)} bytes, over the {max_bytes}-byte limit "
                  "(CAREFLOW_MAX_MESSAGE_BYTES); send smaller batches")
        return Decoded((), (Rejected(topic, "oversized", reason, payload),))
    parsed = parse_topic(topic)
    if parsed is None:
        reason = ("not a topic of contract v1: expected careflow/v1/{gateway}/{device}/{type}, "
                  "careflow/v1/{gateway}/batch or careflow/v1/{gateway}/state")
        return Decoded((), (Rejected(topic, "bad_topic", reason, payload),))
    try:
        if isinstance(parsed, StateTopic):
            return _decode_presence(parsed, payload)
        if isinstance(parsed, BatchTopic):
            return _decode_batch(topic, parsed, payload)
        return _decode_single(topic, parsed, payload, decode_json(payload))
    except ContractError as exc:
        return Decoded((), (Rejected(topic, exc.code, str(exc), payload),))


def shut_out(accepted: Sequence[tuple[Accepted, int]], revoked: AbstractSet[str]
             ) -> tuple[list[tuple[Accepted, int]], list[tuple[Rejected, int]]]:
    """Events (with their arrival times) from gateways whose identity was revoked become dead
    letters, never events.

    The broker refuses a revoked certificate, but anything already queued for the hub (or a
    broker without the CRL) must not slip through as if the gateway were still trusted.
    """
    if not revoked:
        return list(accepted), []
    kept: list[tuple[Accepted, int]] = []
    refused: list[tuple[Rejected, int]] = []
    for item, received_ms in accepted:
        if item.event.gateway in revoked:
            refused.append((Rejected(item.topic, "revoked",
                                     f"gateway {item.event.gateway} has been revoked "
                                     "(careflow devices revoke); its events are not accepted",
                                     item.body.encode()), received_ms))
        else:
            kept.append((item, received_ms))
    return kept, refused
