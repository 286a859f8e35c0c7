"""Cursors: a consumer's saved position; SinkQueue: lines kept for a sink until it confirms."""

from __future__ import annotations

from tests.hub.store.conftest import Adapter, Store


def test_it_saves_a_consumers_position(adapter: Adapter) -> None:
    store = adapter.open()
    assert store.cursor("influx-events") == 0
    assert store.cursor("influx-events", missing=-1) == -1
    store.set_cursor("influx-events", 42)
    store.set_cursor("influx-events", 7)  # a reset goes back
    store.set_cursor("alerts", 3)
    reopened = adapter.open()
    assert (reopened.cursor("influx-events", missing=-1), reopened.cursor("alerts")) == (7, 3)


def test_it_keeps_lines_for_a_sink_oldest_first(store: Store) -> None:
    assert store.queue_lines("influx", ["a", "b"], max_rows=10) == 0
    store.queue_lines("influx", ["c"], max_rows=10)
    store.queue_lines("other", ["x"], max_rows=10)
    queued = store.queued_lines("influx")
    assert [line for _, line in queued] == ["a", "b", "c"]
    assert [pos for pos, _ in queued] == sorted(pos for pos, _ in queued)
    assert [line for _, line in store.queued_lines("influx", limit=2)] == ["a", "b"]
    assert [line for _, line in store.queued_lines("other")] == ["x"]


def test_it_drops_the_oldest_lines_beyond_the_bound_and_says_how_many(store: Store) -> None:
    store.queue_lines("influx", ["a", "b", "c"], max_rows=5)
    assert store.queue_lines("influx", ["d", "e", "f", "g"], max_rows=5) == 2
    assert [line for _, line in store.queued_lines("influx")] == ["c", "d", "e", "f", "g"]


def test_it_forgets_lines_a_sink_confirmed(adapter: Adapter) -> None:
    store = adapter.open()
    store.queue_lines("influx", ["a", "b", "c"], max_rows=10)
    store.queue_lines("other", ["x"], max_rows=10)
    second = store.queued_lines("influx")[1][0]
    store.forget_lines("influx", up_to_pos=second)
    reopened = adapter.open()
    assert [line for _, line in reopened.queued_lines("influx")] == ["c"]
    assert [line for _, line in reopened.queued_lines("other")] == ["x"]
    reopened.queue_lines("influx", ["d"], max_rows=10)
    assert reopened.queued_lines("influx")[-1][0] > second  # positions only grow
