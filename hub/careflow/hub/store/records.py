"""The records that cross the store's interface, and the states they move through.

One module (as healthchecks keeps its ``models.py``): every adapter returns these, every consumer
reads them. States are ``StrEnum`` words, so they compare equal to the strings they are stored,
logged and printed as, and each word is spelled once, here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, TypeAlias

from careflow.hub.ingest.decode import Accepted, PresenceUpdate, Rejected

__all__ = [
    "UNRESOLVED",
    "AppendResult",
    "AuditEntry",
    "AutomationMode",
    "AutomationSetting",
    "DeadLetter",
    "DeviceRecord",
    "EventFilter",
    "Incident",
    "IncidentAction",
    "IncidentState",
    "IncomingBatch",
    "Notification",
    "NotificationKind",
    "NotificationState",
    "Outgoing",
    "OverBound",
    "PresenceChange",
    "Proposal",
    "ProposalState",
    "Role",
    "RuleControl",
    "RuleControlKind",
    "Severity",
    "SourceGap",
    "StoredEvent",
    "User",
    "WebSession",
]


class IncidentState(StrEnum):
    """open → acknowledged → resolved, or open → resolved; at most one of a rule and source is
    unresolved (open or acknowledged) at a time."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


UNRESOLVED = (IncidentState.OPEN, IncidentState.ACKNOWLEDGED)  # "active" in the CLI


class NotificationState(StrEnum):
    """pending → sending (claimed by one sender) → sent, failed or cancelled; back to pending for
    a retry, or when its sender died before it finished."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NotificationKind(StrEnum):
    """What a notification announces: a firing (grouped per gateway), an escalation step or
    repeat, the end, or a status digest (a shift handover: no incident of its own)."""

    FIRING = "firing"
    ESCALATION = "escalation"
    RESOLVED = "resolved"
    DIGEST = "digest"


class Role(StrEnum):
    """What a console user may do: a viewer reads; an operator also acknowledges, resolves
    and silences."""

    VIEWER = "viewer"
    OPERATOR = "operator"


class Severity(StrEnum):
    """How urgent an incident is (a rule's ``severity``); critical ones never wait."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


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
    severity: Severity
    state: IncidentState
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
    kind: NotificationKind
    title: str
    body: str
    state: NotificationState
    attempts: int
    next_attempt_ms: int
    last_error: str | None  # the channel's reason for the last failure, or why it was cancelled
    created_ms: int
    sent_ms: int | None
    group_key: str = ""  # the gateway: firing notifications of one gateway go out together


# (channel, title, body) of a notification to write with an incident change
Outgoing: TypeAlias = tuple[str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """Which events a query selects; ``None`` means any."""

    gateway: str | None = None
    device: str | None = None
    type: str | None = None
    since_ms: int | None = None  # event time, inclusive
    until_ms: int | None = None  # event time, exclusive


@dataclass(frozen=True, slots=True)
class IncidentAction:
    """One thing a person did to an incident (acknowledged, resolved, silenced it), in its
    timeline: who (a console user, a channel's name or a name typed on a link's page), when,
    and by which way (``cli``, ``console``, ``link``: with the link's id in ``detail``)."""

    id: int
    incident_id: int
    at_ms: int
    action: str
    by: str
    via: str
    detail: str


@dataclass(frozen=True, slots=True)
class User:
    """A console user: an Argon2 hash of the password, never the password."""

    name: str
    role: Role
    password_hash: str = field(repr=False)
    created_ms: int


@dataclass(frozen=True, slots=True)
class WebSession:
    """A console login: kept by the hash of its cookie (a stolen database holds no usable
    cookie), with the CSRF token its forms carry."""

    user: str
    role: Role
    csrf: str = field(repr=False)
    created_ms: int
    expires_ms: int


class ProposalState(StrEnum):
    """pending → approved / rejected / expired → executed → verified, or failed (its
    verification did not pass, or it could not run) and then escalated to a person."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"
    VERIFIED = "verified"
    FAILED = "failed"
    ESCALATED = "escalated"


class AutomationMode(StrEnum):
    """How far the operations agent goes: ``off`` proposes nothing; ``manual`` (the default)
    proposes and runs only what a person approved; ``auto`` also runs, unapproved, the actions
    the registry allows in auto mode."""

    OFF = "off"
    MANUAL = "manual"
    AUTO = "auto"


class RuleControlKind(StrEnum):
    """A noisy rule quieted by a person: ``muted`` (incidents still recorded, nothing
    announced, until it expires) or ``disabled`` (not evaluated at all, until enabled)."""

    MUTED = "muted"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Proposal:
    """An action the agent proposes for an incident, from a runbook, with what it found."""

    id: int
    incident_id: int
    runbook: str
    action: str
    params: Mapping[str, Any]
    why: str
    evidence: Mapping[str, Any]
    dry_run: str
    expected: str
    verify: str
    planner: str  # "runbook", or the model that ranked it
    state: ProposalState
    created_ms: int
    expires_ms: int
    decided_by: str | None = None
    decided_ms: int | None = None
    reason: str | None = None  # why rejected, failed or escalated
    executed_ms: int | None = None
    result: Mapping[str, Any] | None = None
    verified_ms: int | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row: what happened (a proposal's transition, a mode change, a rule muted),
    who did it, chained to the row before by hash, so an edited or deleted row is found."""

    pos: int
    at_ms: int
    actor: str
    event: str
    subject: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class AutomationSetting:
    """The agent's mode, and who set it, when and why."""

    mode: AutomationMode
    by: str
    reason: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class RuleControl:
    """A rule muted (until ``until_ms``) or disabled (``until_ms`` None), by whom and why."""

    rule: str
    kind: RuleControlKind
    until_ms: int | None
    by: str
    reason: str
    at_ms: int
