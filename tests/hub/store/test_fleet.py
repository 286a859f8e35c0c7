"""Fleet: the registry folded from the log, gateway presence, and maintenance windows."""

from __future__ import annotations

from careflow.hub.store.records import EventFilter
from tests.conftest import heartbeat
from tests.hub.conftest import batch_of
from tests.hub.store.conftest import Adapter, Store, at, presence, source


def test_it_registers_each_source_with_its_counts_and_last_event(store: Store) -> None:
    door = source("gw-1", "door-1")
    store.append(batch_of([door.stamp("heartbeat", {"interval_s": 60}, at=at(0)),
                           door.stamp("status", {"state": "ok"}, at=at(1))], received_ms=5))
    record = store.device("gw-1", "door-1")
    assert record is not None
    assert (record.events, record.last_type, record.boot, record.seq, record.gaps) == (
        2, "status", "b1", 2, 0)
    assert record.first_seen_ms == record.last_seen_ms == 5
    assert record.last_time_ms == int(at(1).timestamp() * 1000)
    assert store.device("gw-1", "nobody") is None


def test_it_tracks_facts_newest_by_event_time(store: Store) -> None:
    door = source("gw-1", "door-1")
    newer = door.stamp("status", {"state": "ok", "battery_pct": 40, "firmware": "2.0"}, at=at(5))
    older = door.stamp("status", {"state": "fault", "battery_pct": 90}, at=at(0))
    store.append(batch_of([newer]))
    store.append(batch_of([older]))  # replayed late from the gateway's buffer
    record = store.device("gw-1", "door-1")
    assert record is not None
    assert record.facts == {"battery_pct": 40, "firmware": "2.0", "condition": "ok"}
    assert record.events == 2 and record.seq == 1  # seq 1 is the newer event's


def test_it_keeps_facts_that_later_commits_do_not_carry(store: Store) -> None:
    gateway, sensor = source("gw-1"), source("gw-1", "door-1")
    store.append(batch_of([gateway.stamp("status", {"state": "ok", "battery_pct": 40}),
                           heartbeat(sensor, firmware="1.0")]))
    store.append(batch_of([heartbeat(gateway), heartbeat(sensor, battery_pct=70)]))
    assert store.device("gw-1", "gw-1").facts == {  # type: ignore[union-attr]
        "condition": "ok", "battery_pct": 40, "interval_s": 60}
    assert store.device("gw-1", "door-1").facts == {  # type: ignore[union-attr]
        "interval_s": 60, "firmware": "1.0", "battery_pct": 70}


def test_it_lists_the_registry_by_gateway_then_device(store: Store) -> None:
    store.append(batch_of([heartbeat(source(g, d)) for g, d in
                           (("gw-2", "b"), ("gw-1", "z"), ("gw-2", "a"), ("gw-1", "gw-1"))]))
    assert [(d.gateway, d.device) for d in store.devices()] == [
        ("gw-1", "gw-1"), ("gw-1", "z"), ("gw-2", "a"), ("gw-2", "b")]
    assert [d.device for d in store.devices(gateway="gw-2")] == ["a", "b"]


def test_it_counts_sequence_gaps_and_fills_them_when_late_events_arrive(store: Store) -> None:
    gateway = source()
    events = [heartbeat(gateway) for _ in range(10)]
    result = store.append(batch_of(events[:3] + events[6:]))
    assert [(g.gateway, g.device, g.boot, g.missing) for g in result.gaps] == [
        ("gw-1", "gw-1", "b1", 3)]
    assert store.total_gaps() == 3 and store.device("gw-1", "gw-1").gaps == 3  # type: ignore[union-attr]
    assert store.append(batch_of(events[3:6])).gaps == ()
    assert store.total_gaps() == 0 and store.device("gw-1", "gw-1").gaps == 0  # type: ignore[union-attr]


def test_it_counts_gaps_per_boot(store: Store) -> None:
    first, second = source(boot="b1"), source(boot="b2", next_seq=3)
    store.append(batch_of([heartbeat(first), heartbeat(second)]))  # b2 misses 1 and 2
    assert store.total_gaps() == 2


