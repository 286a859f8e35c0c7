"""EventLog: every distinct event stored once, in arrival order; refusals kept with a reason."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.ingest.decode import decode_message
from careflow.hub.store.interface import CONFLICTS_CURSOR, MAX_DEAD_LETTER_PAYLOAD, OVER_BOUND_CURSOR
from careflow.hub.store.records import EventFilter, IncomingBatch
from tests.conftest import heartbeat
from tests.hub.conftest import BATCH_LIMIT, batch_of
from tests.hub.store.conftest import Adapter, Store, at, refused, source


def test_it_stores_each_event_once_and_skips_faithful_retries(store: Store) -> None:
    s1 = source(device="s-1")
    events = [heartbeat(s1) for _ in range(5)]
    first = store.append(batch_of(events))
    restamped = [{**e, "id": new_event_id()} for e in events[:3]]  # same position, same content
    again = store.append(batch_of(events + restamped))
    assert len(first.stored) == 5 and first.duplicates == 0
    assert (len(again.stored), again.duplicates, again.conflicts) == (0, 8, 0)
    assert store.count(EventFilter()) == 5


def test_it_returns_what_it_stored_with_its_data(store: Store) -> None:
    s1 = source(device="s-1")
    events = [heartbeat(s1, battery_pct=n) for n in range(3)]
    result = store.append(batch_of(events, received_ms=7))
    assert [ev.id for ev in result.stored] == [e["id"] for e in events]
    assert [dict(data) for data in result.data] == [e["data"] for e in events]
    assert all(ev.received_ms == 7 and ev.envelope == e for ev, e in zip(
        result.stored, events, strict=True))
    assert store.query(EventFilter(), newest_first=False) == list(result.stored)


def test_it_gives_positions_in_arrival_order_that_only_grow(store: Store) -> None:
    assert store.last_pos() == 0
    a, b = source(device="a"), source(device="b")
    first = store.append(batch_of([heartbeat(a) for _ in range(3)]))
    second = store.append(batch_of([heartbeat(b) for _ in range(2)]))
    positions = [ev.pos for ev in first.stored + second.stored]
    assert positions == sorted(positions) and len(set(positions)) == 5 and positions[0] > 0
    assert store.last_pos() == positions[-1]


def test_it_counts_the_events_after_a_position(store: Store) -> None:
    gateway = source()
    stored = store.append(batch_of([heartbeat(gateway) for _ in range(4)])).stored
    assert store.count_after(0) == 4
    assert store.count_after(stored[1].pos) == 2
    assert store.count_after(stored[-1].pos) == 0


def test_it_dead_letters_a_different_event_at_a_known_position(store: Store) -> None:
    event = heartbeat(source())
    first = store.append(batch_of([event]))
    impostor = {**event, "id": new_event_id(), "data": {"interval_s": 5}}
    result = store.append(batch_of([impostor]))
    assert (len(result.stored), result.conflicts, result.dead_lettered) == (0, 1, 1)
    (letter,) = store.dead_letters()
    assert letter.code == "conflict"
    assert json.loads(letter.payload)["id"] == impostor["id"]  # kept whole, to evaluate
    (after,) = store.dead_letters_after(0, code="conflict")
    assert after.log_pos == first.stored[-1].pos  # placed after the log as it was then


def test_it_places_a_conflict_after_the_events_of_its_own_commit(store: Store) -> None:
    known = heartbeat(source())
    store.append(batch_of([known]))
    impostor = {**known, "id": new_event_id(), "data": {"interval_s": 5}}
    result = store.append(batch_of([heartbeat(source(device="s-2")), impostor]))
    (letter,) = store.dead_letters_after(0, code="conflict")
    assert letter.log_pos == result.stored[-1].pos


def test_it_keeps_refusals_with_topic_reason_payload_and_arrival(store: Store) -> None:
    decoded = decode_message("careflow/v1/gw-1/gw-1/status", b"\x00garbage", max_bytes=BATCH_LIMIT)
    result = store.append(IncomingBatch([], [(r, 5) for r in decoded.rejected]))
    assert result.dead_lettered == 1
    (letter,) = store.dead_letters()
    assert (letter.topic, letter.code, letter.payload, letter.received_ms) == (
        "careflow/v1/gw-1/gw-1/status", "not_json", b"\x00garbage", 5)
    assert letter.log_pos is None
    assert store.dead_letter_count() == 1


def test_it_truncates_huge_refusals_but_records_their_size(store: Store) -> None:
    decoded = decode_message("careflow/v1/gw-1/batch", b"x" * 500_000, max_bytes=BATCH_LIMIT)
    store.append(IncomingBatch([], [(r, 5) for r in decoded.rejected]))
    (letter,) = store.dead_letters()
    assert letter.code == "oversized"
    assert letter.payload_size == 500_000 and len(letter.payload) == MAX_DEAD_LETTER_PAYLOAD


def test_it_lists_dead_letters_newest_first_and_by_code(store: Store) -> None:
    store.append(refused(3))
    store.append(refused(2, code="bad_topic"))
    newest = store.dead_letters(limit=10)
    assert [d.pos for d in newest] == sorted((d.pos for d in newest), reverse=True)
    assert [d.code for d in newest] == ["bad_topic"] * 2 + ["not_json"] * 3
    assert len(store.dead_letters(limit=2)) == 2
    assert {d.code for d in store.dead_letters(code="not_json")} == {"not_json"}
    after = store.dead_letters_after(newest[-1].pos, code="not_json", limit=10)
    assert [d.pos for d in after] == sorted(d.pos for d in newest[2:4])


def test_it_records_a_retained_refusal_already_kept_only_once(store: Store) -> None:
    store.append(refused(3))  # as first received, live
    for _ in range(3):  # delivered again at every subscribe of the hub
        assert store.append(refused(3, retained=True)).dead_lettered == 0
    assert store.dead_letter_count() == 3
    assert store.append(refused(4, retained=True)).dead_lettered == 1


def test_it_keeps_the_newest_dead_letters_within_the_row_bound(adapter: Adapter) -> None:
    store = adapter.open(dead_letter_max_rows=100)
    for _ in range(40):
        store.append(refused(7))
    assert store.dead_letter_count() == 100
    kept = store.dead_letters(limit=1000)
    assert {d.payload for d in kept} == {b"%08d" % i + b"x" * 10 for i in range(7)}


def test_it_keeps_the_newest_dead_letters_within_the_byte_bound(adapter: Adapter) -> None:
    store = adapter.open(dead_letter_max_bytes=16 * MAX_DEAD_LETTER_PAYLOAD)
    for _ in range(40):  # each refused payload is kept truncated to 64 KiB
        store.append(refused(1, size=200_000))
    assert store.dead_letter_count() == 16
    assert {letter.payload_size for letter in store.dead_letters()} == {200_008}


def test_it_never_gives_a_pruned_position_out_again(adapter: Adapter) -> None:
    """A consumer's cursor over dead letters must never find a new one behind it."""
    store = adapter.open(dead_letter_max_rows=10)
    seen = 0
    for _ in range(30):
        store.append(refused(3))
        newest = store.dead_letters(limit=1)[0].pos
        assert newest > seen
        seen = newest


