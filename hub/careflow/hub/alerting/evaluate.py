"""Rule evaluation without I/O: observations and clock ticks in, alert transitions out.

The caller passes ``now`` in (milliseconds). Liveness (absence rules) is judged by arrival time,
so a gateway whose clock is wrong is still seen alive; values (threshold rules) by event time, so
an old reading replayed late from a gateway's buffer can neither fire a stale alert nor resolve a
current one.
"""

from __future__ import annotations

import collections
import heapq
import operator
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from careflow.hub.alerting.rules import AbsenceRule, EventRule, RateRule, Rule, ThresholdRule

__all__ = ["Evaluator", "Observation", "Transition"]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}


class Observation(NamedTuple):
    """One stored event, as rules see it (a NamedTuple: one is built per event, and a frozen
    dataclass cost three times as much to build)."""

    gateway: str
    device: str
    type: str
    time_ms: int
    received_ms: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Transition:
    """A rule started or stopped firing for a source."""

    rule: str
    gateway: str
    device: str
    status: Literal["firing", "resolved"]
    at_ms: int
    severity: str
    detail: str


Subject = tuple[str, str]


@dataclass(slots=True)
class _Liveness:
    last_seen_ms: int
    interval_ms: int | None


@dataclass(slots=True)
class _Threshold:
    value_time_ms: int = -(2**62)  # event time of the newest value seen
    breached_since_ms: int | None = None


