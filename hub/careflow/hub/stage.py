"""What runs after a commit: one stage protocol for live ingest and for `careflow replay`.

Live, the hub's writer thread hands each commit, once it is durable and acknowledged, to its
stages in order: the alert rules (``AlertStage``), the InfluxDB sink (``InfluxSink``: it wakes
its drain) and provisioning (a gateway is active once its own heartbeat is stored).
`careflow replay` hands the stored log, chunk by chunk, to the stages it rebuilds: the device
registry, the rules' dry run, InfluxDB (``replay.ReplayTarget``). In the hub, "stage" means
this and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from careflow.hub.ingest.decode import PresenceUpdate
from careflow.hub.store.records import StoredEvent

__all__ = ["Committed", "Stage"]


@dataclass(frozen=True, slots=True)
class Committed:
    """What one commit stored, as the stages after it see it (in a replay: a chunk of the log,
    events only)."""

    events: Sequence[StoredEvent]
    data: Sequence[Mapping[str, Any]] | None = None  # each event's decoded data, when at hand
    conflicts: int = 0  # events dead-lettered as conflicts: their care alarms still act
    presence: Sequence[PresenceUpdate] = ()  # gateway presence the commit accepted


class Stage(Protocol):
    """Something that acts on what a commit stored, after the commit."""

    name: str

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Act on one commit (durable and acknowledged already), in commit order."""
        ...
