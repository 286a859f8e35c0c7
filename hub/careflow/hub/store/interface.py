"""The hub's storage ports: small protocols, one per concern, and ``Store``, all of them.

A consumer types against the protocols it uses (the notification sender against
:class:`Outbox` and :class:`Incidents`, the InfluxDB sink against :class:`EventLog`,
:class:`Cursors`, :class:`SinkQueue`...), never against an adapter; an adapter implements
:class:`Store`, and :func:`careflow.hub.store.adapters.open_store` is the one place that
picks it.
``tests/hub/store/`` holds the behaviour every adapter must show, run against each of them.

Promises every adapter keeps (the SQL, the dialect and its rowids are the adapter's business):

* A position (of an event, a dead letter, a presence change, a queued line) is given once,
  grows in commit order, and is never given out again, even after what held it was pruned.
  Positions need not be consecutive: count with :meth:`EventLog.count_after`, never subtract.
* A write either commits whole or not at all; one that returns has committed durably, unless
  it runs inside :meth:`UnitOfWork.atomically`, which commits when the unit ends.
* Changes of state that two processes may race on (an incident acknowledged while the hub
  escalates it, a notification claimed by two senders) are compare-and-set: the loser learns
  it lost (False, None, 0) and nothing of its change is written.
* Failures of the database are :class:`~careflow.core.errors.StoreError`; a refused change of an
  incident asked for by a person is :class:`~careflow.core.errors.RefusedError`, saying why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from careflow.hub.alerting.mute import Silence
from careflow.hub.fleet.presence import PresenceRecord
from careflow.hub.store.records import (
    AppendResult,
    AuditEntry,
    AutomationSetting,
    DeadLetter,
    DeviceRecord,
    EventFilter,
    Incident,
    IncidentAction,
    IncomingBatch,
    Notification,
    Outgoing,
    PresenceChange,
    Proposal,
    RuleControl,
    StoredEvent,
    User,
    WebSession,
)

__all__ = [
    "CONFLICTS_CURSOR",
    "MAX_DEAD_LETTER_PAYLOAD",
    "MAX_GROUP_CLAIM",
    "OVER_BOUND_CURSOR",
    "Accounts",
    "Audit",
    "Automation",
    "Cursors",
    "EventLog",
    "Fleet",
    "Health",
    "Incidents",
    "Links",
    "Mutes",
    "Outbox",
    "Proposals",
    "RuleControls",
    "SinkQueue",
    "Store",
    "Timeline",
    "UnitOfWork",
]

MAX_DEAD_LETTER_PAYLOAD = 64 * 1024  # a refusal keeps this much of its payload (but its size)
MAX_GROUP_CLAIM = 1000  # held notifications of a group claimed along with a due one
# Dead letters the alert stage has yet to read are never pruned: those of code ``conflict`` after
# this cursor, and care alarms refused beyond the device bound after the next one.
CONFLICTS_CURSOR = "alerts-conflicts"
OVER_BOUND_CURSOR = "alerts-over-bound"


class EventLog(Protocol):
    """The durable log of what arrived: every distinct event once, in arrival order, and every
    refusal (dead letter) with its reason."""

    def append(self, batch: IncomingBatch) -> AppendResult:
        """Commit a batch whole and return once it is durable: new events get the next
        positions; an event already stored (same id, or same source position and content) is a
        duplicate and skipped; a different event at a stored position is a ``conflict`` dead
        letter placed after the log as this commit leaves it; events of a device new to a
        gateway already at its device bound are ``too_many_devices`` dead letters (care alarms
        among them placed as conflicts are); refusals are kept (a retained one already kept,
        once). The registry and presence are updated in the same commit."""
        ...

    def query(self, flt: EventFilter, *, limit: int | None = None,
              newest_first: bool = True) -> list[StoredEvent]:
        """Events matching ``flt``, ordered by event time (then position)."""
        ...

    def count(self, flt: EventFilter) -> int:
        """How many events match ``flt``."""
        ...

    def iter_log(self, flt: EventFilter, *, chunk: int = 1000, up_to_pos: int | None = None,
                 after_pos: int = 0) -> Iterator[list[StoredEvent]]:
        """Matching events in log (arrival) order, in chunks, for replay; positions in
        (``after_pos``, ``up_to_pos``]."""
        ...

    def last_pos(self) -> int:
        """The newest event's position in the log (0 when empty)."""
        ...

    def count_after(self, after_pos: int) -> int:
        """How many events the log holds after a position (a consumer's backlog)."""
        ...

    def dead_letters(self, *, limit: int = 50, code: str | None = None) -> list[DeadLetter]:
        """Newest dead letters first (of one code, when given)."""
        ...

    def dead_letters_after(self, after_pos: int, *, code: str, limit: int = 1000,
                           placed_only: bool = False) -> list[DeadLetter]:
        """Dead letters of one code after a position, oldest first (a consumer's cursor);
        ``placed_only``: only those placed in the event log (care alarms among refusals)."""
        ...

    def dead_letter_count(self) -> int:
        """How many dead letters are kept (the newest, within the store's bounds)."""
        ...


