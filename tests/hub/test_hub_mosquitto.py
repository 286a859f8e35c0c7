"""The hub against a real Mosquitto: exactly once, dead letters, spoofing, persistent session."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.app import RESEND_REQUESTS_PER_GATEWAY
from careflow.hub.store.records import EventFilter
from tests.conftest import Mosquitto, RunningHub, heartbeat, make_settings, wait_until
from tests.hub.conftest import fleet_events, publish, publish_raw

pytestmark = pytest.mark.broker

EXAMPLES = Path(__file__).parents[2] / "schemas" / "careflow" / "schemas" / "examples"


def test_it_stores_each_event_exactly_once_however_it_is_repeated(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    events = fleet_events(gateways=3, devices=4, per_device=25)  # 300 events
    publish(mosquitto, events)
    wait_until(lambda: hub.store.count(EventFilter()) == 300, what="300 events stored")

    shuffled = random.Random(7).sample(events, len(events))
    restamped = [{**e, "id": new_event_id()} for e in events[::3]]
    publish(mosquitto, shuffled)                 # the same events again, reordered
    publish(mosquitto, events, batch=True)        # again, in batches
    publish(mosquitto, restamped)                 # retried with a fresh id
    wait_until(lambda: hub.service.counters.duplicates == 300 + 300 + len(restamped),
               what="all repeats seen")
    assert hub.store.count(EventFilter()) == 300
    assert hub.store.dead_letter_count() == 0
    assert hub.store.total_gaps() == 0
    stored_ids = {ev.id for ev in hub.store.query(EventFilter(), limit=1000)}
    assert stored_ids == {e["id"] for e in events}


def test_it_dead_letters_every_invalid_example_and_keeps_consuming(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    reasons = json.loads((EXAMPLES / "invalid" / "reasons.json").read_text())
    source = Stamper(gateway="gw-ok", boot="b")
    items: list[tuple[str, bytes]] = []
    for name in sorted(reasons):
        items.append(("careflow/v1/gw-0001/gw-0001/heartbeat",
                      (EXAMPLES / "invalid" / f"{name}.json").read_bytes()))
        good = heartbeat(source)  # a valid event after each bad one must still be stored
        items.append(("careflow/v1/gw-ok/gw-ok/heartbeat", json.dumps(good).encode()))
    publish_raw(mosquitto, items)
    wait_until(lambda: hub.store.count(EventFilter(gateway="gw-ok")) == len(reasons),
               what="every valid event after a bad one")
    wait_until(lambda: hub.store.dead_letter_count() == len(reasons), what="dead letters")
    letters = hub.store.dead_letters(limit=100)
    assert all(letter.reason for letter in letters)
    codes = {letter.code for letter in letters}
    assert codes <= {"schema", "unsupported_version", "topic_mismatch"}
    assert hub.store.count(EventFilter(gateway="gw-0001")) == 0


def test_it_rejects_a_spoofed_topic_and_oversized_or_garbled_messages(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url, CAREFLOW_MAX_MESSAGE_BYTES="4096")
    victim = heartbeat(Stamper(gateway="gw-victim", boot="b"))
    publish_raw(mosquitto, [
        ("careflow/v1/gw-attacker/gw-attacker/heartbeat", json.dumps(victim).encode()),
        ("careflow/v1/gw-attacker/batch", json.dumps([victim]).encode()),
        ("careflow/v1/gw-1/batch", b"[" + b" " * 5000 + b"]"),
        ("careflow/v1/gw-1/gw-1/status", b"\xff\xfe\xfd"),
        ("careflow/v1/gw-1/gw-1/status", b""),
    ])
    wait_until(lambda: hub.store.dead_letter_count() == 5, what="five dead letters")
    codes = sorted(letter.code for letter in hub.store.dead_letters())
    assert codes == ["not_json", "not_utf8", "oversized", "topic_mismatch", "topic_mismatch"]
    assert hub.store.count(EventFilter()) == 0
    publish(mosquitto, [heartbeat(Stamper(gateway="gw-1", boot="b"))])
    wait_until(lambda: hub.store.count(EventFilter()) == 1, what="hub still consuming")


def test_it_receives_what_was_published_while_it_was_down(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    hub.stop()  # the broker keeps the hub's persistent session and queues for it
    events = fleet_events(gateways=1, devices=2, per_device=50)
    publish(mosquitto, events)
    hub = hub_factory(mosquitto.url)
    wait_until(lambda: hub.store.count(EventFilter()) == 100, what="queued events stored")
    assert hub.store.total_gaps() == 0


def test_it_reports_its_own_health(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    publish(mosquitto, fleet_events(1, 1, 10))
    publish_raw(mosquitto, [("careflow/v1/gw-1/gw-1/status", b"nope")])
    wait_until(lambda: (hub.store.read_health() or (0, {}))[1].get("events_stored") == 10
               and hub.store.read_health()[1].get("dead_lettered") == 1,  # type: ignore[index]
               what="health report")
    _, report = hub.store.read_health()  # type: ignore[misc]
    assert report["connected"] is True
    assert report["queue_depth"] == 0
    assert report["rejects_by_code"] == {"not_json": 1}


def test_it_records_retained_junk_once_however_often_it_resubscribes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Junk left retained on careflow topics comes back at every (re)subscribe of the hub; it is
    one dead letter each, not one more per restart (50 -> 100 -> 150 rows)."""
    junk = [(f"careflow/v1/gw-j/dev-{i}/heartbeat", f"not json {i}".encode()) for i in range(50)]
    url = parse_broker_url(mosquitto.url)
    client = make_client(client_id=f"junk-{new_event_id()}", clean_session=True, url=url)
    connect_blocking(client, url)
    for topic, payload in junk:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    source = Stamper(gateway="gw-j", device="marker", boot="b")
    for start in range(3):  # the hub's first subscribe, then two restarts
        hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url)).start()
        try:
            publish(mosquitto, [heartbeat(source)])  # behind the retained junk
            wait_until(lambda h=hub, n=start: h.store.count(EventFilter()) == n + 1,
                       what="the marker stored")
            wait_until(lambda h=hub: h.service.counters.messages >= 51, what="the junk again")
            assert hub.store.dead_letter_count() == 50
        finally:
            hub.stop()


def test_it_asks_a_gateway_with_many_gappy_sources_for_a_bounded_number_of_resends(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    events = [heartbeat(Stamper(gateway="gw-g", device=f"dev-{i}", boot="b", next_seq=2))
              for i in range(500)]  # each source misses its seq 1
    publish(mosquitto, events, batch=True)
    wait_until(lambda: hub.service.counters.events_stored == 500, what="500 events handled")
    requests = hub.service.counters.resend_requests
    assert 0 < requests <= 2 * (RESEND_REQUESTS_PER_GATEWAY + 1)  # two intervals at most
