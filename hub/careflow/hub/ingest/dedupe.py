"""The dedupe decision: is an event new, a harmless repeat, or a dangerous conflict?

An event is the same as a stored one when it has the same ``id`` or the same source position
(gateway, device, boot, seq) — the second catches a retry that was re-stamped with a new id.
A match whose content differs is a *conflict*, not a duplicate: dropping it silently could lose a
real event (say, a device that restarted without changing its boot id), so it is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

__all__ = ["Candidate", "SourceKey", "Verdict", "judge"]

SourceKey: TypeAlias = tuple[str, str, str, int]


class Verdict(StrEnum):
    """What to do with an incoming event."""

    FRESH = "fresh"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Candidate:
    """The parts of an event that identify it and that a faithful retry keeps unchanged."""

    id: str
    key: SourceKey
    type: str
    time: str
    data: Mapping[str, Any]

    def same_content(self, other: Candidate) -> bool:
        """True when ``other`` carries the same event (a retry may change only the id)."""
        return (self.type, self.time, self.data) == (other.type, other.time, other.data)


def judge(
    candidate: Candidate, by_id: Candidate | None, by_key: Candidate | None
) -> tuple[Verdict, str]:
    """Decide about ``candidate`` given the stored event with its id and the one at its key."""
    if by_id is None and by_key is None:
        return Verdict.FRESH, "new"
    if by_id is not None and by_id.key != candidate.key:
        return Verdict.CONFLICT, (
            f"id {candidate.id} was already used by {'/'.join(map(str, by_id.key))}; "
            "ids must be unique per event")
    known = by_id if by_id is not None else by_key
    assert known is not None
    if not candidate.same_content(known):
        return Verdict.CONFLICT, (
            f"position {'/'.join(map(str, candidate.key))} already holds a different event "
            f"({known.id}); a source must change its boot id when its seq restarts")
    return Verdict.DUPLICATE, "already stored"