class Fleet(Protocol):
    """What the hub knows of each source (the registry folded from the log), each gateway's
    presence, and maintenance windows."""

    def devices(self, *, gateway: str | None = None) -> list[DeviceRecord]:
        """Registry entries, by gateway then device."""
        ...

    def device(self, gateway: str, device: str) -> DeviceRecord | None:
        """One registry entry."""
        ...

    def total_gaps(self) -> int:
        """Missing events across every source and boot."""
        ...

    def reset_registry(self) -> int:
        """Empty the registry; return the last log position a rebuild must cover (later events
        are folded by the live hub)."""
        ...

    def fold_registry(self, events: Sequence[StoredEvent]) -> None:
        """Fold stored events into the registry."""
        ...

    def presence(self) -> dict[str, PresenceRecord]:
        """The last accepted presence of every gateway that has announced itself."""
        ...

    def presence_changes(self, *, after_pos: int = 0, limit: int = 1000) -> list[PresenceChange]:
        """Accepted gateway presence changes after a position of the presence log, in order."""
        ...

    def pause(self, gateway: str, device: str | None, *, until_ms: int, reason: str) -> None:
        """Start (or replace) a maintenance window (device None: the whole gateway)."""
        ...

    def resume(self, gateway: str, device: str | None) -> bool:
        """End a maintenance window; False if there was none."""
        ...

    def paused(self, now_ms: int) -> dict[tuple[str, str], tuple[int, str]]:
        """Active maintenance windows: (gateway, device or ``*``) -> (until_ms, reason)."""
        ...


