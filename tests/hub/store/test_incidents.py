"""Incidents: one unresolved per rule and source, changed by compare-and-set, each change
written with the notifications that announce it."""

from __future__ import annotations

import pytest

from careflow.core.errors import RefusedError
from careflow.hub.store.records import Incident
from tests.hub.store.conftest import OUT, Adapter, Store, opener


def _only(store: Store, incident_id: int) -> Incident:
    incident = store.incident(incident_id)
    assert incident is not None
    return incident


def test_it_opens_one_incident_per_rule_and_source_until_it_is_resolved(store: Store) -> None:
    open_ = opener(store)
    first = open_("r", "gw-1", "s-1", at_ms=1_000)
    assert store.open_incident(rule="r", gateway="gw-1", device="s-1", severity="warning",
                               summary="s", detail="d", at_ms=2_000) is None
    other = open_("r", "gw-1", "s-2")  # another source
    assert open_("q", "gw-1", "s-1") not in (first, other)  # another rule
    assert store.resolve_incidents(rule="r", gateway="gw-1", device="s-1", at_ms=3_000,
                                   by="careflow") == 1
    again = open_("r", "gw-1", "s-1", at_ms=4_000)
    assert again > first  # ids grow
    incident = _only(store, first)
    assert (incident.state, incident.resolved_ms, incident.resolved_by) == (
        "resolved", 3_000, "careflow")


def test_it_records_what_an_opened_incident_says(store: Store) -> None:
    incident_id = store.open_incident(rule="care-alarm", gateway="gw-1", device="sos-1",
                                      severity="critical", summary="SOS", detail="raised",
                                      at_ms=1_000, next_due_ms=5_000)
    assert incident_id is not None
    incident = _only(store, incident_id)
    assert (incident.rule, incident.gateway, incident.device, incident.severity, incident.state,
            incident.summary, incident.detail, incident.triggered_ms) == (
        "care-alarm", "gw-1", "sos-1", "critical", "open", "SOS", "raised", 1_000)
    assert (incident.acknowledged_ms, incident.acknowledged_by, incident.resolved_ms,
            incident.resolved_by) == (None, None, None, None)
    assert (incident.escalation_sent, incident.raises, incident.first_raised_ms,
            incident.last_raised_ms, incident.follows_id, incident.next_due_ms) == (
        0, 1, 1_000, 1_000, None, 5_000)
    assert store.incident(incident_id + 1000) is None


def test_it_writes_an_incidents_notifications_with_it(store: Store) -> None:
    open_ = opener(store)
    incident_id = open_(gateway="gw-7", at_ms=1_000, group_wait_ms=30_000,
                        notify=[OUT, ("ops", "t2", "b2")])
    notes = sorted(store.notifications(), key=lambda n: n.channel)
    assert [(n.incident_id, n.channel, n.kind, n.title, n.body, n.state, n.attempts,
             n.next_attempt_ms, n.created_ms, n.group_key, n.sent_ms, n.last_error)
            for n in notes] == [
        (incident_id, "oncall", "firing", "fired", "body", "pending", 0, 31_000, 1_000, "gw-7",
         None, None),
        (incident_id, "ops", "firing", "t2", "b2", "pending", 0, 31_000, 1_000, "gw-7",
         None, None)]


def test_it_writes_no_notification_for_an_incident_it_did_not_open(store: Store) -> None:
    opener(store)(notify=[OUT])
    assert store.open_incident(rule="r", gateway="gw-1", device="gw-1", severity="warning",
                               summary="s", detail="d", at_ms=2, notify=[OUT]) is None
    assert len(store.notifications()) == 1


def test_it_resolves_what_is_unresolved_with_its_notifications(store: Store) -> None:
    incident_id = opener(store)()
    assert store.resolve_incidents(rule="r", gateway="gw-1", device="gw-1", at_ms=9,
                                   by="careflow", notify=[OUT]) == 1
    (note,) = store.notifications()
    assert (note.incident_id, note.kind, note.next_attempt_ms, note.group_key) == (
        incident_id, "resolved", 9, "")
    assert store.resolve_incidents(rule="r", gateway="gw-1", device="gw-1", at_ms=10,
                                   by="careflow", notify=[OUT]) == 0
    assert len(store.notifications()) == 1


def test_it_finds_the_unresolved_incident_of_a_rule_and_source(store: Store) -> None:
    incident_id = opener(store)(device="s-1")
    found = store.unresolved_incident(rule="r", gateway="gw-1", device="s-1")
    assert found is not None and found.id == incident_id
    store.acknowledge_incident(incident_id, by="ana", at_ms=5)
    assert store.unresolved_incident(rule="r", gateway="gw-1", device="s-1") == _only(
        store, incident_id)
    store.resolve_incident(incident_id, by="ana", at_ms=6)
    assert store.unresolved_incident(rule="r", gateway="gw-1", device="s-1") is None