def test_it_never_prunes_conflicts_the_alert_rules_have_yet_to_see(adapter: Adapter) -> None:
    store = adapter.open(dead_letter_max_rows=10)
    store.set_cursor(CONFLICTS_CURSOR, 0)  # the alert stage has evaluated nothing yet
    conflicts = store.append(refused(5, code="conflict"))
    assert conflicts.dead_lettered == 5
    store.append(refused(20))
    kept = store.dead_letters(limit=100, code="conflict")
    assert len(kept) == 5
    store.set_cursor(CONFLICTS_CURSOR, max(d.pos for d in kept))  # now it has
    store.append(refused(1))
    assert store.dead_letters(limit=100, code="conflict") == []
    assert store.dead_letter_count() == 10


def test_it_refuses_new_devices_beyond_the_gateways_bound(adapter: Adapter) -> None:
    store = adapter.open(max_devices_per_gateway=2)
    gateway = heartbeat(source("gw"))  # a gateway is a device of itself: never counted
    sensors = [heartbeat(source("gw", f"s{n}")) for n in range(3)]
    alarm = source("gw", "sos").stamp("alert", {"kind": "sos", "state": "raised"})
    result = store.append(batch_of([gateway, *sensors, alarm]))
    assert {(ev.device) for ev in result.stored} == {"gw", "s0", "s1"}
    assert {(o.device, o.alarm) for o in result.over_bound} == {("s2", False), ("sos", True)}
    assert result.dead_lettered == 2
    assert {d.code for d in store.dead_letters()} == {"too_many_devices"}
    placed = store.dead_letters_after(0, code="too_many_devices", placed_only=True)
    assert len(placed) == 1 and b"sos" in placed[0].payload  # the care alarm, to announce
    assert placed[0].log_pos == result.stored[-1].pos
    assert [d.device for d in store.devices(gateway="gw")] == ["gw", "s0", "s1"]
    again = store.append(batch_of([heartbeat(source("gw", "s0", next_seq=2)),
                                  heartbeat(source("gw", "s3"))]))
    assert [ev.device for ev in again.stored] == ["s0"]  # known devices still come in


