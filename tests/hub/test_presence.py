"""Presence and state words, as pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from careflow.hub.fleet.presence import PresenceRecord, State, device_state, supersedes


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


def booted(state: str, conn: int, boot: str) -> PresenceRecord:
    return PresenceRecord("gw-1", state, conn, boot, 0)


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.sampled_from(["online", "offline"]),
       st.sampled_from(["online", "offline"]))
def test_it_takes_a_boot_it_has_never_seen_whatever_its_counter(
    remembered: int, restarted: int, old_state: str, new_state: str
) -> None:
    """A reflashed gateway counts connections from 1 again while the hub remembers more."""
    assert supersedes(new_state, restarted, booted(old_state, remembered, "boot-a"),
                      boot="boot-b", boot_seen=False)


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.sampled_from(["online", "offline"]))
def test_it_never_lets_an_earlier_boots_message_override_the_current_boot(
    current: int, stale: int, new_state: str
) -> None:
    """The Will of the boot before a restart or reflash, delivered late, whatever its counter."""
    assert not supersedes(new_state, stale, booted("online", current, "boot-b"),
                          boot="boot-a", boot_seen=True)


@given(st.integers(1, 100), st.integers(1, 100))
def test_it_compares_counters_within_one_boot_as_before(live: int, stale: int) -> None:
    old = booted("online", live, "boot-a")
    assert supersedes("offline", stale, old, boot="boot-a") == supersedes("offline", stale, old)
    assert supersedes("online", stale, old, boot="boot-a") == supersedes("online", stale, old)
