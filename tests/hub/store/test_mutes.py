"""Mutes: silences recorded, listed while active, ended early."""

from __future__ import annotations

from tests.hub.store.conftest import Adapter, Store


def _silence(store: Store, *, starts_ms: int = 100, ends_ms: int = 200, rule: str = "*") -> int:
    return store.add_silence(gateway="gw-*", device="*", rule=rule, starts_ms=starts_ms,
                             ends_ms=ends_ms, created_by="ana", comment="works").id


def test_it_records_a_silence_as_given(store: Store) -> None:
    silence = store.add_silence(gateway="gw-*", device="door-?", rule="battery-low",
                                starts_ms=100, ends_ms=200, created_by="ana", comment="new cells")
    assert (silence.gateway, silence.device, silence.rule, silence.starts_ms, silence.ends_ms,
            silence.created_by, silence.comment) == (
        "gw-*", "door-?", "battery-low", 100, 200, "ana", "new cells")
    assert store.silences() == [silence]


def test_it_lists_silences_newest_first_and_those_active_at_a_moment(store: Store) -> None:
    first = _silence(store, starts_ms=100, ends_ms=200)
    second = _silence(store, starts_ms=150, ends_ms=300)
    assert [s.id for s in store.silences()] == [second, first]
    assert [s.id for s in store.silences(active_at_ms=99)] == []
    assert [s.id for s in store.silences(active_at_ms=100)] == [first]  # starts inclusive
    assert [s.id for s in store.silences(active_at_ms=199)] == [second, first]
    assert [s.id for s in store.silences(active_at_ms=200)] == [second]  # ends exclusive


def test_it_ends_an_active_silence_early_once(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    silence_id = _silence(store, starts_ms=100, ends_ms=200)
    assert store.expire_silence(silence_id, now_ms=150)
    assert not other.expire_silence(silence_id, now_ms=160)  # already over
    assert not store.expire_silence(silence_id + 1000, now_ms=150)
    (silence,) = other.silences()
    assert silence.ends_ms == 150 and other.silences(active_at_ms=150) == []
