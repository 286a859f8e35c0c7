"""Outbox: notifications claimed once by compare-and-set, finished, retried or cancelled."""

from __future__ import annotations

import pytest

from careflow.core.errors import RefusedError
from careflow.hub.store.records import Notification
from tests.hub.store.conftest import Adapter, Store, opener


def _queue(store: Store, *, device: str = "gw-1", gateway: str = "gw-1", severity: str = "warning",
           channels: tuple[str, ...] = ("oncall",), at_ms: int = 1_000, wait_ms: int = 0) -> int:
    return opener(store)(device=device, gateway=gateway, severity=severity, at_ms=at_ms,
                         group_wait_ms=wait_ms, notify=[(c, f"t {device}", "b") for c in channels])


def _ids(notes: list[Notification]) -> list[int]:
    return [n.id for n in notes]


def test_it_claims_a_due_notification_once(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    _queue(store, at_ms=1_000, wait_ms=500)
    assert store.claim_notifications(now_ms=1_499, limit=10) == []  # not due yet
    (claimed,) = store.claim_notifications(now_ms=1_500, limit=10)
    assert (claimed.state, claimed.channel, claimed.attempts) == ("sending", "oncall", 0)
    assert other.claim_notifications(now_ms=9_999, limit=10) == []
    assert [n.state for n in store.notifications()] == ["sending"]


def test_it_claims_critical_notifications_first(store: Store) -> None:
    _queue(store, device="a", gateway="gw-a")  # three gateways: three groups
    _queue(store, device="b", gateway="gw-b", severity="critical")
    _queue(store, device="c", gateway="gw-c")
    (first,) = store.claim_notifications(now_ms=1_000, limit=1)
    assert first.title == "t b"
    assert [n.title for n in store.claim_notifications(now_ms=1_000, limit=5)] == ["t a", "t c"]


def test_it_claims_the_notifications_of_one_channel(store: Store) -> None:
    _queue(store, channels=("oncall", "ops"))
    (ops,) = store.claim_notifications(now_ms=1_000, limit=10, channel="ops")
    assert ops.channel == "ops"
    assert [n.channel for n in store.claim_notifications(now_ms=1_000, limit=10)] == ["oncall"]


def test_it_claims_the_rest_of_a_due_ones_group_with_it(store: Store) -> None:
    _queue(store, device="a", gateway="gw-1", at_ms=1_000, wait_ms=30_000)
    _queue(store, device="b", gateway="gw-1", at_ms=20_000, wait_ms=30_000)  # due at 50_000
    _queue(store, device="c", gateway="gw-2", at_ms=20_000, wait_ms=30_000)  # another group
    claimed = store.claim_notifications(now_ms=31_000, limit=1)
    assert sorted(n.title for n in claimed) == ["t a", "t b"]


def test_it_records_a_sent_notification(store: Store) -> None:
    _queue(store)
    (note,) = store.claim_notifications(now_ms=1_000, limit=10)
    store.finish_notification(note.id, ok=True, now_ms=1_200, error=None, final=True)
    (sent,) = store.notifications()
    assert (sent.state, sent.attempts, sent.sent_ms, sent.last_error) == ("sent", 1, 1_200, None)
    assert store.claim_notifications(now_ms=99_999, limit=10) == []


def test_it_retries_a_failed_notification_later(store: Store) -> None:
    _queue(store)
    (note,) = store.claim_notifications(now_ms=1_000, limit=10)
    store.finish_notification(note.id, ok=False, now_ms=1_100, error="HTTP 503", final=False,
                              retry_in_ms=2_000)
    (waiting,) = store.notifications()
    assert (waiting.state, waiting.attempts, waiting.last_error, waiting.next_attempt_ms,
            waiting.sent_ms) == ("pending", 1, "HTTP 503", 3_100, None)
    assert store.claim_notifications(now_ms=3_099, limit=10) == []
    (again,) = store.claim_notifications(now_ms=3_100, limit=10)
    store.finish_notification(again.id, ok=False, now_ms=3_200, error="HTTP 401", final=True,
                              attempts=10)
    (failed,) = store.notifications()
    assert (failed.state, failed.attempts, failed.last_error) == ("failed", 10, "HTTP 401")


def test_it_finishes_only_a_claimed_notification(store: Store) -> None:
    _queue(store)
    (note,) = store.notifications()
    store.finish_notification(note.id, ok=True, now_ms=5, error=None, final=True)  # not claimed
    assert store.notifications() == [note]


def test_it_cancels_a_claimed_notification_with_its_reason(store: Store) -> None:
    _queue(store)
    (note,) = store.notifications()
    assert not store.cancel_notification(note.id, now_ms=1_000, reason="acknowledged")
    store.claim_notifications(now_ms=1_000, limit=10)
    assert store.cancel_notification(note.id, now_ms=1_100, reason="acknowledged")
    (cancelled,) = store.notifications()
    assert (cancelled.state, cancelled.last_error) == ("cancelled", "acknowledged")
    assert not store.cancel_notification(note.id, now_ms=1_200, reason="again")


def test_it_releases_claimed_notifications_after_a_crash(adapter: Adapter) -> None:
    store = adapter.open()
    _queue(store, channels=("oncall", "ops"))
    store.claim_notifications(now_ms=1_000, limit=10)
    restarted = adapter.open()
    assert restarted.release_claimed_notifications("ops") == 1
    assert {(n.channel, n.state) for n in restarted.notifications()} == {
        ("oncall", "sending"), ("ops", "pending")}
    assert restarted.release_claimed_notifications() == 1
    assert {n.state for n in restarted.notifications()} == {"pending"}
    assert len(restarted.claim_notifications(now_ms=1_000, limit=10)) == 2


def test_it_counts_overdue_notifications_per_channel(store: Store) -> None:
    _queue(store, device="a", channels=("oncall", "ops"), at_ms=1_000)
    _queue(store, device="b", channels=("ops",), at_ms=5_000)
    assert store.overdue_notifications(due_before_ms=1_000) == {}
    assert store.overdue_notifications(due_before_ms=1_001) == {"oncall": 1, "ops": 1}
    assert store.overdue_notifications(due_before_ms=9_000) == {"oncall": 1, "ops": 2}
    store.claim_notifications(now_ms=9_000, limit=10, channel="ops")
    assert store.overdue_notifications(due_before_ms=9_000) == {"oncall": 1}


def test_it_names_the_channels_whose_latest_attempt_failed(store: Store) -> None:
    _queue(store, device="a", channels=("oncall", "ops"))
    _queue(store, device="b", channels=("oncall",))
    assert store.failing_channels() == {}
    for note in store.claim_notifications(now_ms=1_000, limit=10):
        store.finish_notification(note.id, ok=note.channel == "ops", now_ms=1_100,
                                  error=None if note.channel == "ops" else "HTTP 500",
                                  final=False, retry_in_ms=10)
    assert store.failing_channels() == {"oncall": "HTTP 500"}
    for note in store.claim_notifications(now_ms=2_000, limit=10):
        store.finish_notification(note.id, ok=True, now_ms=2_100, error=None, final=True)
    assert store.failing_channels() == {}


def test_it_lists_and_counts_notifications_by_state_and_attempts(store: Store) -> None:
    _queue(store, device="a", channels=("oncall", "ops"))
    _queue(store, device="b", severity="critical")
    notes = store.notifications()
    assert _ids(notes) == sorted(_ids(notes), reverse=True)
    assert len(store.notifications(limit=2)) == 2
    critical = notes[0]
    for note in store.claim_notifications(now_ms=1_000, limit=10):
        store.finish_notification(note.id, ok=False, now_ms=1_000, error="x", final=False,
                                  attempts=3 if note.id == critical.id else 1)
    store.claim_notifications(now_ms=1_000, limit=1, channel="ops")
    assert store.count_notifications() == 3
    assert store.count_notifications(states=("pending",)) == 2
    assert store.count_notifications(states=("pending", "sending")) == 3
    assert _ids(store.notifications(states=("sending",))) == [
        n.id for n in notes if n.channel == "ops"]
    assert store.count_notifications(states=("pending",), min_attempts=2) == 1
    assert store.count_notifications(min_attempts=2) == 1
    # those of critical incidents counted from their own bound
    assert store.count_notifications(states=("pending",), min_attempts=1,
                                     critical_min_attempts=4) == 1
    assert store.count_notifications(min_attempts=5, critical_min_attempts=3) == 1


def test_it_gives_notification_states_and_kinds_as_words(store: Store) -> None:
    _queue(store)
    (note,) = store.notifications()
    assert (note.state, note.kind) == ("pending", "firing")
    assert f"{note.state} {note.kind}" == "pending firing"


def test_it_queues_notifications_only_with_their_incident(store: Store) -> None:
    assert store.notifications() == [] and store.count_notifications() == 0
    _queue(store)
    assert store.count_notifications() == len(store.notifications()) == 1
    assert store.claim_notifications(now_ms=1_000, limit=0) == []


def test_it_counts_notifications_by_channel_and_state(store: Store) -> None:
    assert store.notification_counts() == {}
    _queue(store, device="a", channels=("oncall", "ops"))
    _queue(store, device="b", gateway="gw-2", channels=("oncall",))  # another group
    (first,) = store.claim_notifications(now_ms=1_000, limit=1, channel="oncall")
    store.finish_notification(first.id, ok=True, now_ms=1_100, error=None, final=True)
    assert store.notification_counts() == {("oncall", "sent"): 1, ("oncall", "pending"): 1,
                                           ("ops", "pending"): 1}


def test_it_queues_a_notification_of_no_incident(store: Store) -> None:
    note_id = store.queue_notification("ops", kind="digest", title="Status", body="all fine",
                                       at_ms=5_000)
    assert store.claim_notifications(now_ms=4_999, limit=10) == []
    (claimed,) = store.claim_notifications(now_ms=5_000, limit=10)
    assert (claimed.id, claimed.incident_id, claimed.channel, claimed.kind, claimed.title,
            claimed.body, claimed.created_ms, claimed.group_key) == (
        note_id, 0, "ops", "digest", "Status", "all fine", 5_000, "")
    store.finish_notification(note_id, ok=True, now_ms=5_100, error=None, final=True)
    assert [n.state for n in store.notifications()] == ["sent"]


def test_a_queued_notification_and_a_cursor_commit_together_or_not_at_all(
        adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()

    def queue(fail: bool) -> None:
        with store.atomically("send a digest"):
            store.queue_notification("ops", kind="digest", title="t", body="b", at_ms=1)
            store.set_cursor("digest:morning", 1)
            if fail:
                raise RefusedError("crash between the two")

    with pytest.raises(RefusedError):
        queue(fail=True)
    assert (other.notifications(), other.cursor("digest:morning")) == ([], 0)
    queue(fail=False)
    assert (len(other.notifications()), other.cursor("digest:morning")) == (1, 1)