def test_it_acknowledges_only_an_open_incident(store: Store) -> None:
    incident_id = opener(store)()
    acknowledged = store.acknowledge_incident(incident_id, by="ana", at_ms=5)
    assert (acknowledged.state, acknowledged.acknowledged_ms, acknowledged.acknowledged_by) == (
        "acknowledged", 5, "ana")
    with pytest.raises(RefusedError, match="acknowledged"):
        store.acknowledge_incident(incident_id, by="bob", at_ms=6)
    with pytest.raises(RefusedError, match="no incident"):
        store.acknowledge_incident(incident_id + 1000, by="bob", at_ms=6)
    assert _only(store, incident_id).acknowledged_by == "ana"


def test_it_resolves_an_incident_by_hand_once(store: Store) -> None:
    incident_id = opener(store)()
    resolved = store.resolve_incident(incident_id, by="ana", at_ms=7)
    assert (resolved.state, resolved.resolved_ms, resolved.resolved_by) == ("resolved", 7, "ana")
    with pytest.raises(RefusedError, match="resolved"):
        store.resolve_incident(incident_id, by="bob", at_ms=8)
    with pytest.raises(RefusedError, match="no incident"):
        store.resolve_incident(incident_id + 1000, by="bob", at_ms=8)


def test_it_counts_a_new_raise_on_an_open_incident_only(store: Store) -> None:
    incident_id = opener(store)(gateway="gw-3", at_ms=1_000)
    assert store.raise_again(incident_id, at_ms=2_000, detail="again", notify=[OUT],
                             group_wait_ms=10)
    incident = _only(store, incident_id)
    assert (incident.raises, incident.first_raised_ms, incident.last_raised_ms,
            incident.detail, incident.triggered_ms) == (2, 1_000, 2_000, "again", 1_000)
    (note,) = store.notifications()
    assert (note.kind, note.group_key, note.next_attempt_ms) == ("firing", "gw-3", 2_010)
    store.acknowledge_incident(incident_id, by="ana", at_ms=3_000)
    assert not store.raise_again(incident_id, at_ms=4_000, detail="x", notify=[OUT])
    assert _only(store, incident_id).raises == 2 and len(store.notifications()) == 1


def test_it_follows_an_acknowledged_incident_raised_again_with_a_new_one(store: Store) -> None:
    old_id = opener(store)(gateway="gw-3", severity="critical", at_ms=1_000)
    store.raise_again(old_id, at_ms=2_000, detail="again")
    assert store.supersede_incident(old_id, at_ms=3_000, detail="x") is None  # still open
    store.acknowledge_incident(old_id, by="ana", at_ms=2_500)
    new_id = store.supersede_incident(old_id, at_ms=3_000, detail="third", notify=[OUT],
                                      group_wait_ms=5, next_due_ms=9_000)
    assert new_id is not None and new_id > old_id
    old, new = _only(store, old_id), _only(store, new_id)
    assert (old.state, old.resolved_ms) == ("resolved", 3_000)
    assert str(new_id) in (old.resolved_by or "")
    assert (new.state, new.rule, new.severity, new.follows_id, new.raises, new.first_raised_ms,
            new.last_raised_ms, new.triggered_ms, new.detail, new.next_due_ms) == (
        "open", old.rule, "critical", old_id, 3, 1_000, 3_000, 3_000, "third", 9_000)
    (note,) = store.notifications()  # the old one is resolved without a message
    assert (note.incident_id, note.kind, note.group_key, note.next_attempt_ms) == (
        new_id, "firing", "gw-3", 3_005)
    assert store.supersede_incident(old_id, at_ms=4_000, detail="x") is None


def test_it_sends_each_escalation_step_once(adapter: Adapter) -> None:
    store, other = adapter.open(), adapter.open()
    incident_id = opener(store)(at_ms=1_000)
    assert store.escalate_incident(incident_id, sent_before=0, at_ms=2_000, notify=[OUT],
                                   group_key="gw-1", next_due_ms=5_000)
    assert not other.escalate_incident(incident_id, sent_before=0, at_ms=2_000, notify=[OUT])
    incident = _only(store, incident_id)
    assert (incident.escalation_sent, incident.next_due_ms) == (1, 5_000)
    (note,) = store.notifications()
    assert (note.kind, note.group_key, note.next_attempt_ms) == ("escalation", "gw-1", 2_000)
    store.acknowledge_incident(incident_id, by="ana", at_ms=3_000)
    assert not store.escalate_incident(incident_id, sent_before=1, at_ms=4_000, notify=[OUT])