def test_it_never_prunes_refused_care_alarms_the_hub_has_yet_to_announce(
        adapter: Adapter) -> None:
    store = adapter.open(dead_letter_max_rows=10, max_devices_per_gateway=0)
    store.set_cursor(OVER_BOUND_CURSOR, 0)  # the hub has announced nothing yet
    store.append(batch_of([source("gw", f"sos-{n}").stamp(
        "alert", {"kind": "sos", "state": "raised"}) for n in range(5)]))
    store.append(batch_of([heartbeat(source("gw", f"x{n}")) for n in range(30)]))
    kept = store.dead_letters(limit=100, code="too_many_devices")
    assert sorted(b"sos-" in letter.payload for letter in kept).count(True) == 5
    assert len(kept) < 20
    store.set_cursor(OVER_BOUND_CURSOR, max(letter.pos for letter in kept))  # announced
    store.append(batch_of([heartbeat(source("gw", f"y{n}")) for n in range(30)]))
    assert not [d for d in store.dead_letters(limit=100) if b"sos-" in d.payload]


def test_it_selects_events_by_source_type_and_event_time(store: Store) -> None:
    a, b = source("gw-1", "a"), source("gw-2", "a")
    store.append(batch_of([a.stamp("heartbeat", {"interval_s": 60}, at=at(0)),
                           a.stamp("status", {"state": "ok"}, at=at(10)),
                           b.stamp("heartbeat", {"interval_s": 60}, at=at(20))]))
    assert store.count(EventFilter(gateway="gw-2")) == 1
    assert store.count(EventFilter(gateway="gw-1", device="a", type="status")) == 1
    assert store.count(EventFilter(type="alert")) == 0
    since, until = int(at(10).timestamp() * 1000), int(at(20).timestamp() * 1000)
    (ev,) = store.query(EventFilter(since_ms=since, until_ms=until))  # [since, until)
    assert ev.type == "status" and ev.gateway == "gw-1" and ev.boot == "b1" and ev.seq == 2
    assert [e.type for e in store.query(EventFilter())] == ["heartbeat", "status", "heartbeat"][::-1]
    assert [e.time_ms for e in store.query(EventFilter(), newest_first=False, limit=2)] == [
        int(at(0).timestamp() * 1000), since]


def test_it_orders_queries_by_event_time_not_arrival(store: Store) -> None:
    late = source("gw-1", "a")
    early = late.stamp("heartbeat", {"interval_s": 60}, at=at(0))
    later = late.stamp("heartbeat", {"interval_s": 60}, at=at(5))
    store.append(batch_of([later]))
    store.append(batch_of([early]))  # replayed late from the gateway's buffer
    assert [e.id for e in store.query(EventFilter())] == [later["id"], early["id"]]
    log = [e.id for chunk in store.iter_log(EventFilter()) for e in chunk]
    assert log == [later["id"], early["id"]]  # the log is in arrival order


def test_it_walks_the_log_in_chunks_between_positions(store: Store) -> None:
    one, two = source("gw-1"), source("gw-2")
    stored = store.append(batch_of([heartbeat(one if n % 2 else two) for n in range(10)])).stored
    chunks = list(store.iter_log(EventFilter(), chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [e for c in chunks for e in c] == list(stored)
    middle = list(store.iter_log(EventFilter(gateway="gw-1"), after_pos=stored[2].pos,
                                 up_to_pos=stored[7].pos))
    assert [e for c in middle for e in c] == [
        e for e in stored[3:8] if e.gateway == "gw-1"] != []
    assert list(store.iter_log(EventFilter(), after_pos=stored[-1].pos)) == []


def test_it_keeps_what_was_committed_for_another_connection(adapter: Adapter) -> None:
    writer, reader = adapter.open(), adapter.open()
    gateway = source()
    events = [heartbeat(gateway) for _ in range(3)]
    writer.append(batch_of(events))
    writer.append(refused(2))
    assert [e.id for e in reader.query(EventFilter(), newest_first=False)] == [
        e["id"] for e in events]
    assert reader.dead_letter_count() == 2 and reader.last_pos() == writer.last_pos()


deliveries = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 8), st.booleans()),  # device, seq, re-stamp?
    min_size=1, max_size=40,
)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=deliveries, split=st.integers(1, 10))
def test_it_stores_every_distinct_event_exactly_once(adapter: Adapter, deliveries: list[Any],
                                                      split: int) -> None:
    """However events repeat, reorder, get re-stamped or split into batches: once each."""
    originals: dict[tuple[int, int], dict[str, Any]] = {}
    stream = []
    for device, seq, restamp in deliveries:
        key = (device, seq)
        if key not in originals:
            originals[key] = Stamper(gateway="gw", device=f"d{device}", boot="b",
                                     next_seq=seq).stamp("heartbeat", {"interval_s": 60})
        event = originals[key]
        stream.append({**event, "id": new_event_id()} if restamp else event)
    store = adapter.open(database=f"prop-{new_event_id()}")
    for start in range(0, len(stream), split):
        store.append(batch_of(stream[start:start + split]))
    assert store.count(EventFilter()) == len(originals)
    assert {(ev.device, ev.seq) for ev in store.query(EventFilter())} == {
        (f"d{d}", s) for d, s in originals}
    assert store.dead_letter_count() == 0
