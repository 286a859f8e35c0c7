"""Alerting inside the hub: rules evaluated on every committed event and on a clock tick, and
their transitions turned into incidents (open → acknowledged → resolved).

Notifications (Apprise), escalation, silences and grouping build on the incidents recorded here;
``routing.py`` decides channels, escalation policy and grouping times, this stage applies them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from careflow.core.errors import ConfigError, ContractError, StoreError
from careflow.hub.alerting.evaluate import Evaluator, Observation, Transition
from careflow.hub.alerting.mute import (
    FLAP_WINDOW_MS,
    flapping,
    inhibited_by,
    silenced_by,
)
from careflow.hub.alerting.notify import (
    Channel,
    avoid_failing,
    failing_or_stuck,
    raised_again_text,
    render,
)
from careflow.hub.alerting.plan import Remind, ReminderSnapshot, Reschedule, Setup, plan_reminders
from careflow.hub.alerting.routing import (
    Decision,
    Reminder,
    decide,
    firing_send_at,
    next_reminder_ms,
    reachable_channels,
)
from careflow.hub.alerting.rules import Rule, RuleSet, load_rules
from careflow.hub.alerting.selfwatch import (
    HUB_DEVICE,
    HUB_GATEWAY,
    OVER_BOUND_WINDOW_MS,
    SELF_RULES,
    lagging_since,
)
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.store.interface import (
    DeadLetter,
    EventFilter,
    EventStore,
    Incident,
    Outgoing,
    StoredEvent,
)
from careflow.schemas import decode_json, validate_event

__all__ = [
    "ALERTS_CURSOR",
    "CONFLICTS_CURSOR",
    "OVER_BOUND_CURSOR",
    "AlertStage",
    "conflicting_alarm",
    "default_rules",
    "default_rules_dir",
]

log = logging.getLogger(__name__)

ALERTS_CURSOR = "alerts"  # the newest log position whose evaluation is recorded
CONFLICTS_CURSOR = "alerts-conflicts"  # the same over the conflict dead letters
# the newest too_many_devices dead letter whose care alarm (if it held one) the hub announced
OVER_BOUND_CURSOR = "alerts-over-bound"
OVER_BOUND_RULE = "hub-devices-over-bound"
# A stored event the rules could not evaluate (a bug in careflow) is set aside, never retried
# for ever in front of every alarm after it; the hub's own alert names it and stays open this
# long after the last one.
EVALUATION_FAILED_RULE = "hub-evaluation-failed"
EVALUATION_FAILED_WINDOW_MS = 600_000
_NAMED = 5  # events or devices a hub alert names; the rest are counted
# Progress without incident changes is saved at most this often (a crash evaluates at most
# this much again); changes are always saved with the cursors, in the same transaction.
CURSOR_SAVE_INTERVAL_MS = 1_000
RETRY_INTERVAL_MS = 1_000  # after a refused write, how soon evaluation resumes from the log
CATCH_UP_CHUNK = 1_000  # events read from the log per step when catching up
# Events (and conflict dead letters) evaluated from the log per commit or clock tick while
# behind: a hub restarted a million events behind goes on ingesting while it catches up
# (about 0.4 s of evaluation per call), rather than holding the writer thread for a minute.
CATCH_UP_PER_CALL = 20 * CATCH_UP_CHUNK


GROUP_WAIT_MS = 30_000  # the default; `routing: group_wait:` in the rules sets it
# Due incidents the escalation walk looks at per clock tick (4 ticks a second); more wait for the
# next tick, the longest due first, and each one looked at is moved on to its next due time.
REMIND_PER_TICK = 1_000


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


def _summary(rule: Rule, transition: Transition) -> str:
    fields = defaultdict(str, gateway=transition.gateway, device=transition.device,
                         rule=rule.name)
    text = rule.summary or f"{rule.name} on {transition.gateway}/{transition.device}"
    try:
        return text.format_map(fields)
    except (ValueError, LookupError, AttributeError, TypeError):  # "{device.x}", "{device[x]}"
        return text  # as written: a template that cannot be filled must not hold the alarm


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


def _first_few(names: Sequence[str]) -> str:
    """Names for a hub alert: the first _NAMED, then how many more (a message stays short)."""
    more = len(names) - _NAMED
    return ", ".join(names[:_NAMED]) + (f" and {more} more" if more > 0 else "")


class AlertStage:
    """Feeds the evaluator and records incidents; runs on the hub's writer thread."""

    name = "alerts"

    def __init__(self, store: EventStore, rules: RuleSet,
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
        # Non-critical alerts wait this long so that a burst on one gateway becomes one message
        # (Alertmanager's group_wait); critical ones, care alarms above all, never wait. Set from
        # the rules' `routing:` section; a route may set its own.
        self.group_wait_ms = self.routing.group_wait
        self.on_queued: Callable[[], None] = lambda: None  # wakes the notification sender
        self._pending_wake = False
        self._sites = SiteBook()  # the same site rule as the InfluxDB sink and the report
        self._kinds: dict[tuple[str, str], str] = {}  # (gateway, device) -> kind
        # how far evaluation runs behind ingest (worst since the last self-check), and since
        # when it has been beyond the bound (watch the watcher)
        self._lag_ms = 0
        self._last_tick_ms: int | None = None
        self._lagging_since_ms: int | None = None
        self._rescheduled = False  # open incidents' due times recomputed since start
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
                if name not in self.channels:
                    msg = (f"route {index + 1} ({rules.route_origins[index]}) sends to channel "
                           f"{name!r}, which has no URL: set CAREFLOW_CHANNEL_{name.upper()} "
                           "(or ..._FILE)")
                    raise ConfigError(msg)
        # the hub's own alerts are critical, so the critical route must exist in any case
        for rule in (*rules.rules, *_SELF_RULE_STUBS):
            for name, why in reachable_channels(rules.routing, rule.severity).items():
                if name not in self.channels:
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
        # the clock is judged only once the rules have seen everything stored
        if self._catch_up(now_ms, look_at_the_log=True):
            self._guarded(now_ms, lambda: self._step(
                self.evaluator.tick(now_ms), self._evaluated, self._conflicts_evaluated,
                now_ms))
        if self._stale_since_ms is None:  # a long catch-up keeps its progress too
            self._save_progress(now_ms)
        if self.channels:
            self._remind(now_ms)

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

    def _evaluation_failed(self, what: str, *, alarm: bool) -> None:
        """Set aside an event the rules cannot evaluate (a bug): retried, it would fail again
        at every retry and hold back every alarm after it. The step that passes it announces
        it (hub-evaluation-failed, critical), in the transaction of its cursor."""
        self.evaluation_failures += 1
        log.exception("the rules could not evaluate an event; it is set aside and announced",
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
        transaction); with no changes, only move on in memory (see _save_progress)."""
        if transitions or self._failed:
            self._pending_wake = False
            counted = (self.opened, self.muted)  # a refused transaction counts nothing
            try:
                with self.store.atomically("record alert changes"):
                    for transition in transitions:
                        self._record_or_set_aside(transition)
                    if self._failed:
                        self._announce_failures(now_ms)
                    self._save_cursors(events_pos, conflicts_pos)
            except BaseException:
                self.opened, self.muted = counted
                self._failed.clear()  # evaluated again from the log, and found again
                raise
            self._failed.clear()
            self._saved, self._saved_at_ms = (events_pos, conflicts_pos), now_ms
            if self._pending_wake:
                self.on_queued()
        self._evaluated, self._conflicts_evaluated = events_pos, conflicts_pos

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
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
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
        self._pending_wake = False
        with self.store.atomically("check the hub itself"):
            self._check_self(problems, now_ms, again)
            if letters:
                self.store.set_cursor(OVER_BOUND_CURSOR, letters[-1].pos)
        if letters:
            self._over_bound_pos = letters[-1].pos
        if self._pending_wake:  # once committed, so the sender finds what it is woken for
            self.on_queued()

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
                      f"too_many_devices, not evaluated: {_first_few(named)}; check those "
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

    def _check_self(self, problems: Mapping[str, str], now_ms: int,
                    again: Collection[str]) -> None:
        for rule, severity in SELF_RULES.items():
            if rule in problems:
                self._raise_self(rule, severity, problems[rule], now_ms,
                                 again=rule in again)
            # one lookup per rule on the unresolved-incident index: a page of the newest
            # incidents missed the hub's own behind a busy fleet's, so it never resolved
            elif self.store.unresolved_incident(rule=rule, gateway=HUB_GATEWAY,
                                                device=HUB_DEVICE) is not None:
                self.store.resolve_incidents(rule=rule, gateway=HUB_GATEWAY,
                                             device=HUB_DEVICE, at_ms=now_ms,
                                             by="careflow (self-check passed)")

    def _raise_self(self, rule: str, severity: str, detail: str, now_ms: int, *,
                    again: bool) -> None:
        """Open one of the hub's own incidents, or (``again``: it happened anew) announce the
        unresolved one again at once; inside the caller's transaction."""
        if again:  # _raise_unresolved looks the incident up itself: False when there is none

            def outgoing(text: str) -> list[Outgoing]:
                return self._self_outgoing(rule, severity, detail, now_ms, "raised-again", text)

            if self._raise_unresolved(rule, severity, HUB_GATEWAY, HUB_DEVICE, now_ms,
                                      detail, outgoing, lambda _channels: 0):
                return
        elif self.store.unresolved_incident(rule=rule, gateway=HUB_GATEWAY,
                                            device=HUB_DEVICE) is not None:
            return  # still open, nothing new: said already
        notify = self._self_outgoing(rule, severity, detail, now_ms, "firing")
        if self.store.open_incident(rule=rule, gateway=HUB_GATEWAY, device=HUB_DEVICE,
                                    severity=severity, summary=f"careflow hub: {rule}",
                                    detail=detail, at_ms=now_ms, notify=notify,
                                    next_due_ms=self._first_due_ms(
                                        rule, severity, HUB_GATEWAY, HUB_DEVICE, now_ms)):
            log.error("the hub raised an alert about itself",
                      extra={"rule": rule, "detail": detail})
            self._pending_wake = True

    def _announce_failures(self, now_ms: int) -> None:
        """hub-evaluation-failed for the events set aside in this step (see
        _evaluation_failed), announced again at once if it is already open."""
        named = [what for what, _ in self._failed]
        alarms = sum(alarm for _, alarm in self._failed)
        detail = (f"{len(named)} stored event(s) could not be evaluated by the rules (a bug in "
                  f"careflow; they are stored, and were set aside so that no alarm waits behind "
                  f"them): {_first_few(named)}"
                  + (f"; {alarms} of them a CARE ALARM: check those devices now" if alarms
                     else "") + "; see the hub's log and `careflow events query`")
        self._raise_self(EVALUATION_FAILED_RULE, SELF_RULES[EVALUATION_FAILED_RULE], detail,
                         now_ms, again=True)
        self._failed_alert = (now_ms + EVALUATION_FAILED_WINDOW_MS, detail)

    def _self_outgoing(self, rule: str, severity: str, detail: str, now_ms: int, kind: str,
                       again: str | None = None) -> list[Outgoing]:
        """The messages of one of the hub's own alerts, to every channel its route names."""
        title, body = render(kind=kind, severity=severity, summary=f"careflow hub: {rule}",
                             detail=detail, gateway=HUB_GATEWAY, device=HUB_DEVICE,
                             since_ms=now_ms, runbook=self._runbook("runbooks/hub-unhealthy.md"),
                             again=again)
        channels = self.decision(rule=rule, severity=severity, gateway=HUB_GATEWAY,
                                 device=HUB_DEVICE).channels
        if rule == "hub-notifications-failing":  # not (only) through the failing one
            channels = avoid_failing(channels, failing=failing_or_stuck(self.store, now_ms),
                                     configured=tuple(self.channels))
        return [(c, title, body) for c in channels if c in self.channels]

    def _remind(self, now_ms: int) -> None:
        """Escalation steps, then repeats every repeat_interval, for open incidents whose
        reminder is due: by due time, the longest due first, at most REMIND_PER_TICK per tick,
        so no number of newer incidents can hold back an older care alarm's escalation.

        Most ticks find nothing due and write nothing; otherwise what is due is read, planned
        (:func:`plan_reminders`, pure) and recorded in one transaction."""
        if not self._rescheduled:  # the policies may have changed since the last run
            self.store.make_open_incidents_due()
            self._rescheduled = True
        if not self.store.due_incidents(now_ms=now_ms, limit=1):
            return
        won: list[Remind] = []  # recorded: not sent meanwhile, and still open (compare-and-set)
        with self.store.atomically("record escalation steps and repeats"):
            for action in plan_reminders(self._reminder_snapshot(now_ms), self._setup()):
                if isinstance(action, Reschedule):
                    self.store.set_incident_due(action.incident_id,
                                                next_due_ms=action.next_due_ms)
                elif self.store.escalate_incident(
                        action.incident_id, sent_before=action.sent_before, at_ms=now_ms,
                        notify=action.notify, group_key=action.group_key,
                        next_due_ms=action.next_due_ms):
                    won.append(action)
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

    def _reminder_snapshot(self, now_ms: int) -> ReminderSnapshot:
        """What the escalation walk decides on, read once: the due incidents, the silences
        active now, and (for absences only: inhibition) which gateways are offline."""
        due = tuple(self.store.due_incidents(now_ms=now_ms, limit=REMIND_PER_TICK))
        absent = {incident.gateway for incident in due
                  if getattr(self.rules.get(incident.rule), "kind", None) == "absence"}
        return ReminderSnapshot(now_ms=now_ms, due=due,
                                silences=tuple(self.store.silences(active_at_ms=now_ms)),
                                offline=self._offline() if absent else frozenset(),
                                gateway_firing=self._gateway_firing(absent))

    def _setup(self) -> Setup:
        """What the pure planners need to know of this stage's configuration."""
        return Setup(rules=self.rules, escalation=self.escalation, routing=self.routing,
                     channels=tuple(self.channels), group_wait_ms=self.group_wait_ms,
                     runbook_url=self.runbook_url, decide=self._decide)

    def _decide(self, rule: str, severity: str, gateway: str, device: str) -> Decision:
        return self.decision(rule=rule, severity=severity, gateway=gateway, device=device)

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

    def _inhibited(self, incident: Incident) -> bool:
        rule = self.rules.get(incident.rule)
        return rule is not None and inhibited_by(
            rule_kind=rule.kind, gateway=incident.gateway, device=incident.device,
            gateway_offline=self._gateway_offline(incident.gateway),
            gateway_announced_by=self._gateway_rule_firing(rule, incident.gateway)) is not None

    def _gateway_offline(self, gateway: str) -> bool:
        presence = self.store.presence().get(gateway)
        # what fires may include incidents of rules since removed from the configuration
        return (presence is not None and presence.state == "offline") or any(
            subject == (gateway, gateway) and name in self.rules
            and self.rules[name].kind == "absence"
            for name, subject, _ in self.evaluator.active())

    def _runbook(self, path: str | None) -> str | None:
        """A rule's runbook as people should get it: a link when a base URL is configured."""
        if path is None or self.runbook_url is None or "://" in path:
            return path
        return self.runbook_url.rstrip("/") + "/" + path.lstrip("/")

    @property
    def unrecorded(self) -> int:
        """Stored events whose evaluation is not recorded yet (0 when caught up)."""
        return max(self._log_end - self._evaluated, 0)

    def _record_or_set_aside(self, transition: Transition) -> None:
        """Record one change; a bug while recording it sets it aside like an event the rules
        cannot evaluate (retried from the log, it would fail again and hold every alarm after
        it). A refusal of the store is retried: it is not the change's fault."""
        try:
            self._record_one(transition)
        except StoreError:
            raise
        except Exception:
            rule = self.rules.get(transition.rule)
            self._evaluation_failed(
                f"{transition.gateway}/{transition.device} {transition.rule} "
                f"{transition.status} (not recorded)",
                alarm=transition.status == "firing" and rule is not None and rule.kind == "event")

    def _record_one(self, transition: Transition) -> None:
        """Open or resolve one incident (with its notifications) in one transaction."""
        rule = self.rules[transition.rule]
        summary = _summary(rule, transition)
        if transition.status == "firing":
            if rule.kind == "event" and self._raise_again(rule, transition, summary):
                return
            opened = self.store.open_incident(
                rule=rule.name, gateway=transition.gateway, device=transition.device,
                severity=rule.severity, summary=summary, detail=transition.detail,
                at_ms=transition.at_ms, notify=(notify := self._outgoing(
                    rule, transition, summary, "firing")),
                group_wait_ms=self._hold_ms(rule, transition, [c for c, _, _ in notify]),
                next_due_ms=self._first_due_ms(rule.name, rule.severity, transition.gateway,
                                               transition.device, transition.at_ms))
            if opened:
                self.opened += 1
                log.warning("incident opened", extra={
                    "rule": rule.name, "gateway": transition.gateway,
                    "device": transition.device, "severity": rule.severity,
                    "detail": transition.detail})
        else:
            self.store.resolve_incidents(rule=rule.name, gateway=transition.gateway,
                                         device=transition.device, at_ms=transition.at_ms,
                                         by="careflow (condition cleared)",
                                         notify=self._outgoing(rule, transition, summary,
                                                               "resolved"))

    def _raise_again(self, rule: Rule, transition: Transition, summary: str) -> bool:
        """An event rule (a care alarm) raised while its incident is unresolved: every raise is
        a new emergency (see :meth:`_raise_unresolved`)."""
        def outgoing(again: str) -> list[Outgoing]:
            return self._outgoing(rule, transition, summary, "raised-again", again=again)

        def hold(channels: list[str]) -> int:
            return self._hold_ms(rule, transition, channels)

        return self._raise_unresolved(rule.name, rule.severity, transition.gateway,
                                      transition.device, transition.at_ms, transition.detail,
                                      outgoing, hold)

    def _raise_unresolved(self, rule: str, severity: str, gateway: str, device: str, at_ms: int,
                          detail: str, outgoing: Callable[[str], list[Outgoing]],
                          hold: Callable[[list[str]], int]) -> bool:
        """A new raise of an unresolved incident. Still open: count it and announce it again at
        once (the escalation walk goes on: nobody answered yet). Acknowledged: someone had the
        last raise, so a new incident follows it, announced at once, and its escalation starts
        from this raise. False when nothing is unresolved (open a new incident as usual).
        ``outgoing`` renders the messages from the "raised again" text; ``hold`` is their
        group wait."""
        # Someone may acknowledge or resolve it between the read and the write (the CLI is
        # another process): each move is compare-and-set, and each state is left at most once.
        for _ in range(3):
            existing = self.store.unresolved_incident(rule=rule, gateway=gateway, device=device)
            if existing is None:
                return False
            acknowledged = existing.state == "acknowledged"
            notify = outgoing(raised_again_text(
                raises=existing.raises + 1,
                first_raised_ms=existing.first_raised_ms or existing.triggered_ms,
                acknowledged_by=existing.acknowledged_by if acknowledged else None,
                acknowledged_ms=existing.acknowledged_ms if acknowledged else None))
            wait = hold([c for c, _, _ in notify])
            if acknowledged:
                carried_by = self.store.supersede_incident(
                    existing.id, at_ms=at_ms, detail=detail, notify=notify, group_wait_ms=wait,
                    next_due_ms=self._first_due_ms(rule, severity, gateway, device, at_ms))
            else:
                carried_by = existing.id if self.store.raise_again(
                    existing.id, at_ms=at_ms, detail=detail, notify=notify,
                    group_wait_ms=wait) else None
            if carried_by is not None:
                self.opened += carried_by != existing.id
                if notify:
                    self._pending_wake = True
                log.warning("alarm raised again", extra={
                    "rule": rule, "gateway": gateway, "device": device, "incident": carried_by,
                    "follows": existing.id if carried_by != existing.id else None,
                    "raises": existing.raises + 1})
                return True
        return False

    def _first_due_ms(self, rule: str, severity: str, gateway: str, device: str,
                      at_ms: int) -> int | None:
        """When a new incident's first escalation step or repeat is due (None: never)."""
        decision = self.decision(rule=rule, severity=severity, gateway=gateway, device=device)
        steps = self.escalation.get(decision.escalation or "", ())
        return next_reminder_ms(tuple(s.after for s in steps), sent=0, state="open",
                                triggered_ms=at_ms, repeat_interval_ms=decision.repeat_interval_ms)

    def _muted(self, rule: Rule, transition: Transition) -> str | None:
        """Why this change is recorded but not announced, if it is not announced."""
        if rule.kind != "event" and flapping(
                self._recent_triggers(rule.name, transition.gateway, transition.device,
                                      transition.at_ms),
                now_ms=transition.at_ms):
            return "flapping: it fired and cleared again and again; see careflow incidents list"
        silence = silenced_by(self.store.silences(active_at_ms=transition.at_ms), rule.name,
                              transition.gateway, transition.device, transition.at_ms)
        if silence is not None:
            return f"silenced by #{silence.id} ({silence.comment}, {silence.created_by})"
        return inhibited_by(rule_kind=rule.kind, gateway=transition.gateway,
                            device=transition.device,
                            gateway_offline=self._gateway_offline(transition.gateway),
                            gateway_announced_by=self._gateway_rule_firing(rule,
                                                                           transition.gateway))

    def _gateway_rule_firing(self, rule: Rule, gateway: str) -> str | None:
        """Another rule watching gateways themselves that fires for this gateway, if any."""
        if rule.kind != "absence" or getattr(rule, "only_gateways", False):
            return None
        return next((name for name, subject, _ in self.evaluator.active()
                     if subject == (gateway, gateway) and name != rule.name
                     and getattr(self.rules.get(name), "only_gateways", False)), None)

    def _recent_triggers(self, rule: str, gateway: str, device: str, now_ms: int) -> list[int]:
        """Earlier triggers of this rule for this source within the flapping window."""
        return self.store.incident_triggers(rule=rule, gateway=gateway, device=device,
                                            since_ms=now_ms - FLAP_WINDOW_MS)

    def _outgoing(self, rule: Rule, transition: Transition, summary: str,
                  kind: str, *, again: str | None = None) -> list[Outgoing]:
        try:
            reason = self._muted(rule, transition)
        except StoreError:
            raise  # the store refuses: the whole change is retried from the log
        except Exception:  # a bug must not hold this change, and every one after it, for ever
            log.exception("cannot tell whether to mute this change; it is announced",
                          extra={"rule": rule.name, "gateway": transition.gateway,
                                 "device": transition.device})
            reason = None
        if reason is not None:
            self.muted += 1
            log.info("not announced", extra={"rule": rule.name, "gateway": transition.gateway,
                                             "device": transition.device, "reason": reason})
            return []
        title, body = render(kind=kind, severity=rule.severity, summary=summary,
                             detail=transition.detail, gateway=transition.gateway,
                             device=transition.device, since_ms=transition.at_ms,
                             runbook=self._runbook(rule.runbook), again=again)
        channels = self.decision(rule=rule.name, severity=rule.severity,
                                 gateway=transition.gateway, device=transition.device).channels
        outgoing = [(name, title, body) for name in channels if name in self.channels]
        if outgoing:
            self._pending_wake = True
        return outgoing

    def _hold_ms(self, rule: Rule, transition: Transition, channels: list[str]) -> int:
        """How long a new firing notification waits for its group (group_wait, group_interval);
        with several channels, the longest of their holds, so no group goes out too often."""
        if rule.severity == "critical" or not channels:
            return 0
        decision = self.decision(rule=rule.name, severity=rule.severity,
                                 gateway=transition.gateway, device=transition.device)
        # a route's own group_wait wins; otherwise the stage's (tests shorten it)
        wait = self.group_wait_ms if decision.route < 0 or \
            self.routing.routes[decision.route].group_wait is None else decision.group_wait_ms
        hold = 0
        for channel in channels:
            last_sent, pending_at = self.store.group_timing(channel=channel,
                                                            group_key=transition.gateway)
            send_at = firing_send_at(now_ms=transition.at_ms, critical=False,
                                     group_wait_ms=wait,
                                     group_interval_ms=decision.group_interval_ms,
                                     last_sent_ms=last_sent, pending_at_ms=pending_at)
            hold = max(hold, send_at - transition.at_ms)
        return hold
