"""Presence and state words, as pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.presence import PresenceRecord, State, device_state, supersedes


def record(state: str, conn: int) -> PresenceRecord:
    return PresenceRecord("gw-1", state, conn, "boot", 0)


@given(st.integers(1, 100), st.integers(1, 100))
def test_it_never_lets_an_earlier_connections_will_mark_a_live_gateway_offline(
    live: int, stale: int
) -> None:
    if stale < live:
        assert not supersedes("offline", stale, record("online", live))


def test_it_takes_the_will_of_the_current_connection_and_any_newer_connection() -> None:
    assert supersedes("offline", 4, record("online", 4))
    assert supersedes("online", 5, record("offline", 4))
    assert supersedes("online", 1, None)
    assert not supersedes("online", 4, record("offline", 4))  # a replayed retained online


def test_it_words_states_like_healthchecks() -> None:
    now = 1_000_000
    assert device_state(now_ms=now, last_seen_ms=None, interval_s=60)[0] is State.NEW
    assert device_state(now_ms=now, last_seen_ms=now - 60_000, interval_s=60)[0] is State.ONLINE
    assert device_state(now_ms=now, last_seen_ms=now - 90_000, interval_s=60)[0] is State.LATE
    assert device_state(now_ms=now, last_seen_ms=now - 130_000, interval_s=60)[0] is State.OFFLINE
    assert device_state(now_ms=now, last_seen_ms=now, interval_s=60,
                        presence=record("offline", 3))[0] is State.OFFLINE
    assert device_state(now_ms=now, last_seen_ms=now - 999_000, interval_s=60,
                        paused=True)[0] is State.PAUSED