@dataclass(slots=True)
class Evaluator:
    """The state of every rule for every source; feed it with :meth:`observe` and :meth:`tick`."""

    rules: tuple[Rule, ...]
    firing: dict[tuple[str, Subject], int] = field(default_factory=dict)  # -> since (ms)
    _alive: dict[Subject, _Liveness] = field(default_factory=dict)
    _thresholds: dict[tuple[str, Subject], _Threshold] = field(default_factory=dict)
    _rates: dict[tuple[str, Subject], collections.deque[int]] = field(default_factory=dict)
    # Absence deadlines as a heap, so a tick looks only at what is due, not at every source.
    # One entry per (rule, source): an event only moves ``_deadline_of`` on; the entry is
    # pushed again with the newer deadline when it comes due. So the heap holds about one entry
    # per source, not one per event (at 50k events/s that would be millions).
    _deadlines: list[tuple[int, str, Subject]] = field(default_factory=list)
    _deadline_of: dict[tuple[str, Subject], int] = field(default_factory=dict)
    _queued_at: dict[tuple[str, Subject], int] = field(default_factory=dict)  # its heap entry
    _pending: set[tuple[str, Subject]] = field(default_factory=set)  # thresholds breached
    # Per event type, the rules that can react to it, in rule order (observe runs per event).
    _for_type: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    _watches: dict[tuple[str, Subject], bool] = field(default_factory=dict)  # selector results
    # The first clock this evaluator saw: what came before is not in its rate windows, so a
    # window younger than that cannot tell that a rate dropped (a rebuilt evaluator would
    # otherwise call a burst that goes on "over" at its next event).
    _watching_since_ms: int | None = None
    _named: dict[str, Rule] = field(init=False)  # the rules by name, built once

    def __post_init__(self) -> None:
        self._named = {rule.name: rule for rule in self.rules}

    def observe(self, obs: Observation, now_ms: int) -> list[Transition]:
        """Account for one event; return what started or stopped firing."""
        subject = (obs.gateway, obs.device)
        out: list[Transition] = []
        live = self._alive.get(subject)
        if live is None:
            live = self._alive[subject] = _Liveness(obs.received_ms, None)
        elif obs.received_ms > live.last_seen_ms:
            live.last_seen_ms = obs.received_ms
        if obs.type == "heartbeat" and isinstance(obs.data.get("interval_s"), int | float):
            live.interval_ms = int(obs.data["interval_s"] * 1000)
        for rule in self._rules_for(obs.type):
            if isinstance(rule, AbsenceRule):
                if (rule.name, subject) in self.firing:
                    out += self._resolve(rule, subject, now_ms, "heard from again")
                self._schedule(rule, subject, live)
            elif isinstance(rule, ThresholdRule):
                if rule.field in obs.data and self._watched(rule, subject):
                    out += self._observe_threshold(rule, subject, obs, now_ms)
            elif isinstance(rule, RateRule):
                if self._watched(rule, subject):
                    window = self._rates.setdefault((rule.name, subject), collections.deque())
                    window.append(obs.time_ms)
                    out += self._judge_rate(rule, subject, window, now_ms)
            elif self._watched(rule, subject):
                out += self._observe_event(rule, subject, obs, now_ms)
        return out

    def heard_from(self, gateway: str, device: str, *, last_seen_ms: int,
                   interval_s: float | None) -> None:
        """Take over what a restarted hub knows of a source: when it was last heard from and
        its heartbeat interval, for the absence rules. Not an event: no rate window, threshold
        or event rule counts it (its last event may be evaluated again from the log)."""
        subject = (gateway, device)
        live = self._alive.get(subject)
        if live is None:
            live = self._alive[subject] = _Liveness(last_seen_ms, None)
        elif last_seen_ms > live.last_seen_ms:
            live.last_seen_ms = last_seen_ms
        if interval_s:
            live.interval_ms = int(interval_s * 1000)
        for rule in self.rules:
            if isinstance(rule, AbsenceRule):
                self._schedule(rule, subject, live)

    def _rules_for(self, event_type: str) -> tuple[Rule, ...]:
        """The rules an event of this type can concern: absences and thresholds always, rate
        and event rules only for their own type."""
        rules = self._for_type.get(event_type)
        if rules is None:
            rules = tuple(rule for rule in self.rules
                          if isinstance(rule, AbsenceRule | ThresholdRule)
                          or rule.type == event_type)
            self._for_type[event_type] = rules
        return rules

    def _watched(self, rule: Rule, subject: Subject) -> bool:
        """Whether the rule's selector takes this source (remembered: patterns do not change)."""
        key = (rule.name, subject)
        watched = self._watches.get(key)
        if watched is None:
            watched = self._watches[key] = rule.select.matches(*subject)
        return watched

    def restore_firing(self, rule: str, subject: Subject, since_ms: int) -> None:
        """Take over a change recorded before this evaluator existed (a restart, a rebuild):
        it fires, and a rate rule's window is watched so it can clear when the rate drops."""
        self.firing[(rule, subject)] = since_ms
        if isinstance(self._named.get(rule), RateRule):
            self._rates.setdefault((rule, subject), collections.deque())

    def forget_firing(self, rule: str, *, keep: Collection[Subject]) -> int:
        """Forget that ``rule`` fires for the sources not in ``keep``: changes never recorded
        (the rule was disabled). Each fires again when its condition is next judged: a
        threshold at its next value, a rate at the next tick, an absence at the next tick (its
        deadline is set again from when the source was last heard from); how many."""
        named = self._named.get(rule)
        gone = [subject for (name, subject) in self.firing
                if name == rule and subject not in keep]
        for subject in gone:
            del self.firing[(rule, subject)]
            live = self._alive.get(subject)
            if isinstance(named, AbsenceRule) and live is not None:
                self._schedule(named, subject, live)
            elif isinstance(named, ThresholdRule) and (rule, subject) in self._thresholds:
                self._pending.add((rule, subject))  # still breached: fires at the next tick
        return len(gone)

    def tick(self, now_ms: int) -> list[Transition]:
        """Let time pass: absences, threshold ``for`` windows and rate windows move on."""
        if self._watching_since_ms is None:
            self._watching_since_ms = now_ms
        out: list[Transition] = []
        rules = self._named
        while self._deadlines and self._deadlines[0][0] < now_ms:
            queued, name, subject = heapq.heappop(self._deadlines)
            key = (name, subject)
            if self._queued_at.get(key) != queued:
                continue  # superseded by an earlier entry (the deadline was brought forward)
            del self._queued_at[key]
            deadline = self._deadline_of.get(key)
            if deadline is None:
                continue
            if deadline > queued:  # heard from since: wait for the newer deadline
                self._queued_at[key] = deadline
                heapq.heappush(self._deadlines, (deadline, name, subject))
                continue
            del self._deadline_of[key]
            rule = rules[name]
            assert isinstance(rule, AbsenceRule)
            out += self._judge_absence(rule, subject, self._alive[subject], now_ms)
        for name, subject in list(self._pending):
            rule = rules[name]
            assert isinstance(rule, ThresholdRule)
            out += self._judge_threshold(rule, subject, self._thresholds[(name, subject)], now_ms)
        for (name, subject), window in self._rates.items():
            rule = rules[name]
            if window or (name, subject) in self.firing:
                assert isinstance(rule, RateRule)
                out += self._judge_rate(rule, subject, window, now_ms)
        return out

    def _schedule(self, rule: AbsenceRule, subject: Subject, live: _Liveness) -> None:
        """(Re)set when this source's silence becomes an absence for ``rule``."""
        if not self._watched(rule, subject) or (rule.only_gateways and subject[0] != subject[1]):
            return
        allowed = rule.after if rule.after is not None else (
            int(live.interval_ms * rule.grace) if live.interval_ms else None)
        if allowed is None:
            return
        key = (rule.name, subject)
        deadline = live.last_seen_ms + allowed
        self._deadline_of[key] = deadline
        queued = self._queued_at.get(key)
        if queued is None or deadline < queued:  # none yet, or brought forward (shorter interval)
            self._queued_at[key] = deadline
            heapq.heappush(self._deadlines, (deadline, rule.name, subject))

    # -- kinds --------------------------------------------------------------------------------

    def _judge_absence(self, rule: AbsenceRule, subject: Subject, live: _Liveness,
                       now_ms: int) -> list[Transition]:
        if not rule.select.matches(*subject) or (rule.only_gateways and subject[0] != subject[1]):
            return []
        allowed = rule.after if rule.after is not None else (
            int(live.interval_ms * rule.grace) if live.interval_ms else None)
        if allowed is None or now_ms - live.last_seen_ms <= allowed:
            return []
        silent_s = (now_ms - live.last_seen_ms) // 1000
        return self._fire(rule, subject, now_ms, f"nothing heard for {silent_s}s "
                                                 f"(allowed {allowed // 1000}s)")

    def _observe_threshold(self, rule: ThresholdRule, subject: Subject, obs: Observation,
                           now_ms: int) -> list[Transition]:
        if rule.field not in obs.data:
            return []
        key = (rule.name, subject)
        state = self._thresholds.get(key)
        if state is None:
            state = self._thresholds[key] = _Threshold()
        if obs.time_ms < state.value_time_ms:
            return []  # an older reading than one already seen: neither fires nor resolves
        state.value_time_ms = obs.time_ms
        value = obs.data[rule.field]
        try:
            breached = _OPS[rule.op](value, rule.value)
        except TypeError:
            breached = False  # a value of another type cannot breach a numeric limit
        if not breached:  # the common case: say nothing unless it was firing
            state.breached_since_ms = None
            self._pending.discard(key)
            if key not in self.firing:
                return []
            return self._resolve(rule, subject, now_ms, f"{rule.field} is {value!r} again")
        if state.breached_since_ms is None:
            state.breached_since_ms = obs.time_ms
            self._pending.add((rule.name, subject))
        return self._judge_threshold(rule, subject, state, now_ms, value)

    def _judge_threshold(self, rule: ThresholdRule, subject: Subject, state: _Threshold,
                         now_ms: int, value: object = None) -> list[Transition]:
        since = state.breached_since_ms
        if since is None or now_ms - since < rule.for_:
            return []
        self._pending.discard((rule.name, subject))  # firing now; no more ticks needed
        shown = "" if value is None else f" (now {value!r})"
        return self._fire(rule, subject, now_ms,
                          f"{rule.field} {rule.op} {rule.value!r}{shown} for "
                          f"{(now_ms - since) // 1000}s")

    def _judge_rate(self, rule: RateRule, subject: Subject, window: collections.deque[int],
                    now_ms: int) -> list[Transition]:
        while window and window[0] <= now_ms - rule.within:
            window.popleft()
        if len(window) > rule.more_than:
            return self._fire(rule, subject, now_ms, f"{len(window)} {rule.type} events in "
                                                     f"{rule.within // 1000}s")
        if self._watching_since_ms is None:
            self._watching_since_ms = now_ms
        if now_ms - self._watching_since_ms < rule.within:
            return []  # part of this window came before this evaluator: too soon to say
        return self._resolve(rule, subject, now_ms, f"{len(window)} {rule.type} events in "
                                                    f"{rule.within // 1000}s")

    def _observe_event(self, rule: EventRule, subject: Subject, obs: Observation,
                       now_ms: int) -> list[Transition]:
        if obs.type != rule.type:
            return []
        if obs.type == "alert" and obs.data.get("state") == "cleared":
            return self._resolve(rule, subject, now_ms, "cleared at the device")
        if any(obs.data.get(key) != value for key, value in rule.where.items()):
            return []
        late = now_ms - obs.time_ms
        detail = f"{obs.type} {dict(obs.data)}"
        if late > 60_000:
            detail += f" (happened {late // 1000}s ago, delivered late)"
        self.firing.pop((rule.name, subject), None)  # every alarm is news, even a repeat
        return self._fire(rule, subject, now_ms, detail)

    # -- transitions --------------------------------------------------------------------------

    def _fire(self, rule: Rule, subject: Subject, now_ms: int, detail: str) -> list[Transition]:
        key = (rule.name, subject)
        if key in self.firing:
            return []
        self.firing[key] = now_ms
        return [Transition(rule.name, *subject, "firing", now_ms, rule.severity, detail)]

    def _resolve(self, rule: Rule, subject: Subject, now_ms: int,
                 detail: str) -> list[Transition]:
        if self.firing.pop((rule.name, subject), None) is None:
            return []
        return [Transition(rule.name, *subject, "resolved", now_ms, rule.severity, detail)]

    def active(self) -> Iterable[tuple[str, Subject, int]]:
        """What is firing now: (rule, subject, since)."""
        return ((name, subject, since) for (name, subject), since in self.firing.items())
