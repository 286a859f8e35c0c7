"""Alerting inside the hub: rules evaluated on every committed event and on a clock tick, and
their transitions turned into incidents (open → acknowledged → resolved).

Notifications (Apprise), escalation, silences and grouping build on the incidents recorded here.
Each step is plan, then apply: this stage reads what a step's changes are decided on once (a
snapshot), ``plan.py`` decides them without I/O (with ``routing.py`` and ``mute.py``), and this
stage writes them, with the cursors, in one transaction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from careflow.core import clock
from careflow.core.errors import ConfigError, ContractError, StoreError
from careflow.hub.alerting.evaluate import Evaluator, Observation, Transition
from careflow.hub.alerting.mute import FLAP_WINDOW_MS, Silence
from careflow.hub.alerting.notify import Channel, failing_or_stuck
from careflow.hub.alerting.plan import (
    EVALUATION_FAILED_RULE,
    Change,
    ChangeSnapshot,
    GroupTiming,
    Key,
    Open,
    RaiseAgain,
    Remind,
    ReminderSnapshot,
    Reschedule,
    Resolve,
    SetAside,
    Setup,
    Supersede,
    failure_detail,
    first_few,
    plan_changes,
    plan_failure_alert,
    plan_reminders,
    plan_self_check,
)
from careflow.hub.alerting.routing import (
    CHECK_CHANNEL,
    Decision,
    Reminder,
    decide,
    reachable_channels,
)
from careflow.hub.alerting.rules import RuleSet, load_rules
from careflow.hub.alerting.selfwatch import (
    HUB_DEVICE,
    HUB_GATEWAY,
    OVER_BOUND_WINDOW_MS,
    SELF_RULES,
    lagging_since,
)
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.ops.rule_controls import InForce, announce_again, describe, in_force
from careflow.hub.stage import Committed
from careflow.hub.store.interface import (
    CONFLICTS_CURSOR,
    OVER_BOUND_CURSOR,
    Cursors,
    EventLog,
    Fleet,
    Incidents,
    Mutes,
    Outbox,
    RuleControls,
    UnitOfWork,
)
from careflow.hub.store.records import (
    UNRESOLVED,
    DeadLetter,
    EventFilter,
    Incident,
    IncidentState,
    NotificationKind,
    RuleControl,
    RuleControlKind,
    StoredEvent,
)
from careflow.schemas import decode_json, validate_event

__all__ = [
    "ALERTS_CURSOR",
    "AlertStage",
    "conflicting_alarm",
    "default_rules",
    "default_rules_dir",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ALERTS_CURSOR = "alerts"  # the newest log position whose evaluation is recorded
MUTES_CURSOR = "rule-mutes-announced"  # the newest end of a rule's mute that was announced
# CONFLICTS_CURSOR: the same over the conflict dead letters; OVER_BOUND_CURSOR: the newest
# too_many_devices dead letter whose care alarm (if it held one) the hub announced. Both are the
# store's names: it never prunes a dead letter that these have yet to pass.
OVER_BOUND_RULE = "hub-devices-over-bound"
# hub-evaluation-failed (an event set aside: see plan.py) stays open this long after the last
EVALUATION_FAILED_WINDOW_MS = 600_000
# Progress without incident changes is saved at most this often (a crash evaluates at most
# this much again); changes are always saved with the cursors, in the same transaction.
CURSOR_SAVE_INTERVAL_MS = 1_000
RETRY_INTERVAL_MS = 1_000  # after a refused write, how soon evaluation resumes from the log
CATCH_UP_CHUNK = 1_000  # events read from the log per step when catching up
# Events (and conflict dead letters) evaluated from the log per commit or clock tick while
# behind: a hub restarted a million events behind goes on ingesting while it catches up
# (about 0.4 s of evaluation per call), rather than holding the writer thread for a minute.
CATCH_UP_PER_CALL = 20 * CATCH_UP_CHUNK


# Due incidents the escalation walk looks at per clock tick (4 ticks a second); more wait for the
# next tick, the longest due first, and each one looked at is moved on to its next due time.
REMIND_PER_TICK = 1_000
# A plan the store outdated (a compare-and-set lost) is made again at most this often.
PLAN_ATTEMPTS = 3
# The rules a person muted or disabled are read from the store at most this often (the writer
# thread's 250 ms tick and every commit must stay cheap); a mute's end is judged at every tick.
CONTROLS_REFRESH_MS = 1_000


class _PlanOutdatedError(Exception):
    """The store did not do what a plan assumed of it (see AlertStage._in_one_transaction)."""


class _ReminderError(Exception):
    """Planning or writing one incident's reminder failed (AlertStage._remind)."""

    def __init__(self, incident_id: int, error: Exception) -> None:
        super().__init__(str(error))
        self.incident_id = incident_id
        self.error = error


class _SetAsideError(Exception):
    """A bug (not a refusal of the store) while reading for, or writing, the changes of some
    transitions: the transaction is rolled back and the step planned again without them
    (AlertStage._record)."""

    def __init__(self, indexes: Sequence[int], error: Exception) -> None:
        super().__init__(str(error))
        self.indexes = tuple(indexes)  # of the transitions, in the list being planned
        self.error = error


