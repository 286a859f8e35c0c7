"""What the on-call web keeps: incident timelines, single-use links, users and sessions."""

from __future__ import annotations

import pytest

from careflow.core.errors import RefusedError
from careflow.hub.store.records import Role
from tests.hub.store.conftest import Adapter, Store, opener


def test_it_keeps_an_incidents_timeline_in_order_and_apart_from_others(store: Store) -> None:
    first, second = opener(store)("a"), opener(store)("b")
    ack = store.record_action(first, at_ms=10, action="acknowledge", by="oncall", via="link",
                              detail="link 3f2a")
    store.record_action(second, at_ms=11, action="resolve", by="ana", via="console")
    resolve = store.record_action(first, at_ms=12, action="resolve", by="ana", via="cli")
    assert store.incident_actions(first) == [ack, resolve]
    assert (ack.incident_id, ack.at_ms, ack.action, ack.by, ack.via, ack.detail) == (
        first, 10, "acknowledge", "oncall", "link", "link 3f2a")
    assert store.incident_actions(first, limit=1) == [ack]
    assert store.incident_actions(9999) == []


def test_it_lists_the_messages_queued_about_one_incident_oldest_first(store: Store) -> None:
    first = opener(store)("a", notify=[("oncall", "fired a", "b"), ("ops", "fired a", "b")])
    opener(store)("b", notify=[("oncall", "fired b", "b")])
    notes = store.incident_notifications(first)
    assert [(n.incident_id, n.channel, n.title) for n in notes] == [
        (first, "oncall", "fired a"), (first, "ops", "fired a")]
    assert notes[0].id < notes[1].id
    assert store.incident_notifications(first, limit=1) == notes[:1]
    assert store.incident_notifications(9999) == []


def test_it_spends_a_link_once_across_connections(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    assert store.link_spent("l1") is None
    assert store.spend_link("l1", incident_id=1, action="acknowledge", channel="oncall", at_ms=5)
    assert not other.spend_link("l1", incident_id=1, action="acknowledge", channel="oncall",
                                at_ms=6)
    assert other.link_spent("l1") == 5
    assert other.spend_link("l2", incident_id=1, action="resolve", channel="oncall", at_ms=7)


def test_a_spent_link_is_unspent_when_its_unit_of_work_fails(store: Store) -> None:
    def use() -> None:
        with store.atomically("use a link"):
            store.spend_link("l1", incident_id=1, action="acknowledge", channel="ops", at_ms=5)
            raise RefusedError("the incident was resolved meanwhile")

    with pytest.raises(RefusedError):
        use()
    assert store.link_spent("l1") is None


def test_it_adds_lists_replaces_and_removes_users(store: Store) -> None:
    ana = store.add_user("ana", role="operator", password_hash="$argon2id$a", at_ms=1)
    store.add_user("bo", role=Role.VIEWER, password_hash="$argon2id$b", at_ms=2)
    assert (ana.name, ana.role, ana.password_hash, ana.created_ms) == (
        "ana", Role.OPERATOR, "$argon2id$a", 1)
    assert [u.name for u in store.users()] == ["ana", "bo"]
    with pytest.raises(RefusedError, match="--replace"):
        store.add_user("ana", role="viewer", password_hash="$argon2id$c", at_ms=3)
    assert store.user("ana") == ana
    replaced = store.add_user("ana", role="viewer", password_hash="$argon2id$c", at_ms=3,
                              replace=True)
    assert (replaced.role, replaced.password_hash, replaced.created_ms) == (
        Role.VIEWER, "$argon2id$c", 1)
    assert store.remove_user("bo")
    assert not store.remove_user("bo")
    assert store.user("bo") is None
    with pytest.raises(ValueError, match="admin"):
        store.add_user("cy", role="admin", password_hash="$argon2id$d", at_ms=4)


def test_a_session_lives_until_it_expires_its_user_goes_or_it_ends(store: Store) -> None:
    store.add_user("ana", role="operator", password_hash="h", at_ms=1)
    store.start_session("t1", user="ana", csrf="c1", at_ms=10, expires_ms=100)
    session = store.session("t1", now_ms=50)
    assert session is not None
    assert (session.user, session.role, session.csrf, session.created_ms,
            session.expires_ms) == ("ana", Role.OPERATOR, "c1", 10, 100)
    assert store.session("t1", now_ms=100) is None  # expired
    assert store.session("nope", now_ms=50) is None

    store.start_session("t2", user="ana", csrf="c2", at_ms=10, expires_ms=100)
    store.end_session("t2")
    assert store.session("t2", now_ms=50) is None

    store.start_session("t3", user="ana", csrf="c3", at_ms=10, expires_ms=100)
    store.add_user("ana", role="viewer", password_hash="h2", at_ms=20, replace=True)
    assert store.session("t3", now_ms=50) is None  # a new password ends old logins
    store.start_session("t4", user="ana", csrf="c4", at_ms=30, expires_ms=100)
    store.remove_user("ana")
    assert store.session("t4", now_ms=50) is None


def test_a_renewed_hash_keeps_the_sessions_and_only_replaces_the_hash_it_was_told(
        store: Store) -> None:
    store.add_user("ana", role="operator", password_hash="$argon2id$weak", at_ms=1)
    store.start_session("t1", user="ana", csrf="c1", at_ms=10, expires_ms=100)
    assert store.renew_password_hash("ana", old="$argon2id$weak", new="$argon2id$strong")
    renewed = store.user("ana")
    assert renewed is not None and renewed.password_hash == "$argon2id$strong"
    assert store.session("t1", now_ms=50) is not None  # the same password: still signed in
    # changed meanwhile (careflow users add --replace): the new password stands
    assert not store.renew_password_hash("ana", old="$argon2id$weak", new="$argon2id$x")
    assert not store.renew_password_hash("nobody", old="a", new="b")
    assert store.user("ana") == renewed
