"""Replaying the event log through downstream stages.

A stage is anything that consumes stored events: the device registry today; alert rules and the
InfluxDB sink plug in here later. ``careflow replay`` drives them from the log in arrival order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from careflow.errors import ConfigError
from careflow.hub.store import EventFilter, EventStore, StoredEvent

__all__ = ["STAGES", "RegistryStage", "ReplayReport", "Stage", "replay"]


class Stage(Protocol):
    """A consumer of stored events that can be re-run from the log."""

    name: str
    needs_whole_log: bool

    def begin(self, store: EventStore) -> int | None:
        """Prepare; may return the last log position this replay must cover."""
        ...

    def handle(self, events: Sequence[StoredEvent]) -> None:
        """Consume one chunk of events in log order."""
        ...


class RegistryStage:
    """Rebuilds the device registry (last seen, facts, sequence gaps) from the log."""

    name = "registry"
    needs_whole_log = True

    def __init__(self) -> None:
        self._store: EventStore | None = None

    def begin(self, store: EventStore) -> int | None:
        """Empty the registry; the rebuild covers the log up to this moment."""
        self._store = store
        return store.reset_registry()

    def handle(self, events: Sequence[StoredEvent]) -> None:
        """Fold a chunk into the registry."""
        assert self._store is not None
        self._store.fold_registry(events)


STAGES: dict[str, Callable[[], Stage]] = {"registry": RegistryStage}


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did."""

    events: int
    stages: tuple[str, ...]


def replay(
    store: EventStore,
    flt: EventFilter,
    stage_names: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Feed matching events, in log order, to the named stages."""
    unknown = [name for name in stage_names if name not in STAGES]
    if unknown:
        msg = f"unknown replay target {', '.join(unknown)}; choose from {', '.join(STAGES)}"
        raise ConfigError(msg)
    stages = [STAGES[name]() for name in stage_names]
    filtered = any(value is not None for value in
                   (flt.gateway, flt.device, flt.type, flt.since_ms, flt.until_ms))
    for stage in stages:
        if stage.needs_whole_log and filtered:
            msg = (f"the {stage.name} target is rebuilt from the whole log; drop --since, "
                   "--until and the other filters to rebuild it")
            raise ConfigError(msg)
    limits = [stage.begin(store) for stage in stages]
    up_to = min((limit for limit in limits if limit is not None), default=None)
    total = 0
    for chunk in store.iter_log(flt, up_to_pos=up_to):
        for stage in stages:
            stage.handle(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return ReplayReport(total, tuple(stage.name for stage in stages))