class Incidents(Protocol):
    """Incidents: at most one unresolved per rule and source, each change written together with
    the notifications that announce it (into the :class:`Outbox`)."""

    def open_incident(self, *, rule: str, gateway: str, device: str, severity: str,
                      summary: str, detail: str, at_ms: int,
                      notify: Sequence[Outgoing] = (), group_wait_ms: int = 0,
                      next_due_ms: int | None = 0) -> int | None:
        """Open an incident (and queue its firing notifications, grouped by gateway, due after
        ``group_wait_ms``) unless one is unresolved for this rule and source (None);
        ``next_due_ms``: its first escalation reminder (None: never; 0: look at once)."""
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

    def resolve_incidents(self, *, rule: str, gateway: str, device: str, at_ms: int,
                          by: str, notify: Sequence[Outgoing] = ()) -> int:
        """Resolve what is unresolved for this rule and source (and queue its notifications);
        how many (0 or 1)."""
        ...

    def unresolved_incident(self, *, rule: str, gateway: str, device: str) -> Incident | None:
        """The open or acknowledged incident of this rule and source, if there is one."""
        ...

    def acknowledge_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Someone has it; escalation stops. Only from open (else RefusedError, saying why)."""
        ...

    def resolve_incident(self, incident_id: int, *, by: str, at_ms: int) -> Incident:
        """Close one incident by hand (RefusedError when there is none, or it is resolved)."""
        ...

    def escalate_incident(self, incident_id: int, *, sent_before: int, at_ms: int,
                          notify: Sequence[Outgoing], group_key: str = "",
                          next_due_ms: int | None = None) -> bool:
        """Send the next escalation step of a still-open incident, once (compare-and-set on the
        steps sent); ``next_due_ms``: when its next reminder is due (None: never)."""
        ...

    def due_incidents(self, *, now_ms: int, limit: int) -> list[Incident]:
        """Open incidents whose next reminder is due at ``now_ms``, the longest due first."""
        ...

    def set_incident_due(self, incident_id: int, *, next_due_ms: int | None) -> None:
        """When the escalation walk must look at an open incident again (None: never)."""
        ...

    def make_open_incidents_due(self) -> int:
        """Every open incident due now (its due time is recomputed by the walk); how many."""
        ...

    def incident(self, incident_id: int) -> Incident | None:
        """One incident."""
        ...

    def incidents(self, *, states: Sequence[str] | None = None,
                  source: tuple[str, str] | None = None, limit: int = 50) -> list[Incident]:
        """Newest first (only in these states, and of this (gateway, device), when given)."""
        ...

    def count_incidents(self, *, states: Sequence[str] | None = None) -> int:
        """How many incidents are in these states."""
        ...

    def incident_counts(self, *, states: Sequence[str] | None = None) -> dict[tuple[str, str], int]:
        """How many incidents there are per (severity, state) (only in these states, when
        given): /metrics."""
        ...

    def incidents_changed(self, *, since_ms: int, after_id: int = 0,
                          limit: int = 1000) -> list[Incident]:
        """Incidents with a phase (opened, acknowledged, resolved) at or after ``since_ms``,
        by id."""
        ...

    def incident_triggers(self, *, rule: str, gateway: str, device: str,
                          since_ms: int) -> list[int]:
        """When this rule fired for this source since a moment."""
        ...

    def group_timing(self, *, channel: str, group_key: str) -> tuple[int | None, int | None]:
        """For the firing messages of one group (channel, gateway): when the last one went out,
        and when the batch that waits goes out (each None when there is none)."""
        ...


class Outbox(Protocol):
    """The durable notification outbox: written with incident changes, each notification claimed
    by one sender, then sent, retried, failed or cancelled."""

    def claim_notifications(self, *, now_ms: int, limit: int,
                            channel: str | None = None) -> list[Notification]:
        """Due notifications (of one channel, or of all; critical incidents' first), at most
        ``limit`` plus the rest of their groups (at most ``MAX_GROUP_CLAIM`` more), each claimed
        by compare-and-set (pending -> sending)."""
        ...

    def finish_notification(self, notification_id: int, *, ok: bool, now_ms: int,
                            error: str | None, final: bool, retry_in_ms: int = 0,
                            attempts: int | None = None) -> None:
        """Record a delivery attempt of a claimed notification: sent, failed for good, or
        pending again in ``retry_in_ms`` (``attempts``: the count to record, default one more)."""
        ...

    def cancel_notification(self, notification_id: int, *, now_ms: int, reason: str) -> bool:
        """A claimed notification that must not go out any more (sending -> cancelled)."""
        ...

    def release_claimed_notifications(self, channel: str | None = None) -> int:
        """After a crash (of the hub, or of one channel's sender): claimed but unfinished
        notifications (of that channel) are pending again; how many."""
        ...

    def overdue_notifications(self, *, due_before_ms: int) -> dict[str, int]:
        """Per channel, how many pending notifications were due before this moment."""
        ...

    def failing_channels(self) -> dict[str, str]:
        """Channels whose latest attempt failed, with that attempt's reason."""
        ...

    def notifications(self, *, states: Sequence[str] | None = None,
                      limit: int = 50) -> list[Notification]:
        """Newest first (only in these states, when given)."""
        ...

    def count_notifications(self, *, states: Sequence[str] | None = None,
                            min_attempts: int = 0, critical_min_attempts: int | None = None) -> int:
        """How many notifications are in these states (tried at least ``min_attempts`` times;
        those of critical incidents at least ``critical_min_attempts``, when given)."""
        ...

    def notification_counts(self) -> dict[tuple[str, str], int]:
        """How many notifications there are per (channel, state): /metrics."""
        ...

    def queue_notification(self, channel: str, *, kind: str, title: str, body: str,
                           at_ms: int) -> int:
        """Queue a notification of no incident (incident id 0: a status digest), due at
        ``at_ms``; its id. Joins the unit of work it is called in."""
        ...


class Mutes(Protocol):
    """Silences: patterns of rule and source not announced for a while."""

    def add_silence(self, *, gateway: str, device: str, rule: str, starts_ms: int, ends_ms: int,
                    created_by: str, comment: str) -> Silence:
        """Record a silence."""
        ...

    def silences(self, *, active_at_ms: int | None = None) -> list[Silence]:
        """Silences, newest first (only those active at a moment, when given)."""
        ...

    def expire_silence(self, silence_id: int, *, now_ms: int) -> bool:
        """End an active silence now; False if there is no such active silence."""
        ...


class Cursors(Protocol):
    """Consumers' saved positions (alert evaluation, the InfluxDB sink)."""

    def cursor(self, name: str, *, missing: int = 0) -> int:
        """A consumer's saved position (``missing`` if never saved)."""
        ...

    def set_cursor(self, name: str, value: int) -> None:
        """Save a consumer's position."""
        ...


class SinkQueue(Protocol):
    """Lines for an external sink that are in no other log, kept until the sink confirms."""

    def queue_lines(self, sink: str, lines: Sequence[str], *, max_rows: int) -> int:
        """Keep lines for an external sink (bounded, oldest dropped); how many were dropped."""
        ...

    def queued_lines(self, sink: str, *, limit: int = 5000) -> list[tuple[int, str]]:
        """The oldest lines waiting for a sink, with their positions."""
        ...

    def forget_lines(self, sink: str, *, up_to_pos: int) -> None:
        """Drop lines a sink has confirmed."""
        ...


class Health(Protocol):
    """The hub's own health, for `careflow status` in another process."""

    def write_health(self, report: dict[str, Any]) -> None:
        """Publish the hub's health report (replacing the last one)."""
        ...

    def read_health(self) -> tuple[int, dict[str, Any]] | None:
        """The last health report and when it was written (ms)."""
        ...


class Timeline(Protocol):
    """What people did to incidents (acknowledge, resolve, silence), and by which way."""

    def record_action(self, incident_id: int, *, at_ms: int, action: str, by: str, via: str,
                      detail: str = "") -> IncidentAction:
        """Add one entry to an incident's timeline."""
        ...

    def incident_actions(self, incident_id: int, *, limit: int = 200) -> list[IncidentAction]:
        """An incident's timeline entries, oldest first."""
        ...

    def incident_notifications(self, incident_id: int, *,
                               limit: int = 200) -> list[Notification]:
        """The messages queued about an incident, oldest first: its timeline's notifications."""
        ...


class Links(Protocol):
    """Signed one-tap links are single use: each link's id is spent once."""

    def spend_link(self, link_id: str, *, incident_id: int, action: str, channel: str,
                   at_ms: int) -> bool:
        """Mark a link used (compare-and-set: False when it was used before)."""
        ...

    def link_spent(self, link_id: str) -> int | None:
        """When a link was used (None: never)."""
        ...


class Accounts(Protocol):
    """Console users (Argon2 hashes only) and their sessions (by the hash of the cookie)."""

    def add_user(self, name: str, *, role: str, password_hash: str, at_ms: int,
                 replace: bool = False) -> User:
        """Add a user (RefusedError when the name is taken, unless ``replace``: then the role
        and password change, and the user's sessions end)."""
        ...

    def renew_password_hash(self, name: str, *, old: str, new: str) -> bool:
        """Keep ``new`` for the same password when the user's hash is still ``old`` (a login
        renewing a weak hash); their sessions go on. False: the hash had changed."""
        ...

    def user(self, name: str) -> User | None:
        """One user."""
        ...

    def users(self) -> list[User]:
        """Every user, by name."""
        ...

    def remove_user(self, name: str) -> bool:
        """Remove a user and end their sessions; False if there was none."""
        ...

    def start_session(self, token_hash: str, *, user: str, csrf: str, at_ms: int,
                      expires_ms: int) -> None:
        """Keep a new login's session."""
        ...

    def session(self, token_hash: str, *, now_ms: int) -> WebSession | None:
        """The live session of a cookie (None: unknown, expired, or its user is gone)."""
        ...

    def end_session(self, token_hash: str) -> None:
        """Log out (and prune expired sessions)."""
        ...


class Proposals(Protocol):
    """The operations agent's proposals: what it would do about an incident, and what became of
    it (states in :class:`~careflow.hub.store.records.ProposalState`)."""

    def add_proposal(self, *, incident_id: int, runbook: str, action: str,
                     params: Mapping[str, Any], why: str, evidence: Mapping[str, Any],
                     dry_run: str, expected: str, verify: str, planner: str, at_ms: int,
                     expires_ms: int) -> Proposal:
        """Record a new pending proposal."""
        ...

    def proposal(self, proposal_id: int) -> Proposal | None:
        """One proposal."""
        ...

    def proposals(self, *, states: Sequence[str] | None = None, incident_id: int | None = None,
                  limit: int = 50) -> list[Proposal]:
        """Newest first (only in these states, or of one incident, when given)."""
        ...

    def move_proposal(self, proposal_id: int, *, from_states: Sequence[str], to: str,
                      at_ms: int, by: str | None = None, reason: str | None = None,
                      result: Mapping[str, Any] | None = None) -> Proposal | None:
        """Change a proposal's state, compare-and-set: only from one of ``from_states`` (None:
        it was in none of them; nothing is written). ``by`` and ``reason`` record a decision
        (approved, rejected) or why it failed; ``result`` what running it returned; the time
        goes to decided_ms (approved, rejected, expired), executed_ms (executed, failed) or
        verified_ms (verified)."""
        ...


class Audit(Protocol):
    """The audit trail: append-only, each row chained to the one before by hash."""

    def append_audit(self, *, at_ms: int, actor: str, event: str, subject: str,
                     detail: Mapping[str, Any]) -> AuditEntry:
        """Append a row, its hash chained to the last row's in the same transaction (so two
        writers never fork the chain); ``detail`` must already have its secrets masked."""
        ...

    def audit_log(self, *, after_pos: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Rows after a position, oldest first."""
        ...


class Automation(Protocol):
    """The operations agent's mode, as a person last set it."""

    def automation_mode(self) -> AutomationSetting | None:
        """The mode last set (None: never set; the agent's default applies)."""
        ...

    def set_automation_mode(self, *, mode: str, by: str, reason: str,
                            at_ms: int) -> AutomationSetting:
        """Set the mode."""
        ...


class RuleControls(Protocol):
    """Noisy rules quieted by a person: muted for a while, or disabled."""

    def set_rule_control(self, rule: str, *, kind: str, until_ms: int | None, by: str,
                         reason: str, at_ms: int) -> RuleControl:
        """Mute (until ``until_ms``) or disable (``until_ms`` None) a rule, replacing what was
        set for it before."""
        ...

    def clear_rule_control(self, rule: str) -> bool:
        """Unmute or enable a rule; False if nothing was set for it."""
        ...

    def rule_controls(self, *, now_ms: int | None = None) -> list[RuleControl]:
        """By rule; with ``now_ms``, only those in force then (a mute ends at ``until_ms``)."""
        ...

    def rule_activity(self, *, since_ms: int) -> dict[str, tuple[int, int]]:
        """Per rule, the incidents triggered and the notifications written (of its incidents)
        at or after ``since_ms``: which rule is noisy. Rules with neither are left out."""
        ...


class UnitOfWork(Protocol):
    """Several writes committed as one."""

    def atomically(self, action: str) -> contextlib.AbstractContextManager[None]:
        """A unit of work: every write inside commits together, or none does (``action`` names
        it in the error); a unit opened inside another joins it. One thread only."""
        ...


class Store(EventLog, Fleet, Incidents, Outbox, Mutes, Cursors, SinkQueue, Health, Timeline,
            Links, Accounts, Proposals, Audit, Automation, RuleControls, UnitOfWork, Protocol):
    """Every port at once: what an adapter implements and ``open_store`` returns."""

    def close(self) -> None:
        """Release the store."""
        ...

