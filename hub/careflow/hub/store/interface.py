"""The narrow storage interface of the hub and the records that cross it.

The hub talks to storage only through :class:`EventStore`, so a PostgreSQL store for several hub
instances can replace the SQLite one without touching ingest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from careflow.hub.alerting.mute import Silence
from careflow.hub.fleet.presence import PresenceRecord
from careflow.hub.ingest.decode import Accepted, PresenceUpdate, Rejected

__all__ = [
    "AppendResult",
    "DeadLetter",
    "DeviceRecord",
    "EventFilter",
    "EventStore",
    "Incident",
    "IncomingBatch",
    "Notification",
    "Outgoing",
    "OverBound",
    "PresenceChange",
    "SourceGap",
    "StoredEvent",
]


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """Decoded messages to commit in one transaction, with their arrival times."""

    accepted: Sequence[tuple[Accepted, int]]  # (event, received_ms)
    rejected: Sequence[tuple[Rejected, int]]
    presence: Sequence[tuple[PresenceUpdate, int]] = ()


class StoredEvent(NamedTuple):
    """One event in the log; ``pos`` is its place in arrival order (the replay cursor).

    A NamedTuple rather than a frozen dataclass: the hub builds one per event on its hot path.
    """

    pos: int
    id: str
    gateway: str
    device: str
    type: str
    time: str
    time_ms: int
    received_ms: int
    boot: str
    seq: int
    body: str

    @property
    def envelope(self) -> dict[str, Any]:
        """The event as it was published."""
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded

    @property
    def data(self) -> dict[str, Any]:
        """The event's ``data`` object."""
        data: dict[str, Any] = self.envelope["data"]
        return data


class PresenceChange(NamedTuple):
    """One accepted change of a gateway's presence; ``pos`` orders the presence log."""

    pos: int
    gateway: str
    state: str
    conn: int
    boot: str
    changed_ms: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class SourceGap:
    """A source (one boot of one device) with events missing below its highest seq."""

    gateway: str
    device: str
    boot: str
    missing: int


@dataclass(frozen=True, slots=True)
class OverBound:
    """An event dead-lettered as ``too_many_devices``: its device, new to the registry, would
    have taken its gateway beyond the per-gateway device bound."""

    gateway: str
    device: str
    type: str
    alarm: bool  # a care alarm (an alert that is raised): someone must hear of it


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What a commit did: events stored, repeats skipped, conflicts and rejections dead-lettered,
    and the sources it touched that still miss events."""

    stored: tuple[StoredEvent, ...]
    duplicates: int
    conflicts: int
    dead_lettered: int
    gaps: tuple[SourceGap, ...] = ()
    data: tuple[Mapping[str, Any], ...] = ()  # each stored event's data, already decoded
    over_bound: tuple[OverBound, ...] = ()  # dead-lettered: beyond the per-gateway device bound


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input the hub refused, kept with its reason so nothing is silently lost."""

    pos: int
    received_ms: int
    topic: str
    code: str
    reason: str
    payload: bytes
    payload_size: int
    batch_index: int | None
    log_pos: int | None = None  # a conflict: the end of the event log after its commit


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """The registry's view of one source (a gateway is a device of itself)."""

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
    gaps: int
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Incident:
    """A rule fired for a source: who was told, who acknowledged, when it ended."""

    id: int
    rule: str
    gateway: str
    device: str
    severity: str
    state: str  # open | acknowledged | resolved
    summary: str
    detail: str
    triggered_ms: int
    acknowledged_ms: int | None
    acknowledged_by: str | None
    resolved_ms: int | None
    resolved_by: str | None
    escalation_sent: int = 0  # escalation steps already sent
    # A care alarm raised again while this incident was unresolved: how many raises it carries
    # (with those of the acknowledged incidents it follows), the first and the newest.
    raises: int = 1
    first_raised_ms: int | None = None
    last_raised_ms: int | None = None
    follows_id: int | None = None  # the acknowledged incident this raise superseded
    next_due_ms: int | None = None  # when the escalation walk looks at it next (None: never)


@dataclass(frozen=True, slots=True)
class Notification:
    """A message to one channel about one incident change, kept until delivered."""

    id: int
    incident_id: int
    channel: str
    kind: str  # firing | escalation (steps and repeats) | resolved
    title: str
    body: str
    state: str  # pending | sending | sent | failed | cancelled
    attempts: int
    next_attempt_ms: int
    last_error: str | None  # the channel's reason for the last failure, or why it was cancelled
    created_ms: int
    sent_ms: int | None
    group_key: str = ""  # the gateway: firing notifications of one gateway go out together