def test_it_rebuilds_the_registry_from_the_log(store: Store) -> None:
    sources = [source("gw-1", f"s{i}") for i in range(3)]
    store.append(batch_of([heartbeat(sources[i % 3], battery_pct=i) for i in range(30)]))
    before = store.devices()
    up_to = store.reset_registry()
    assert up_to == store.last_pos() and store.devices() == [] and store.total_gaps() == 0
    for chunk in store.iter_log(EventFilter(), up_to_pos=up_to, chunk=7):
        store.fold_registry(chunk)
    assert store.devices() == before


def test_it_takes_a_reflashed_gateway_back_online_and_ignores_its_old_boots_late_will(
        store: Store) -> None:
    store.append(presence("gw-1", "online", 57, "boot-a", 1))
    store.append(presence("gw-1", "offline", 57, "boot-a", 2, reason="will"))
    store.append(presence("gw-1", "online", 1, "boot-b", 3))     # reflashed: counts from 1
    assert (store.presence()["gw-1"].state, store.presence()["gw-1"].conn) == ("online", 1)
    store.append(presence("gw-1", "offline", 57, "boot-a", 4))   # boot-a's Will, replayed late
    store.append(presence("gw-1", "online", 2, "boot-b", 5))
    store.append(presence("gw-2", "online", 9, "boot-x", 1))     # reflashed before its Will
    store.append(presence("gw-2", "online", 1, "boot-y", 2))
    store.append(presence("gw-2", "offline", 9, "boot-x", 3))    # the Will arrives after
    assert {g: (p.state, p.conn, p.boot, p.changed_ms) for g, p in store.presence().items()} == {
        "gw-1": ("online", 2, "boot-b", 5), "gw-2": ("online", 1, "boot-y", 2)}
    changes = store.presence_changes()
    assert [(c.gateway, c.state, c.conn, c.reason) for c in changes] == [
        ("gw-1", "online", 57, None), ("gw-1", "offline", 57, "will"), ("gw-1", "online", 1, None),
        ("gw-1", "online", 2, None), ("gw-2", "online", 9, None), ("gw-2", "online", 1, None)]
    assert [c.pos for c in changes] == sorted(c.pos for c in changes)
    page = store.presence_changes(after_pos=changes[1].pos, limit=2)
    assert page == changes[2:4]


def test_it_logs_a_repeated_presence_once(store: Store) -> None:
    store.append(presence("gw-1", "online", 1, "b", 1))
    store.append(presence("gw-1", "online", 1, "b", 2))  # the same, delivered again
    assert len(store.presence_changes()) == 1


def test_it_pauses_and_resumes_gateways_and_devices(store: Store) -> None:
    store.pause("gw-1", None, until_ms=100, reason="moving house")
    store.pause("gw-2", "door-1", until_ms=50, reason="new battery")
    assert store.paused(10) == {("gw-1", "*"): (100, "moving house"),
                                ("gw-2", "door-1"): (50, "new battery")}
    assert store.paused(50) == {("gw-1", "*"): (100, "moving house")}  # until is exclusive
    store.pause("gw-1", None, until_ms=200, reason="longer")  # replaces the window
    assert store.paused(10)[("gw-1", "*")] == (200, "longer")
    assert store.resume("gw-1", None) is True
    assert store.resume("gw-1", None) is False
    assert store.resume("gw-2", None) is False  # a device's window is not the gateway's
    assert store.paused(10) == {("gw-2", "door-1"): (50, "new battery")}


def test_it_shows_presence_and_registry_to_another_connection(adapter: Adapter) -> None:
    writer, reader = adapter.open(), adapter.open()
    writer.append(presence("gw-1", "online", 1, "b", 1))
    writer.append(batch_of([heartbeat(source())]))
    writer.pause("gw-1", None, until_ms=100, reason="r")
    assert set(reader.presence()) == {"gw-1"}
    assert [d.device for d in reader.devices()] == ["gw-1"]
    assert reader.paused(0) == writer.paused(0)
