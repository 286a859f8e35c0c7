"""Replaying the event log through the stages after a commit (:mod:`careflow.hub.stage`).

``careflow replay`` hands the stored log, chunk by chunk in arrival order, to the stages it
rebuilds (its targets): the device registry, the alert rules (a dry run) and InfluxDB, through
the same ``after_commit`` live ingest calls after each commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from careflow.core.errors import ConfigError
from careflow.hub.alerting.evaluate import Evaluator, Observation
from careflow.hub.stage import Committed, Stage
from careflow.hub.store.interface import Store
from careflow.hub.store.records import EventFilter
from careflow.schemas import format_rfc3339

__all__ = ["STAGES", "RegistryStage", "ReplayReport", "ReplayTarget", "RulesDryRun", "replay"]


class ReplayTarget(Stage, Protocol):
    """A stage ``careflow replay`` can run again over the log (its ``--target``)."""

    needs_whole_log: bool

    def begin(self, store: Store) -> int | None:
        """Prepare; may return the last log position this replay must cover."""
        ...

    def summary(self) -> list[str]:
        """What the replay has to say about this target (nothing: [])."""
        ...


class RegistryStage:
    """Rebuilds the device registry (last seen, facts, sequence gaps) from the log."""

    name = "registry"
    needs_whole_log = True

    def __init__(self) -> None:
        self._store: Store | None = None

    def begin(self, store: Store) -> int | None:
        """Empty the registry; the rebuild covers the log up to this moment."""
        self._store = store
        return store.reset_registry()

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Fold a chunk into the registry."""
        assert self._store is not None
        self._store.fold_registry(commit.events)

    def summary(self) -> list[str]:
        """Nothing to add: the registry is what `careflow devices list` shows."""
        return []


class RulesDryRun:
    """Runs the alert rules over the log and reports what would have fired; changes nothing.

    The clock is the arrival time of each event, so absences between events show up too.
    """

    name = "rules"
    needs_whole_log = False

    def __init__(self) -> None:
        from careflow.hub.alerting.incidents import default_rules  # noqa: PLC0415 - avoids a cycle

        self.evaluator = Evaluator(default_rules().rules)
        self.lines: list[str] = []

    def begin(self, store: Store) -> int | None:
        """Nothing to prepare."""
        return None

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Advance the clock to each event, then show it to the rules."""
        for event in commit.events:
            transitions = self.evaluator.tick(event.received_ms)
            transitions += self.evaluator.observe(
                Observation(event.gateway, event.device, event.type, event.time_ms,
                            event.received_ms, event.data), event.received_ms)
            self.lines += [f"{format_rfc3339(datetime.fromtimestamp(t.at_ms / 1000, tz=UTC))}  "
                           f"{t.status:<8} {t.rule:<16} {t.gateway}/{t.device}  {t.detail}"
                           for t in transitions]

    def summary(self) -> list[str]:
        """What would have fired, in order."""
        return self.lines or ["no rule would have fired"]


def _influx() -> ReplayTarget:
    from careflow.hub.sinks.influx.sink import InfluxStage  # noqa: PLC0415 - only when asked for

    return InfluxStage()


STAGES: dict[str, Callable[[], ReplayTarget]] = {
    "registry": RegistryStage, "rules": RulesDryRun, "influx": _influx}
OPT_IN = frozenset({"influx"})  # run only when named: they need a server configured


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did, and what its stages have to say."""

    events: int
    stages: tuple[str, ...]
    notes: tuple[str, ...] = ()


def replay(
    store: Store,
    flt: EventFilter,
    stage_names: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Feed matching events, in log order, to the named stages."""
    filtered = any(value is not None for value in
                   (flt.gateway, flt.device, flt.type, flt.since_ms, flt.until_ms))
    if not stage_names:  # every stage that can take this range
        stage_names = [name for name, make in STAGES.items()
                       if name not in OPT_IN
                       and not (filtered and getattr(make, "needs_whole_log", False))]
    unknown = [name for name in stage_names if name not in STAGES]
    if unknown:
        msg = f"unknown replay target {', '.join(unknown)}; choose from {', '.join(STAGES)}"
        raise ConfigError(msg)
    stages = [STAGES[name]() for name in stage_names]
    for stage in stages:
        if stage.needs_whole_log and filtered:
            msg = (f"the {stage.name} target is rebuilt from the whole log; drop --since, "
                   "--until and the other filters to rebuild it")
            raise ConfigError(msg)
    limits = [stage.begin(store) for stage in stages]
    up_to = min((limit for limit in limits if limit is not None), default=None)
    total = 0
    for chunk in store.iter_log(flt, up_to_pos=up_to):
        commit = Committed(chunk)
        for stage in stages:
            stage.after_commit(commit, chunk[-1].received_ms)  # the log's own clock
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    notes = [line for stage in stages for line in stage.summary()]
    return ReplayReport(total, tuple(stage.name for stage in stages), tuple(notes))