# (channel, title, body) of a notification to write with an incident change
Outgoing = tuple[str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """Which events a query selects; ``None`` means any."""

    gateway: str | None = None
    device: str | None = None
    type: str | None = None
    since_ms: int | None = None  # event time, inclusive
    until_ms: int | None = None  # event time, exclusive


class EventStore(Protocol):
    """Durable event log, device registry, dead-letter store and hub health."""

    def append(self, batch: IncomingBatch) -> AppendResult:
        """Commit a batch atomically; return only once it is durable."""
        ...

    def query(self, flt: EventFilter, *, limit: int | None = None,
              newest_first: bool = True) -> list[StoredEvent]:
        """Events matching ``flt``."""
        ...

    def count(self, flt: EventFilter) -> int:
        """How many events match ``flt``."""
        ...

    def iter_log(self, flt: EventFilter, *, chunk: int = 1000, up_to_pos: int | None = None,
                 after_pos: int = 0) -> Iterator[list[StoredEvent]]:
        """Matching events in log (arrival) order, in chunks, for replay."""
        ...

    def devices(self, *, gateway: str | None = None) -> list[DeviceRecord]:
        """Registry entries."""
        ...

    def device(self, gateway: str, device: str) -> DeviceRecord | None:
        """One registry entry."""
        ...

    def reset_registry(self) -> int:
        """Empty the registry; return the last log position a rebuild must cover."""
        ...

    def fold_registry(self, events: Sequence[StoredEvent]) -> None:
        """Fold stored events into the registry."""
        ...

    def total_gaps(self) -> int:
        """Missing events across every source and boot."""
        ...

    def presence(self) -> dict[str, PresenceRecord]:
        """The last accepted presence of every gateway that has announced itself."""
        ...

    def presence_changes(self, *, after_pos: int = 0, limit: int = 1000) -> list[PresenceChange]:
        """Accepted gateway presence changes after a position of the presence log."""
        ...

    def last_pos(self) -> int:
        """The newest event's position in the log (0 when empty)."""
        ...

    def incidents_changed(self, *, since_ms: int, after_id: int = 0,
                          limit: int = 1000) -> list[Incident]:
        """Incidents with a phase (opened, acknowledged, resolved) at or after ``since_ms``."""
        ...

    def queue_lines(self, sink: str, lines: Sequence[str], *, max_rows: int) -> int:
        """Keep lines for an external sink (bounded, oldest dropped); how many were dropped."""
        ...

    def queued_lines(self, sink: str, *, limit: int = 5000) -> list[tuple[int, str]]:
        """The oldest lines waiting for a sink."""
        ...

    def forget_lines(self, sink: str, *, up_to_pos: int) -> None:
        """Drop lines a sink has confirmed."""
        ...

    def cursor(self, name: str, *, missing: int = 0) -> int:
        """A consumer's saved position (``missing`` if never saved)."""
        ...

    def set_cursor(self, name: str, value: int) -> None:
        """Save a consumer's position."""
        ...

    def pause(self, gateway: str, device: str | None, *, until_ms: int, reason: str) -> None:
        """Start a maintenance window (device None: the whole gateway)."""
        ...

    def resume(self, gateway: str, device: str | None) -> bool:
        """End a maintenance window."""
        ...

    def paused(self, now_ms: int) -> dict[tuple[str, str], tuple[int, str]]:
        """Active maintenance windows."""
        ...

    def dead_letters(self, *, limit: int = 50, code: str | None = None) -> list[DeadLetter]:
        """Newest dead letters first."""
        ...

    def dead_letters_after(self, after_pos: int, *, code: str, limit: int = 1000,
                           placed_only: bool = False) -> list[DeadLetter]:
        """Dead letters of one code after a position, oldest first (a consumer's cursor);
        ``placed_only``: only those placed in the event log (care alarms among refusals)."""
        ...

    def dead_letter_count(self) -> int:
        """How many dead letters are kept."""
        ...

    def atomically(self, action: str) -> contextlib.AbstractContextManager[None]:
        """A unit of work: every write inside commits together, or none does (``action`` names
        it in the error)."""
        ...

    def write_health(self, report: dict[str, Any]) -> None:
        """Publish the hub's own health for `careflow status`."""
        ...

    def open_incident(self, *, rule: str, gateway: str, device: str, severity: str,
                      summary: str, detail: str, at_ms: int,
                      notify: Sequence[Outgoing] = (), group_wait_ms: int = 0,
                      next_due_ms: int | None = 0) -> int | None:
        """Open an incident (and queue its notifications) unless one is open already;
        ``next_due_ms``: its first escalation reminder (None: never; 0: look at once)."""
        ...

    def resolve_incidents(self, *, rule: str, gateway: str, device: str, at_ms: int,
                          by: str, notify: Sequence[Outgoing] = ()) -> int:
        """Resolve what is open for this rule and source (and queue notifications)."""
        ...

    def unresolved_incident(self, *, rule: str, gateway: str, device: str) -> Incident | None:
        """The open or acknowledged incident of this rule and source, if there is one."""
        ...

    def raise_again(self, incident_id: int, *, at_ms: int, detail: str,
                    notify: Sequence[Outgoing] = (), group_wait_ms: int = 0) -> bool:
        """Count a new raise on a still-open incident and queue its messages (compare-and-set:
        False when it is no longer open)."""
        ...

    def supersede_incident(self, incident_id: int, *, at_ms: int, detail: str,
                           notify: Sequence[Outgoing] = (), group_wait_ms: int = 0,
                           next_due_ms: int | None = 0) -> int | None:
        """A new raise of an acknowledged incident: resolve it (without messages) and open a new
        one that follows it, with its messages; the new id, or None when it is no longer
        acknowledged (compare-and-set)."""
        ...

    def add_silence(self, *, gateway: str, device: str, rule: str, starts_ms: int, ends_ms: int,
                    created_by: str, comment: str) -> Silence:
        """Record a silence."""
        ...

    def silences(self, *, active_at_ms: int | None = None) -> list[Silence]:
        """Silences (active ones only, when a moment is given)."""
        ...

    def expire_silence(self, silence_id: int, *, now_ms: int) -> bool:
        """End a silence now."""
        ...

    def escalate_incident(self, incident_id: int, *, sent_before: int, at_ms: int,
                          notify: Sequence[Outgoing], group_key: str = "",
                          next_due_ms: int | None = None) -> bool:
        """Send the next escalation step of a still-open incident, once; ``next_due_ms``: when
        its next reminder is due (None: never)."""
        ...

    def due_incidents(self, *, now_ms: int, limit: int) -> list[Incident]:
        """Open incidents whose next reminder is due at ``now_ms``, the longest due first."""
        ...

    def set_incident_due(self, incident_id: int, *, next_due_ms: int | None) -> None:
        """When the escalation walk must look at an open incident again (None: never)."""
        ...

    def make_open_incidents_due(self) -> int:
        """Every open incident due now (its due time is recomputed by the walk)."""
        ...

    def group_timing(self, *, channel: str, group_key: str) -> tuple[int | None, int | None]:
        """For the firing messages of one group (channel, gateway): when the last one went out,
        and when the batch that waits goes out (each None when there is none)."""
        ...

    def claim_notifications(self, *, now_ms: int, limit: int,
                            channel: str | None = None) -> list[Notification]:
        """Due notifications (of one channel, or of all), each claimed by compare-and-set
        (pending -> sending)."""
        ...

    def cancel_notification(self, notification_id: int, *, now_ms: int, reason: str) -> bool:
        """A claimed notification that must not go out any more (sending -> cancelled)."""
        ...

    def overdue_notifications(self, *, due_before_ms: int) -> dict[str, int]:
        """Per channel, how many pending notifications were due before this moment."""
        ...

    def failing_channels(self) -> dict[str, str]:
        """Channels whose latest attempt failed, with that attempt's reason."""
        ...

    def finish_notification(self, notification_id: int, *, ok: bool, now_ms: int,
                            error: str | None, final: bool, retry_in_ms: int = 0,
                            attempts: int | None = None) -> None:
        """Record a delivery attempt (``attempts``: the count to record, default one more)."""
        ...

    def release_claimed_notifications(self, channel: str | None = None) -> int:
        """After a crash (of the hub, or of one channel's sender): claimed but unfinished
        notifications (of that channel) are pending again."""
        ...

    def notifications(self, *, states: Sequence[str] | None = None,
                      limit: int = 50) -> list[Notification]:
        """Newest first."""
        ...

    def acknowledge_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Someone has it; escalation stops."""
        ...

    def resolve_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Close one incident by hand."""
        ...

    def incidents(self, *, states: Sequence[str] | None = None,
                  limit: int = 50) -> list[Incident]:
        """Newest first."""
        ...

    def incident(self, incident_id: int) -> Incident | None:
        """One incident."""
        ...

    def count_incidents(self, *, states: Sequence[str] | None = None) -> int:
        """How many incidents are in these states."""
        ...

    def incident_triggers(self, *, rule: str, gateway: str, device: str,
                          since_ms: int) -> list[int]:
        """When this rule fired for this source since a moment."""
        ...

    def count_notifications(self, *, states: Sequence[str] | None = None,
                            min_attempts: int = 0, critical_min_attempts: int | None = None) -> int:
        """How many notifications are in these states (tried at least ``min_attempts`` times;
        those of critical incidents at least ``critical_min_attempts``, when given)."""
        ...

    def read_health(self) -> tuple[int, dict[str, Any]] | None:
        """The last health report and when it was written (ms)."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...