@dataclass(slots=True)
class _Applied:
    """What one transaction recorded: each change, the incident it opened or moved, and the
    incident it follows (a new raise of an acknowledged one)."""

    changes: list[tuple[Change, int | None, int | None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _RuleStub:
    name: str
    severity: str


_SELF_RULE_STUBS = tuple(_RuleStub(name, severity) for name, severity in SELF_RULES.items())


@contextmanager
def default_rules_dir() -> Iterator[Path]:
    """The folder the hub takes its rules from: CAREFLOW_RULES_DIR, else the ones shipped in
    rules/ (package data, so the same from a checkout, a wheel or any working directory)."""
    configured = os.environ.get("CAREFLOW_RULES_DIR")
    if configured:
        yield Path(configured)
        return
    with resources.as_file(resources.files("careflow.rules")) as folder:
        yield Path(folder)


def default_rules() -> RuleSet:
    """Rules from CAREFLOW_RULES_DIR, else the ones shipped in rules/."""
    with default_rules_dir() as folder:
        return load_rules([folder])


def conflicting_alarm(letter: DeadLetter) -> Observation | None:
    """The alarm a conflict dead letter holds, as the rules see events; None when it holds
    another type of event, an alarm being cleared, or (from before conflicts were kept whole)
    a cut-off payload."""
    try:  # the hub's own strict decoder: no depth or encoding can make this raise
        value = decode_json(letter.payload)
        head, time_ms = validate_event(value)
    except ContractError:
        return None
    if head.type != "alert" or value["data"].get("state") == "cleared":
        return None  # a conflict may raise an alarm, never clear one: its source's numbering
        # is broken, and a clear that is not the device's last word would silence an alarm
    return Observation(head.gateway, head.device, head.type, time_ms, letter.received_ms,
                       value["data"])


class AlertStore(EventLog, Fleet, Incidents, Outbox, Mutes, Cursors, RuleControls, UnitOfWork,
                 Protocol):
    """What the alert stage uses of the store (the outbox: for the hub's self-checks and the
    end of a rule's mute)."""


class AlertStage:
    """Feeds the evaluator and records incidents; runs on the hub's writer thread, as the first
    stage after each commit (:class:`careflow.hub.stage.Stage`) and on the clock."""

    name = "alerts"

    def __init__(self, store: AlertStore, rules: RuleSet,
                 channels: Mapping[str, Channel] | None = None, *,
                 runbook_url: str | None = None) -> None:
        self.store = store
        self.runbook_url = runbook_url  # base that turns a rule's runbook path into a link
        self.rules = {rule.name: rule for rule in rules.rules}
        self.channels = dict(channels or {})
        self.escalation = rules.escalation
        self.routing = rules.routing
        if self.channels:
            self._check_channels(rules)
        self.evaluator = Evaluator(rules.rules)  # rebuilt by _resume, from its own rules
        self.opened = 0
        self.record_errors = 0  # store failures while recording; each is retried from the log
        # Evaluation follows the log: everything up to these positions (events; conflict dead
        # letters) is evaluated and its incident changes recorded. The store's cursors of the
        # same names trail them by at most CURSOR_SAVE_INTERVAL_MS of change-free events.
        self._evaluated = self._conflicts_evaluated = 0
        self._saved = (0, 0)  # the cursors as the store holds them
        self._saved_at_ms: int | None = None
        self._log_end = 0  # the newest log position known to be committed
        self._conflicts_due = True  # conflict dead letters may wait after the cursor
        # while catching up over more than one call: when the oldest event not yet evaluated
        # arrived (None when caught up), so the lag says how far behind evaluation really is
        self._behind_since_ms: int | None = None
        # set when the store refused a write: the evaluator then counts changes as done that
        # the store does not hold, so it is rebuilt and evaluation resumes from the cursors
        self._stale_since_ms: int | None = None
        self._retry_at_ms = 0
        self.muted = 0
        # rules muted or disabled by a person (careflow rules mute/disable): the store's rows,
        # read at most every CONTROLS_REFRESH_MS, and what is in force as of the last tick
        self._severities = {**SELF_RULES, **{name: r.severity for name, r in self.rules.items()}}
        self._control_rows: tuple[RuleControl, ...] = ()
        self._controls_read_ms: int | None = None
        self._in_force: InForce | None = None
        # rules no longer quieted -> since when: what they opened before is to be announced
        self._announce: dict[str, int] = {}
        # the newest mute end announced (a cursor): a mute that ended while the hub was down
        # is announced at its start, and only once
        self._mutes_announced_ms = self.store.cursor(MUTES_CURSOR, missing=0)
        self._mutes_ended_ms = self._mutes_announced_ms  # the newest end to announce
        # Non-critical alerts wait this long so that a burst on one gateway becomes one message
        # (Alertmanager's group_wait); critical ones, care alarms above all, never wait. Set from
        # the rules' `routing:` section; a route may set its own.
        self.group_wait_ms = self.routing.group_wait
        self.on_queued: Callable[[], None] = lambda: None  # wakes the notification sender
        self._sites = SiteBook()  # the same site rule as the InfluxDB sink and the report
        self._kinds: dict[tuple[str, str], str] = {}  # (gateway, device) -> kind
        # how far evaluation runs behind ingest (worst since the last self-check), and since
        # when it has been beyond the bound (watch the watcher)
        self._lag_ms = 0
        self._last_tick_ms: int | None = None
        self._lagging_since_ms: int | None = None
        self._rescheduled = False  # open incidents' due times recomputed since start
        # incidents whose reminder could not be recorded (incident id -> when to try again):
        # left out of the walk meanwhile, so one that always fails holds back no other
        self._reminders_held: dict[int, int] = {}
        # care alarms refused beyond the device bound, announced from their dead letters with
        # a cursor (the hub's in-memory tally dies with it), and the alert kept open this long
        self._over_bound_pos = 0
        self._refused_alarms: tuple[int, str] | None = None  # (until, detail)
        # events the rules could not evaluate since the last recorded step ("gw/dev type #pos",
        # care alarm or not), announced with the cursor that passes them; then kept open
        self.evaluation_failures = 0
        self._failed: list[tuple[str, bool]] = []
        self._failed_alert: tuple[int, str] | None = None  # (until, detail)
        for chunk in self.store.iter_log(EventFilter(type="provision")):
            for event in chunk:  # kinds and sites only grow: learned once, then from events
                self._learn(event, event.data)
        self._resume()

    def _check_channels(self, rules: RuleSet) -> None:
        """Every channel a route or escalation policy can reach needs a URL: say which variable
        to set at start-up, not when an alarm has nowhere to go."""
        for key, steps in self.escalation.items():
            for step in steps:
                for name in step.channels:
                    if name not in self.channels:
                        msg = (f"the {key} escalation policy names channel {name!r}, "
                               f"which has no URL: set CAREFLOW_CHANNEL_{name.upper()}")
                        raise ConfigError(msg)
        for index, item in enumerate(rules.routing.routes):
            for name in item.channels:
                if name not in self.channels and name != CHECK_CHANNEL:
                    msg = (f"route {index + 1} ({rules.route_origins[index]}) sends to channel "
                           f"{name!r}, which has no URL: set CAREFLOW_CHANNEL_{name.upper()} "
                           "(or ..._FILE)")
                    raise ConfigError(msg)
        # the hub's own alerts are critical, so the critical route must exist in any case
        for rule in (*rules.rules, *_SELF_RULE_STUBS):
            for name, why in reachable_channels(rules.routing, rule.severity).items():
                if name not in self.channels and name != CHECK_CHANNEL:
                    msg = (f"rule {rule.name!r} ({rule.severity}) routes to channel {name!r} "
                           f"({why}), which has no URL: set CAREFLOW_CHANNEL_{name.upper()} "
                           "(or ..._FILE)")
                    raise ConfigError(msg)

    def _resume(self) -> None:
        """Rebuild the evaluator from what the store holds and go back to the saved cursors:
        what a restarted hub does, and what follows a write the store refused.

        What is open stays open (no duplicate incident), and every known source counts as
        heard from when it was last seen; then evaluation catches up from the cursors.
        """
        evaluator = Evaluator(self.evaluator.rules)
        for record in self.store.devices():
            if isinstance(record.facts.get("kind"), str):
                self._kinds[(record.gateway, record.device)] = record.facts["kind"]
            interval = record.facts.get("interval_s")
            evaluator.heard_from(record.gateway, record.device, last_seen_ms=record.last_seen_ms,
                                 interval_s=interval if isinstance(interval, int | float) else None)
        for incident in self.store.incidents(states=("open", "acknowledged"), limit=100_000):
            evaluator.restore_firing(incident.rule, (incident.gateway, incident.device),
                                     incident.triggered_ms)
        log_end = self.store.last_pos()
        events = self.store.cursor(ALERTS_CURSOR, missing=-1)
        conflicts = self.store.cursor(CONFLICTS_CURSOR, missing=-1)
        if events < 0 or conflicts < 0:
            # a new database, or one from before the cursors: start at the end of the logs,
            # as evaluation always started, rather than raise every alarm of the past again
            events = log_end if events < 0 else events
            conflicts = self._newest_dead_letter() if conflicts < 0 else conflicts
            with self.store.atomically("start the alert cursors"):
                self._save_cursors(events, conflicts)
        over_bound = self.store.cursor(OVER_BOUND_CURSOR, missing=-1)
        if over_bound < 0:  # from before this cursor: what was refused then is past
            over_bound = self._newest_dead_letter(code="too_many_devices")
            self.store.set_cursor(OVER_BOUND_CURSOR, over_bound)
        self._over_bound_pos = over_bound
        self.evaluator = evaluator
        self._evaluated, self._conflicts_evaluated = events, conflicts
        self._saved = (events, conflicts)
        self._log_end = max(self._log_end, log_end)
        self._conflicts_due = True
        self._stale_since_ms = None

    def _newest_dead_letter(self, *, code: str | None = None) -> int:
        """Where a cursor over dead letters (of this code) starts when it was never saved:
        after the newest one, so what came before is not announced again."""
        newest = self.store.dead_letters(limit=1, code=code)
        return newest[0].pos if newest else 0

    def _save_cursors(self, events_pos: int, conflicts_pos: int) -> None:
        """Write the evaluation cursors (inside the caller's transaction)."""
        self.store.set_cursor(ALERTS_CURSOR, events_pos)
        self.store.set_cursor(CONFLICTS_CURSOR, conflicts_pos)

    def _learn(self, event: StoredEvent, data: Mapping[str, Any]) -> None:
        """A provision event names the device's kind and its gateway's site (newest wins)."""
        if isinstance(data.get("kind"), str):
            self._kinds[(event.gateway, event.device)] = data["kind"]
        self._sites.learn(event, data)

    def labels(self, *, rule: str, severity: str, gateway: str, device: str) -> dict[str, str]:
        """What routes match on: severity, rule, site, gateway, device, kind."""
        return {"severity": severity, "rule": rule, "gateway": gateway, "device": device,
                "site": self._sites.site_of(gateway),
                "kind": self._kinds.get((gateway, device), "")}

    def decision(self, *, rule: str, severity: str, gateway: str, device: str) -> Decision:
        """Where an incident goes and how it escalates (routing.py decides)."""
        return decide(self.routing, self.labels(rule=rule, severity=severity, gateway=gateway,
                                                device=device), self.escalation)

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Evaluate what a commit stored: its events, and the alarms of its conflicts."""
        if commit.events or commit.conflicts:
            self.handle(commit.events, now_ms, commit.data, conflicts=commit.conflicts)

    def handle(self, events: Sequence[StoredEvent], now_ms: int,
               data: Sequence[Mapping[str, Any]] | None = None, *, conflicts: int = 0) -> None:
        """Evaluate newly stored events (``data``: their decoded data, to skip re-parsing);
        ``conflicts``: how many events the same commit dead-lettered as conflicts.

        Caught up, the events are evaluated from memory; behind (after a restart or a refused
        write), evaluation first catches up from the log, and these are read back with it.
        """
        if events:
            self._log_end = max(self._log_end, events[-1].pos)
            # how long the oldest of these waited between arrival and evaluation
            self._lag_ms = max(self._lag_ms, now_ms - min(e.received_ms for e in events))
        # conflicts of earlier commits may wait (after a restart): they come before these
        earlier_conflicts = self._conflicts_due
        if conflicts:
            self._conflicts_due = True
        if events and not earlier_conflicts and self._stale_since_ms is None \
                and events[0].pos == self._evaluated + 1 \
                and events[-1].pos == self._log_end:  # caught up: the hot path, kept lean
            try:
                transitions = self._observe(events, data, now_ms)
            except Exception:
                self._went_stale(now_ms)  # a bug: stay consistent with the store, and say so
                raise
            if not transitions and not self._failed:  # most commits: no write, no fsync
                self._evaluated = events[-1].pos
            elif not self._guarded(now_ms, lambda: self._step(
                    transitions, events[-1].pos, self._conflicts_evaluated, now_ms)):
                return
            if not self._conflicts_due:
                return
        self._catch_up(now_ms)

    def tick(self, now_ms: int) -> None:
        """Let the clock drive absences, windows, escalation and repeats."""
        if self._last_tick_ms is not None:  # a late tick judges absences late by as much
            self._lag_ms = max(self._lag_ms, now_ms - self._last_tick_ms)
        self._last_tick_ms = now_ms
        self._refresh_controls(now_ms, diff=True)
        # the clock is judged only once the rules have seen everything stored
        if self._catch_up(now_ms, look_at_the_log=True):
            self._guarded(now_ms, lambda: self._step(
                self.evaluator.tick(now_ms), self._evaluated, self._conflicts_evaluated,
                now_ms))
        if self._stale_since_ms is None:  # a long catch-up keeps its progress too
            self._save_progress(now_ms)
        if self.channels:
            try:
                if self._announce:
                    self._announce_unquieted(now_ms)
            finally:  # a bug announcing (a damaged row) holds back no escalation; still raised
                self._remind(now_ms)

    def in_force(self, now_ms: int) -> InForce:
        """The rule controls in force (as of the last tick, once one has run)."""
        if self._in_force is None:
            self._refresh_controls(now_ms, diff=False)
        assert self._in_force is not None
        return self._in_force

    def _refresh_controls(self, now_ms: int, *, diff: bool) -> None:
        """Judge the rule controls at ``now_ms`` (reading the store's rows when due). With
        ``diff``: a rule enabled again has its never-recorded firings forgotten (they fire
        again), and a rule no longer quieted has what it holds open announced."""
        read = self._controls_read_ms
        if read is None or not 0 <= now_ms - read < CONTROLS_REFRESH_MS:
            self._controls_read_ms = now_ms
            try:
                self._control_rows = tuple(self.store.rule_controls())
            except StoreError as exc:  # the last rows read stay (a mute still ends in time)
                log.warning("cannot read the rule controls", extra={"error": str(exc)})
            except Exception:  # a bug: announce rather than hold
                log.exception("cannot read the rule controls; none is applied")
                self._control_rows = ()
        before, now = self._in_force, in_force(self._control_rows, self._severities, now_ms)
        if diff and before is not None:
            enabled = before.disabled.keys() - now.disabled.keys()
            try:
                unresolved = self.store.incidents(states=UNRESOLVED, limit=100_000) \
                    if enabled else []
            except StoreError as exc:  # judged again at the next tick, nothing forgotten
                log.warning("cannot read the incidents of a rule enabled again; trying again",
                            extra={"error": str(exc), "rules": sorted(enabled)})
                return
            for rule in enabled:
                keep = {(i.gateway, i.device) for i in unresolved if i.rule == rule}
                forgotten = self.evaluator.forget_firing(rule, keep=keep)
                log.warning("rule enabled again", extra={"rule": rule,
                                                         "firing_again": forgotten})
        self._in_force = now
        for row in self._control_rows:  # mutes over, and not announced yet (a restart)
            until = row.until_ms
            if row.kind is RuleControlKind.MUTED and until is not None \
                    and self._mutes_announced_ms < until <= now_ms \
                    and row.rule not in now.disabled:
                self._announce.setdefault(row.rule, until)
                self._mutes_ended_ms = max(self._mutes_ended_ms, until)
        if not diff or before is None:
            return
        for rule in {*before.muted, *before.disabled} - {*now.muted, *now.disabled}:
            control = before.quieted(rule)
            log.warning("rule announced again", extra={"rule": rule, "was": describe(control)
                                                       if control else None})
            self._announce.setdefault(rule, now_ms)

    def quieted_lines(self) -> list[str]:
        """The rules muted or disabled as of the last tick, one line each, for people (read
        from the health report's thread: no store read)."""
        now = self._in_force
        if not now:
            return []
        return [describe(control) for _, control in sorted({**now.muted, **now.disabled}.items())]

    def _quieted(self, now_ms: int) -> dict[str, str]:
        """Rule -> who quieted it and why, for the planners (never a critical rule)."""
        now = self.in_force(now_ms)
        return {rule: describe(control) for rule, control in
                {**now.muted, **now.disabled}.items()} if now else {}

    def _announce_unquieted(self, now_ms: int) -> None:
        """A rule's mute ended (or it was enabled): announce what it holds open and
        unacknowledged, none of which went out meanwhile; one message per channel, written in
        one transaction (retried at the next tick if the store refuses)."""
        rules = dict(self._announce)
        try:
            with self.store.atomically("announce rules no longer muted"):
                held = [i for i in self.store.incidents(states=(IncidentState.OPEN,),
                                                         limit=100_000)
                        if i.triggered_ms < rules.get(i.rule, 0)]  # not the ones announced
                for rule in sorted(rules):
                    incidents = sorted((i for i in held if i.rule == rule), key=lambda i: i.id)
                    channels = dict.fromkeys(
                        name for i in incidents for name in self._decide(
                            i.rule, i.severity, i.gateway, i.device).channels
                        if name in self.channels)
                    if not incidents or not channels:
                        continue
                    title, body = announce_again(rule, incidents)
                    for channel in channels:
                        self.store.queue_notification(channel, kind=NotificationKind.DIGEST,
                                                      title=title, body=body, at_ms=now_ms)
                ended = self._mutes_ended_ms
                if ended > self._mutes_announced_ms:
                    self.store.set_cursor(MUTES_CURSOR, ended)
        except StoreError as exc:
            log.warning("cannot announce a rule no longer muted; trying again",
                        extra={"error": str(exc), "rules": sorted(rules)})
            return
        for rule in rules:
            del self._announce[rule]
        self._mutes_announced_ms = max(self._mutes_announced_ms, ended)
        self.on_queued()

    def _catch_up(self, now_ms: int, *, look_at_the_log: bool = False) -> bool:
        """Evaluate from the log whatever is stored and not yet evaluated (events, then
        conflicting alarms), recording each chunk with the cursors; False while the store
        refuses (evaluation resumes from the cursors at the next chance), and while more
        than CATCH_UP_PER_CALL wait (the next commit or tick goes on).

        ``look_at_the_log`` (the clock): find the log's end and any conflicts in the store
        itself, not only from the commits handed over, so a commit that never reached
        :meth:`handle` (its bookkeeping failed first) waits for a tick, not for the next one.
        """
        if self._stale_since_ms is not None:
            if now_ms < self._retry_at_ms:
                return False
            if not self._guarded(now_ms, self._resume):
                return False
        caught_up = False

        def work() -> None:
            nonlocal caught_up
            if look_at_the_log:
                self._log_end = max(self._log_end, self.store.last_pos())
                self._conflicts_due = True
            caught_up = self._read_and_evaluate(now_ms)

        return self._guarded(now_ms, work) and caught_up

    def _read_and_evaluate(self, now_ms: int) -> bool:
        """Events and conflicting alarms in the order they were committed (a conflict after
        the events of its own commit), as live evaluation sees them; False when it stopped at
        CATCH_UP_PER_CALL with more to do."""
        budget = CATCH_UP_PER_CALL
        while True:
            if budget <= 0 and (self._evaluated < self._log_end or self._conflicts_due):
                self._note_behind()
                return False
            letters = self._waiting_conflicts()
            until = self._log_end
            if letters:  # the events committed before the first waiting conflict come first
                self._log_end = max(self._log_end, letters[0].log_pos or 0)
                until = max(letters[0].log_pos or 0, self._evaluated)
            while self._evaluated < until:
                chunk: list[StoredEvent] = next(self.store.iter_log(
                    EventFilter(), after_pos=self._evaluated, up_to_pos=until,
                    chunk=CATCH_UP_CHUNK), [])
                end = chunk[-1].pos if chunk else until
                self._step(self._observe(chunk, None, now_ms), end, self._conflicts_evaluated,
                           now_ms)
                budget -= max(len(chunk), 1)
                if budget <= 0 and self._evaluated < until:
                    self._note_behind()
                    return False
            if not letters:
                self._behind_since_ms = None
                return True
            ready = [letter for letter in letters if (letter.log_pos or 0) <= self._evaluated]
            transitions = [t for letter in ready for t in self._observe_conflict(letter, now_ms)]
            self._step(transitions, self._evaluated, ready[-1].pos, now_ms)
            budget -= len(ready)

    def _note_behind(self) -> None:
        """Remember when the oldest event still waiting arrived (for :meth:`lag`)."""
        waiting = next(self.store.iter_log(EventFilter(), after_pos=self._evaluated, chunk=1),
                       [])
        self._behind_since_ms = waiting[0].received_ms if waiting else None

    def _waiting_conflicts(self) -> list[DeadLetter]:
        """The next conflict dead letters after the cursor (none unless a commit had some)."""
        if not self._conflicts_due:
            return []
        letters = self.store.dead_letters_after(self._conflicts_evaluated, code="conflict",
                                                limit=CATCH_UP_CHUNK)
        if not letters:
            self._conflicts_due = False
        return letters

    def _observe(self, events: Sequence[StoredEvent],
                 data: Sequence[Mapping[str, Any]] | None, now_ms: int) -> list[Transition]:
        transitions: list[Transition] = []
        for index, event in enumerate(events):
            values = data[index] if data is not None else event.data
            if event.type == "provision":
                self._learn(event, values)
            observation = Observation(event.gateway, event.device, event.type, event.time_ms,
                                      event.received_ms, values)
            try:
                found = self.evaluator.observe(observation, now_ms)
            except Exception:  # one event must never hold back every alarm after it
                self._evaluation_failed(
                    f"{event.gateway}/{event.device} {event.type} #{event.pos}",
                    alarm=event.type == "alert" and values.get("state") != "cleared")
                continue
            if found:  # most events change nothing
                transitions += found
        return transitions

    def _evaluation_failed(self, what: str, *, alarm: bool,
                           error: BaseException | None = None) -> None:
        """Set aside an event (or a change) the rules cannot evaluate (a bug): retried, it would
        fail again at every retry and hold back every alarm after it. The step that passes it
        announces it (hub-evaluation-failed, critical), in the transaction of its cursor;
        ``error``: what failed, when it is not the exception being handled."""
        self.evaluation_failures += 1
        log.error("the rules could not evaluate an event; it is set aside and announced",
                  exc_info=error if error is not None else True,
                  extra={"event": what, "care_alarm": alarm})
        if len(self._failed) < 10_000:  # bounded; beyond, the log still has each one
            self._failed.append((what, alarm))

    def _observe_conflict(self, letter: DeadLetter, now_ms: int) -> list[Transition]:
        """An alarm refused as a conflict (its position holds another event) is still an
        alarm: the rules see it as if it were stored, and its incident says why it was not."""
        alarm = conflicting_alarm(letter)
        if alarm is None:
            return []
        note = f"; not stored: {letter.reason} (dead letter #{letter.pos})"
        try:
            found = self.evaluator.observe(alarm, now_ms)
        except Exception:  # as for a stored event: never hold back the alarms after it
            self._evaluation_failed(f"{alarm.gateway}/{alarm.device} alert (dead letter "
                                    f"#{letter.pos})", alarm=True)
            return []
        return [replace(t, detail=t.detail + note) if t.status == "firing" else t
                for t in found]

    def _guarded(self, now_ms: int, work: Callable[[], None]) -> bool:
        """Run one step of evaluation; if it fails, the evaluator may count changes as done
        that the store does not hold: mark it for a rebuild from the store and the cursors."""
        try:
            work()
        except StoreError as exc:
            self._went_stale(now_ms)
            log.error("cannot record alert changes; evaluation resumes from the log",
                      extra={"error": str(exc), "cursor": self._saved[0],
                             "waiting": self.unrecorded})
            return False
        except Exception:
            self._went_stale(now_ms)  # a bug: stay consistent with the store, and say so
            raise
        return True

    def _went_stale(self, now_ms: int) -> None:
        self.record_errors += 1
        if self._stale_since_ms is None:
            self._stale_since_ms = now_ms
        self._retry_at_ms = now_ms + RETRY_INTERVAL_MS

    def _step(self, transitions: list[Transition], events_pos: int, conflicts_pos: int,
              now_ms: int) -> None:
        """Record the changes found up to these positions together with the cursors (one
        transaction); with no changes, only move on in memory (see _save_progress). A rule a
        person disabled opens nothing (what it holds open may still resolve, unannounced)."""
        if transitions:
            disabled = self.in_force(now_ms).disabled
            if disabled:
                transitions = [t for t in transitions
                               if t.status != "firing" or t.rule not in disabled]
        if transitions or self._failed:
            try:
                self._record(transitions, events_pos, conflicts_pos, now_ms)
            finally:  # recorded; or refused, and then evaluated again from the log, found again
                self._failed.clear()
            self._saved, self._saved_at_ms = (events_pos, conflicts_pos), now_ms
        self._evaluated, self._conflicts_evaluated = events_pos, conflicts_pos

    def _record(self, transitions: Sequence[Transition], events_pos: int, conflicts_pos: int,
                now_ms: int) -> None:
        """Read what the changes are decided on, plan them (:func:`plan_changes`, pure) and
        write them with the cursors: all in one transaction. What was set aside (events the
        rules could not evaluate, changes a bug kept from being recorded) is announced in it."""
        setup = self._setup()
        failed_before = list(self._failed)
        # Transitions whose change a bug kept from being read for or written: the step is
        # planned again without them, so no change after one assumes it was written (a resolve
        # that failed followed by a new raise of that source would otherwise expect a new
        # incident the store cannot open), and no such bug fails the step at every retry.
        left_out: list[int] = []

        def work() -> _Applied:
            self._failed[:] = failed_before  # a plan made again finds its set-asides again
            todo = [t for i, t in enumerate(transitions) if i not in left_out]
            snapshot = self._change_snapshot(todo)
            plan = plan_changes(todo, snapshot, setup)
            for aside in plan.set_aside:
                self._evaluation_failed(aside.what, alarm=aside.alarm, error=aside.error)
            applied = self._apply(plan.actions, set_aside=True)
            if self._failed:
                applied.changes += self._apply(plan_failure_alert(
                    self._failed, self._self_snapshot((EVALUATION_FAILED_RULE,), now_ms),
                    setup, now_ms=now_ms), set_aside=False).changes
            self._save_cursors(events_pos, conflicts_pos)
            return applied

        while True:
            try:
                applied = self._in_one_transaction("record alert changes", work)
                break
            except _SetAsideError as bug:  # rolled back: nothing of those changes is written
                planned = [i for i in range(len(transitions)) if i not in left_out]
                self._failed[:] = failed_before
                for index in sorted(planned[i] for i in bug.indexes):
                    left_out.append(index)
                    transition = transitions[index]
                    rule = self.rules.get(transition.rule)
                    self._evaluation_failed(
                        f"{transition.gateway}/{transition.device} {transition.rule} "
                        f"{transition.status} (not recorded)",
                        alarm=transition.status == "firing" and rule is not None
                        and rule.kind == "event", error=bug.error)
                failed_before[:] = self._failed
        if self._failed:
            self._failed_alert = (now_ms + EVALUATION_FAILED_WINDOW_MS,
                                  failure_detail(self._failed))
        self._report(applied)

    def _in_one_transaction(self, action: str, work: Callable[[], _Applied]) -> _Applied:
        """Run load, plan and apply in one transaction. A plan the store outdated (a lost
        compare-and-set: an incident changed between the read and the write, which the one
        transaction rules out on SQLite) is rolled back and made again; then it is a refusal
        (evaluation resumes from the log), never a change recorded on a wrong assumption."""
        for _ in range(PLAN_ATTEMPTS):
            try:
                with self.store.atomically(action):
                    return work()
            except _PlanOutdatedError:
                log.warning("an incident changed while its change was planned; planning again",
                            extra={"action": action})
        msg = f"cannot {action}: incidents kept changing while their changes were planned"
        raise StoreError(msg)

    def _change_snapshot(self, transitions: Sequence[Transition]) -> ChangeSnapshot:
        """What one step's changes are decided on, read once: the unresolved incident of each
        source that fires, recent triggers (flapping), the silences active then, the timing of
        the groups a held message may join, and which gateways are offline (absences only).

        A bug (not a refusal of the store) reading one source's incident or one group's timing
        is raised as _SetAsideError naming the changes that needed it (set aside, as they were
        when the stage read these change by change), never a step failing at every retry."""
        keys: dict[Key, list[int]] = {}  # -> the firing transitions that need it
        since: dict[Key, int] = {}
        groups: dict[tuple[str, str], list[int]] = {}
        absent: set[str] = set()
        for index, transition in enumerate(transitions):
            rule = self.rules.get(transition.rule)
            if rule is None:
                continue  # the plan sets it aside
            key = (rule.name, transition.gateway, transition.device)
            if transition.status == "firing":
                keys.setdefault(key, []).append(index)
            if rule.kind != "event":
                since[key] = min(since.get(key, transition.at_ms), transition.at_ms)
            if rule.kind == "absence":
                absent.add(transition.gateway)
            if transition.status == "firing" and rule.severity != "critical":
                for group in self._groups_joined(rule.name, rule.severity, transition):
                    groups.setdefault(group, []).append(index)
        store = self.store
        offline, gateway_firing = self._inhibition_facts(absent)
        none: dict[int, Silence] = {}
        silences = self._for_muting("the silences", lambda: {
            silence.id: silence for at_ms in {t.at_ms for t in transitions}
            for silence in store.silences(active_at_ms=at_ms)}, none)
        unresolved: dict[Key, Incident] = {}
        for key, needed_by in keys.items():
            found = self._for_changes(needed_by, partial(
                store.unresolved_incident, rule=key[0], gateway=key[1], device=key[2]))
            if found is not None:
                unresolved[key] = found
        timing = {group: GroupTiming(*self._for_changes(needed_by, partial(
            store.group_timing, channel=group[0], group_key=group[1])))
            for group, needed_by in groups.items()}
        return ChangeSnapshot(
            unresolved=unresolved,
            triggers=self._for_muting("earlier triggers (flapping)", lambda: {
                key: tuple(store.incident_triggers(rule=key[0], gateway=key[1], device=key[2],
                                                   since_ms=at_ms - FLAP_WINDOW_MS))
                for key, at_ms in since.items()}, {}),
            silences=tuple(sorted(silences.values(), key=lambda s: -s.id)),  # newest first
            offline=offline, gateway_firing=gateway_firing, groups=timing,
            quieted=self._quieted(max((t.at_ms for t in transitions), default=0)))

    @staticmethod
    def _for_changes(needed_by: Sequence[int], read: Callable[[], _T]) -> _T:
        """Read what some changes (by index) are decided on; a bug reading it (not a refusal
        of the store) is raised as _SetAsideError, to set those changes aside."""
        try:
            return read()
        except StoreError:
            raise
        except Exception as exc:
            raise _SetAsideError(needed_by, exc) from exc

    def _groups_joined(self, rule: str, severity: str,
                       transition: Transition) -> list[tuple[str, str]]:
        """The groups (channel, gateway) a held message of this change may join."""
        try:
            channels = self._decide(rule, severity, transition.gateway, transition.device).channels
        except Exception:  # a bug: the plan meets it too and sets this change aside; reading
            return []  # on must not hold every other change of the step
        return [(channel, transition.gateway) for channel in channels if channel in self.channels]

    def _self_snapshot(self, rules: Iterable[str], now_ms: int, *,
                       problems: Mapping[str, str] | None = None,
                       again: Collection[str] = ()) -> ChangeSnapshot:
        """The unresolved incident of each of these hub rules; and, when hub-notifications-
        failing is to be announced, which channels fail (it must not go only through them)."""
        unresolved = {(rule, HUB_GATEWAY, HUB_DEVICE): found for rule in rules
                      if (found := self.store.unresolved_incident(
                          rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE)) is not None}
        failing = "hub-notifications-failing"
        told = failing in again or (failing, HUB_GATEWAY, HUB_DEVICE) not in unresolved
        return ChangeSnapshot(unresolved=unresolved, failing=failing_or_stuck(
            self.store, now_ms) if problems is not None and failing in problems and told else {})

    def _apply(self, actions: Sequence[Change | SetAside], *, set_aside: bool) -> _Applied:
        """Write planned changes in order, inside the caller's transaction. ``set_aside``: a bug
        while writing one change (not a refusal of the store) is raised as _SetAsideError, so
        that the caller rolls back and sets it aside like an event the rules cannot evaluate,
        rather than hold it and every change after it."""
        applied = _Applied()
        ids: dict[int, int] = {}  # the plan's refs of incidents it opens -> their ids
        for index, action in enumerate(actions):
            if isinstance(action, SetAside):
                continue
            try:
                applied.changes.append((action, *self._apply_one(action, ids)))
            except (StoreError, _PlanOutdatedError):
                raise
            except Exception as exc:
                if not set_aside:
                    raise
                raise _SetAsideError([index], exc) from exc  # one action per transition
        return applied

    def _apply_one(self, action: Change, ids: dict[int, int]) -> tuple[int | None, int | None]:
        """Write one change; the incident it opened or moved and the one it follows."""
        store = self.store
        if isinstance(action, Open):
            opened = store.open_incident(
                rule=action.rule, gateway=action.gateway, device=action.device,
                severity=action.severity, summary=action.summary, detail=action.detail,
                at_ms=action.at_ms, notify=action.notify, group_wait_ms=action.group_wait_ms,
                next_due_ms=action.next_due_ms)
            if (opened is not None) != action.expect_new:
                raise _PlanOutdatedError
            if opened is not None:
                ids[action.ref] = opened
            return opened, None
        if isinstance(action, Resolve):
            store.resolve_incidents(rule=action.rule, gateway=action.gateway,
                                    device=action.device, at_ms=action.at_ms, by=action.by,
                                    notify=action.notify)
            return None, None
        target = ids[action.incident] if action.incident < 0 else action.incident
        if isinstance(action, RaiseAgain):
            if not store.raise_again(target, at_ms=action.at_ms, detail=action.detail,
                                     notify=action.notify, group_wait_ms=action.group_wait_ms):
                raise _PlanOutdatedError
            return target, None
        new = store.supersede_incident(target, at_ms=action.at_ms, detail=action.detail,
                                       notify=action.notify, group_wait_ms=action.group_wait_ms,
                                       next_due_ms=action.next_due_ms)
        if new is None:
            raise _PlanOutdatedError
        ids[action.ref] = new
        return new, target

    def _report(self, applied: _Applied) -> None:
        """Count, log and wake the sender for what one transaction recorded, once committed
        (so the sender finds what it is woken for, and a rollback counts nothing)."""
        wake = False
        for action, incident, follows in applied.changes:
            wake = wake or bool(action.notify)
            where = {"rule": action.rule, "gateway": action.gateway, "device": action.device}
            if action.mute_error is not None:
                log.error("cannot tell whether to mute this change; it is announced",
                          exc_info=action.mute_error, extra=where)
            if action.muted is not None:
                self.muted += 1
                log.info("not announced", extra={**where, "reason": action.muted})
            if isinstance(action, Open) and incident is not None:
                if action.self_alert:
                    wake = True
                    log.error("the hub raised an alert about itself",
                              extra={"rule": action.rule, "detail": action.detail})
                else:
                    self.opened += 1
                    log.warning("incident opened", extra={
                        **where, "severity": action.severity, "detail": action.detail})
            elif isinstance(action, RaiseAgain | Supersede):
                self.opened += follows is not None
                log.warning("alarm raised again", extra={
                    **where, "incident": incident, "follows": follows, "raises": action.raises})
        if wake:
            self.on_queued()

    def _save_progress(self, now_ms: int) -> None:
        """Save change-free progress, at most every CURSOR_SAVE_INTERVAL_MS (not one fsync per
        commit). A crash loses at most that much: those events are evaluated again after the
        restart, which is harmless (README, "How the hub keeps its promises")."""
        current = (self._evaluated, self._conflicts_evaluated)
        saved_at = self._saved_at_ms
        if current == self._saved or (  # a clock set back saves at once
                saved_at is not None and 0 <= now_ms - saved_at < CURSOR_SAVE_INTERVAL_MS):
            return
        try:
            with self.store.atomically("save the alert cursors"):
                self._save_cursors(*current)
        except StoreError as exc:  # nothing is lost: the cursors only trail a little longer
            log.warning("cannot save the alert cursors", extra={"error": str(exc)})
            return
        self._saved, self._saved_at_ms = current, now_ms

    def stalled_ms(self, now_ms: int | None = None) -> int:
        """How long since the last clock tick (0 before the first): read by the dead man's
        switch from its own thread, so a stuck evaluation loop stops its pings."""
        last = self._last_tick_ms
        now = clock.now_ms() if now_ms is None else now_ms
        return 0 if last is None else max(0, now - last)

    def lag(self, now_ms: int) -> tuple[int, int | None]:
        """The worst evaluation lag since the last call, and since when it has been beyond the
        bound (None when it is not); read by the hub's self-check once a second."""
        worst, self._lag_ms = self._lag_ms, 0
        if self._last_tick_ms is not None:  # a tick that has not come yet is late too
            worst = max(worst, now_ms - self._last_tick_ms)
        if self._stale_since_ms is not None:  # the store refuses: evaluation waits
            worst = max(worst, now_ms - self._stale_since_ms)
        behind = self._behind_since_ms
        if behind is not None:  # catching up: the oldest event waiting has waited this long
            worst = max(worst, now_ms - behind)
        self._lagging_since_ms = lagging_since(self._lagging_since_ms, lag_ms=worst,
                                               now_ms=now_ms)
        return worst, self._lagging_since_ms

    def check_self(self, problems: Mapping[str, str], now_ms: int, *,
                   again: Collection[str] = ()) -> None:
        """Open or resolve the hub's own incidents (careflow-hub/hub) from its self-checks.

        ``again``: problems that happened anew since the last check while their incident may
        be unresolved (a care alarm refused beyond the device bound): announced again at once,
        as a care alarm raised again is.

        Care alarms refused beyond the device bound are also read here from their dead letters,
        after a cursor written with the announcement: a hub killed between storing one and
        this check announces it after the restart, and only once.
        """
        letters = self.store.dead_letters_after(self._over_bound_pos, code="too_many_devices",
                                                limit=CATCH_UP_PER_CALL, placed_only=True)
        problems, again = self._with_refused_alarms(problems, again, letters, now_ms)
        if self._failed_alert is not None:
            until, detail = self._failed_alert
            if now_ms >= until:
                self._failed_alert = None
            else:
                problems.setdefault(EVALUATION_FAILED_RULE, detail)
        setup = self._setup()

        def work() -> _Applied:
            snapshot = self._self_snapshot(SELF_RULES, now_ms, problems=problems, again=again)
            applied = self._apply(plan_self_check(problems, again, snapshot, setup,
                                                  now_ms=now_ms), set_aside=False)
            if letters:
                self.store.set_cursor(OVER_BOUND_CURSOR, letters[-1].pos)
            return applied

        applied = self._in_one_transaction("check the hub itself", work)
        if letters:
            self._over_bound_pos = letters[-1].pos
        self._report(applied)

    def _with_refused_alarms(self, problems: Mapping[str, str], again: Collection[str],
                             letters: Sequence[DeadLetter], now_ms: int,
                             ) -> tuple[dict[str, str], set[str]]:
        """The self-check's problems and news, with the care alarms these dead letters hold
        (the hub-devices-over-bound alert stays while such refusals are recent)."""
        problems, again = dict(problems), set(again)
        alarms = [alarm for letter in letters if (alarm := conflicting_alarm(letter))]
        if alarms:
            named = sorted({f"{a.gateway}/{a.device}" for a in alarms})
            detail = (f"{len(alarms)} CARE ALARM(S) from new devices beyond the per-gateway "
                      f"bound (CAREFLOW_MAX_DEVICES_PER_GATEWAY) were dead-lettered as "
                      f"too_many_devices, not evaluated: {first_few(named)}; check those "
                      "devices now (careflow deadletter list --code too_many_devices)")
            self._refused_alarms = (now_ms + OVER_BOUND_WINDOW_MS, detail)
            again.add(OVER_BOUND_RULE)
        if self._refused_alarms is not None:
            until, detail = self._refused_alarms
            if now_ms >= until:
                self._refused_alarms = None
            elif OVER_BOUND_RULE not in problems:
                problems[OVER_BOUND_RULE] = detail
        return problems, again

    def _remind(self, now_ms: int) -> None:
        """Escalation steps, then repeats every repeat_interval, for open incidents whose
        reminder is due: by due time, the longest due first, at most REMIND_PER_TICK per tick,
        so no number of newer incidents can hold back an older care alarm's escalation.

        Most ticks find nothing due and write nothing; otherwise what is due is read, planned
        (:func:`plan_reminders`, pure) and recorded in one transaction. An incident whose
        reminder cannot be planned or recorded (a damaged row, a bug) rolls it back; the walk
        is then recorded without that one, which is tried again after RETRY_INTERVAL_MS, and
        the failure is raised once the others are recorded (the hub counts and logs it): one
        incident that always fails never holds back the escalation of every other."""
        if not self._rescheduled:  # the policies may have changed since the last run
            self.store.make_open_incidents_due()
            self._rescheduled = True
        held = self._reminders_held
        for incident_id, until in list(held.items()):
            if not 0 < until - now_ms <= RETRY_INTERVAL_MS:  # its time (or the clock went back)
                del held[incident_id]
        if not any(incident.id not in held for incident in self.store.due_incidents(
                now_ms=now_ms, limit=len(held) + 1)):
            return
        failure: Exception | None = None
        for _ in range(PLAN_ATTEMPTS):
            try:
                won = self._record_reminders(now_ms)
                break
            except _ReminderError as exc:  # rolled back: recorded again without that one
                log.error("cannot record an incident's reminder; the others go on without it",
                          extra={"incident": exc.incident_id, "error": str(exc.error)})
                held[exc.incident_id] = now_ms + RETRY_INTERVAL_MS
                failure = failure or exc.error
        else:
            assert failure is not None
            raise failure
        for action in won:  # once committed, so the sender finds what it is woken for
            if action.kind is Reminder.ESCALATE:
                log.warning("incident escalated", extra={
                    "incident": action.incident_id, "step": action.sent_before + 1,
                    "channels": list(action.channels)})
            elif action.notify:
                log.info("incident announced again", extra={"incident": action.incident_id,
                                                            "channels": list(action.channels)})
        if any(action.kind is Reminder.ESCALATE or action.notify for action in won):
            self.on_queued()
        if failure is not None:
            raise failure

    def _record_reminders(self, now_ms: int) -> list[Remind]:
        """Plan and record the due reminders in one transaction; those recorded (not sent
        meanwhile, and still open: compare-and-set). One incident's failure is raised as
        _ReminderError, naming it."""
        won: list[Remind] = []
        setup = self._setup()
        with self.store.atomically("record escalation steps and repeats"):
            snapshot = self._reminder_snapshot(now_ms)
            for incident in snapshot.due:  # planned one by one: each is its own
                try:
                    for action in plan_reminders(replace(snapshot, due=(incident,)), setup):
                        if isinstance(action, Reschedule):
                            self.store.set_incident_due(action.incident_id,
                                                        next_due_ms=action.next_due_ms)
                        elif self.store.escalate_incident(
                                action.incident_id, sent_before=action.sent_before,
                                at_ms=now_ms, notify=action.notify,
                                group_key=action.group_key, next_due_ms=action.next_due_ms):
                            won.append(action)
                except Exception as exc:
                    raise _ReminderError(incident.id, exc) from exc
        return won

    def _reminder_snapshot(self, now_ms: int) -> ReminderSnapshot:
        """What the escalation walk decides on, read once: the due incidents, the silences
        active now, and (for absences only: inhibition) which gateways are offline."""
        due = tuple(incident for incident in self.store.due_incidents(
            now_ms=now_ms, limit=REMIND_PER_TICK) if incident.id not in self._reminders_held)
        absent = {incident.gateway for incident in due
                  if getattr(self.rules.get(incident.rule), "kind", None) == "absence"}
        offline, gateway_firing = self._inhibition_facts(absent)
        return ReminderSnapshot(now_ms=now_ms, due=due, silences=self._for_muting(
            "the silences", lambda: tuple(self.store.silences(active_at_ms=now_ms)), ()),
                                offline=offline, gateway_firing=gateway_firing,
                                quieted=self._quieted(now_ms))

    def _setup(self) -> Setup:
        """What the pure planners need to know of this stage's configuration."""
        return Setup(rules=self.rules, escalation=self.escalation, routing=self.routing,
                     channels=tuple(self.channels), group_wait_ms=self.group_wait_ms,
                     runbook_url=self.runbook_url, decide=self._decide)

    def _decide(self, rule: str, severity: str, gateway: str, device: str) -> Decision:
        return self.decision(rule=rule, severity=severity, gateway=gateway, device=device)

    def _inhibition_facts(self, gateways: Collection[str],
                          ) -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
        """What inhibition (absences only) looks at for these gateways: which gateways are
        offline, and the rules firing for each gateway itself (see :meth:`_for_muting`)."""
        nothing: tuple[frozenset[str], dict[str, tuple[str, ...]]] = (frozenset(), {})
        if not gateways:
            return nothing
        return self._for_muting("which gateways are offline", lambda: (
            self._offline(), self._gateway_firing(gateways)), nothing)

    @staticmethod
    def _for_muting(what: str, read: Callable[[], _T], nothing: _T) -> _T:
        """Read something only muting looks at (silences, earlier triggers, offline gateways).
        A bug reading it (not a refusal of the store) is logged and mutes nothing: better
        announced than held, and never a step that fails at every retry from the log with
        every alarm after it (the stage once read these change by change, and announced past
        such a bug)."""
        try:
            return read()
        except StoreError:
            raise
        except Exception:
            log.exception("cannot tell whether to mute; nothing is muted by it",
                          extra={"reading": what})
            return nothing

    def _offline(self) -> frozenset[str]:
        """The gateways whose last presence is offline."""
        return frozenset(gateway for gateway, presence in self.store.presence().items()
                         if presence.state == "offline")

    def _gateway_firing(self, gateways: Collection[str]) -> dict[str, tuple[str, ...]]:
        """The rules firing for each of these gateways itself (device == gateway), in the
        evaluator's order: one pass over what fires, not one per decision."""
        found: dict[str, list[str]] = {}
        if gateways:
            for name, (gateway, device), _ in self.evaluator.active():
                if gateway == device and gateway in gateways:
                    found.setdefault(gateway, []).append(name)
        return {gateway: tuple(names) for gateway, names in found.items()}

    @property
    def unrecorded(self) -> int:
        """Stored events whose evaluation is not recorded yet (0 when caught up)."""
        return max(self._log_end - self._evaluated, 0)
