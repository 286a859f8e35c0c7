"""UnitOfWork: the writes inside one unit commit together, or none does."""

from __future__ import annotations

import pytest

from tests.hub.store.conftest import OUT, Adapter, Store, opener


class FailedMidwayError(Exception):
    """A failure in the middle of a unit of work."""


def _work(store: Store) -> int:
    incident_id = opener(store)(notify=[OUT])
    store.set_cursor("alerts", 5)
    store.escalate_incident(incident_id, sent_before=0, at_ms=2, notify=[OUT])
    return incident_id


def _fail_after_work(store: Store) -> None:
    with store.atomically("record a change"):
        _work(store)
        raise FailedMidwayError


def _fail_after_inner_unit(store: Store) -> None:
    with store.atomically("outer"):
        with store.atomically("inner"):
            store.set_cursor("alerts", 1)
        raise FailedMidwayError


def test_it_commits_a_unit_of_work_whole(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    with store.atomically("record a change"):
        incident_id = _work(store)
    assert other.incident(incident_id) is not None
    assert other.cursor("alerts") == 5 and len(other.notifications()) == 2


def test_it_rolls_back_every_write_of_a_failed_unit(adapter: Adapter) -> None:
    store = adapter.open()
    with pytest.raises(FailedMidwayError):
        _fail_after_work(store)
    for seen in (store, adapter.open()):
        assert seen.incidents() == [] and seen.notifications() == []
        assert seen.cursor("alerts", missing=-1) == -1
    assert opener(store)() > 0  # and the store works on


def test_it_joins_a_unit_of_work_opened_inside_another(store: Store) -> None:
    with pytest.raises(FailedMidwayError):
        _fail_after_inner_unit(store)
    assert store.cursor("alerts", missing=-1) == -1