def test_it_finds_the_open_incidents_due_longest_due_first(store: Store) -> None:
    open_ = opener(store)
    late = open_(device="a", next_due_ms=300)
    early = open_(device="b", next_due_ms=100)
    never = open_(device="c", next_due_ms=None)
    acknowledged = open_(device="d", next_due_ms=50)
    store.acknowledge_incident(acknowledged, by="ana", at_ms=1)
    assert [i.id for i in store.due_incidents(now_ms=300, limit=10)] == [early, late]
    assert [i.id for i in store.due_incidents(now_ms=299, limit=10)] == [early]
    assert [i.id for i in store.due_incidents(now_ms=300, limit=1)] == [early]
    store.set_incident_due(early, next_due_ms=None)
    store.set_incident_due(acknowledged, next_due_ms=0)  # only an open one is rescheduled
    assert [i.id for i in store.due_incidents(now_ms=10_000, limit=10)] == [late]
    assert store.make_open_incidents_due() == 3  # due at their trigger: the walk recomputes
    assert [i.id for i in store.due_incidents(now_ms=1_000, limit=10)] == [late, early, never]


def test_it_lists_and_counts_incidents_newest_first_by_state(store: Store) -> None:
    open_ = opener(store)
    ids = [open_(device=f"s{n}") for n in range(4)]
    store.acknowledge_incident(ids[1], by="ana", at_ms=5)
    store.resolve_incident(ids[2], by="ana", at_ms=6)
    assert [i.id for i in store.incidents()] == ids[::-1]
    assert [i.id for i in store.incidents(limit=2)] == ids[:1:-1]
    assert [i.id for i in store.incidents(states=("open", "acknowledged"))] == [
        ids[3], ids[1], ids[0]]
    assert store.count_incidents() == 4
    assert store.count_incidents(states=("resolved",)) == 1
    assert store.count_incidents(states=("open",)) == 2
    assert store.incidents(states=("no-such-state",)) == []


def test_it_says_when_a_rule_fired_for_a_source(store: Store) -> None:
    open_ = opener(store)
    for at_ms in (1_000, 2_000, 3_000):
        open_("flappy", "gw-1", "s", at_ms=at_ms)
        store.resolve_incidents(rule="flappy", gateway="gw-1", device="s", at_ms=at_ms + 1,
                                by="careflow")
    open_("flappy", "gw-1", "other", at_ms=2_500)
    assert sorted(store.incident_triggers(rule="flappy", gateway="gw-1", device="s",
                                          since_ms=2_000)) == [2_000, 3_000]


def test_it_counts_incidents_by_severity_and_state(store: Store) -> None:
    open_ = opener(store)
    assert store.incident_counts() == {}
    open_(device="a", severity="critical")
    acked = open_(device="b", severity="critical")
    store.acknowledge_incident(acked, by="ana", at_ms=2_000)
    open_(device="c")
    gone = open_(device="d")
    store.resolve_incident(gone, by="ana", at_ms=2_000)
    assert store.incident_counts() == {("critical", "open"): 1, ("critical", "acknowledged"): 1,
                                       ("warning", "open"): 1, ("warning", "resolved"): 1}
    assert store.incident_counts(states=("open",)) == {("critical", "open"): 1,
                                                       ("warning", "open"): 1}


def test_it_lists_incidents_changed_since_a_moment(store: Store) -> None:
    open_ = opener(store)
    quiet = open_(device="a", at_ms=1_000)
    acked = open_(device="b", at_ms=1_000)
    new = open_(device="c", at_ms=5_000)
    store.acknowledge_incident(acked, by="ana", at_ms=6_000)
    assert [i.id for i in store.incidents_changed(since_ms=5_000)] == [acked, new]
    assert [i.id for i in store.incidents_changed(since_ms=0, after_id=quiet, limit=1)] == [acked]


def test_it_times_a_group_from_its_firing_messages(adapter: Adapter) -> None:
    store = adapter.open()
    assert store.group_timing(channel="oncall", group_key="gw-1") == (None, None)
    opener(store)(device="a", gateway="gw-1", at_ms=1_000, group_wait_ms=30_000, notify=[OUT])
    opener(store)(device="b", gateway="gw-1", at_ms=2_000, group_wait_ms=30_000, notify=[OUT])
    assert store.group_timing(channel="oncall", group_key="gw-1") == (None, 31_000)
    assert store.group_timing(channel="ops", group_key="gw-1") == (None, None)
    claimed = store.claim_notifications(now_ms=31_000, limit=10)
    for note in claimed:
        store.finish_notification(note.id, ok=True, now_ms=31_500, error=None, final=True)
    assert store.group_timing(channel="oncall", group_key="gw-1") == (31_500, None)


def test_it_gives_incident_states_as_words(store: Store) -> None:
    incident = _only(store, opener(store)())
    assert incident.state == "open" and f"{incident.state}" == "open"
