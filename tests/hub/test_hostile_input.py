"""Hostile input through the hub's real decode path: never raises, always accepted or refused.

The strategies live in tests/hostile.py. Here every generated message goes through the hub's
``decode_safely`` and through a real decode worker process, and through a real hub over a real
Mosquitto: no message may end a thread or a process, and each one ends stored or dead-lettered
with a reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.app import HubService
from careflow.hub.ingest.decode import Decoded
from careflow.hub.ingest.decode_worker import DecodeWorker, decode_safely
from careflow.hub.store.records import AppendResult, EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.schemas.limits import MAX_BATCH_EVENTS, MAX_DATA_DEPTH, MAX_MESSAGE_BYTES
from tests.conftest import Mosquitto, careflow_cmd, heartbeat, make_settings, wait_until
from tests.hostile import (
    HOSTILE_DEPTHS,
    batch_payloads,
    events,
    hostile_messages,
    json_depth,
    nested_json,
)
from tests.hub.conftest import publish_raw

LIMIT = MAX_MESSAGE_BYTES
HOSTILE = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_accounted_for(topic: str, payload: bytes, decoded: Decoded) -> None:
    """Accepted (within the contract's depth), a presence, or refused with a code and a reason."""
    for rejection in decoded.rejected:
        assert rejection.code and rejection.reason, rejection
        assert rejection.code != "internal_error", rejection.reason  # a bug, even if contained
    for accepted in decoded.accepted:
        assert json_depth(accepted.data) <= MAX_DATA_DEPTH
    cleared_presence = topic.endswith("/state") and not payload
    empty_batch = topic.endswith("/batch") and payload.strip(b" ,\n") in (b"[]", b"[ ]")
    assert decoded.accepted or decoded.rejected or decoded.presence or cleared_presence \
        or empty_batch


def deep_event(levels: int, stamper: Stamper) -> tuple[str, bytes]:
    """A valid heartbeat whose data nests ``levels`` deep (data itself is level 1)."""
    event = heartbeat(stamper)
    text = json.dumps({**event, "data": "__DATA__"}).replace(
        '"__DATA__"', '{"interval_s": 60, "x": ' + nested_json(levels - 1) + "}")
    return f"careflow/v1/{event['gateway']}/{event['device']}/heartbeat", text.encode()


@HOSTILE
@given(hostile_messages())
def test_it_accepts_or_refuses_every_hostile_message_with_a_reason(
        message: tuple[str, bytes]) -> None:
    topic, payload = message
    assert_accounted_for(topic, payload, decode_safely(topic, payload, max_bytes=LIMIT))


@HOSTILE
@given(batch_payloads())
def test_it_judges_each_item_of_a_hostile_batch_on_its_own(batch: tuple[list[str], bytes]
                                                           ) -> None:
    texts, payload = batch
    decoded = decode_safely("careflow/v1/gw-1/batch", payload, max_bytes=LIMIT)
    assert_accounted_for("careflow/v1/gw-1/batch", payload, decoded)
    if [r.index for r in decoded.rejected] == [None]:
        return  # refused as a whole (not an array of events)
    assert len(decoded.accepted) + len(decoded.rejected) == len(texts)
    refused = {r.index for r in decoded.rejected}
    assert len(refused) == len(decoded.rejected)
    for index, text in enumerate(texts):
        if index not in refused and text.startswith("{"):
            assert json_depth(json.loads(text)) <= MAX_DATA_DEPTH + 1


@pytest.mark.parametrize("levels", HOSTILE_DEPTHS)
@pytest.mark.parametrize("as_batch", [False, True], ids=["single", "batch"])
def test_it_refuses_data_deeper_than_the_contract_allows_as_too_deep(levels: int,
                                                                     as_batch: bool) -> None:
    topic, payload = deep_event(levels, Stamper(gateway="gw-1", device="s-1", boot="b"))
    honest = json.dumps(heartbeat(Stamper(gateway="gw-1", device="s-2", boot="b"))).encode()
    if as_batch:  # the deep event between two honest ones: only it is refused
        topic, payload = "careflow/v1/gw-1/batch", b"[" + honest + b"," + payload + b"," + \
            honest.replace(b'"seq": 1', b'"seq": 2') + b"]"
    decoded = decode_safely(topic, payload, max_bytes=10 * LIMIT)
    assert len(decoded.accepted) == (2 if as_batch else 0) + (levels <= MAX_DATA_DEPTH)
    if levels > MAX_DATA_DEPTH:
        (rejection,) = decoded.rejected
        assert rejection.code == "too_deep"
        assert f"at most {MAX_DATA_DEPTH} levels" in rejection.reason
        assert rejection.index == (1 if as_batch else None)
    else:
        assert decoded.rejected == ()


@pytest.fixture(scope="module")
def worker() -> Iterator[DecodeWorker]:
    decoder = DecodeWorker(max_bytes=LIMIT)
    decoder.start()
    yield decoder
    decoder.stop()


def comparable(decoded: Decoded) -> tuple[Any, ...]:
    return ([(tuple(a.event), a.body, a.topic, a.data, a.time_ms) for a in decoded.accepted],
            decoded.rejected, decoded.presence)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(hostile_messages(), min_size=1, max_size=4))
def test_the_decode_worker_survives_hostile_messages_and_decodes_as_in_process(
        worker: DecodeWorker, group: list[tuple[str, bytes]]) -> None:
    assert worker.submit(group)
    result = worker.result()
    assert result is not None, "the decode worker failed on hostile input"
    assert worker.alive
    assert [comparable(d) for d in result] == \
        [comparable(decode_safely(t, p, max_bytes=LIMIT)) for t, p in group]


@pytest.mark.parametrize("levels", [950, 980, 990, 1000])
def test_the_decode_worker_survives_a_batch_nesting_near_the_recursion_limit(
        worker: DecodeWorker, levels: int) -> None:
    _, deep = deep_event(levels, Stamper(gateway="gw-1", device="s-1", boot="b"))
    honest = json.dumps(heartbeat(Stamper(gateway="gw-1", device="s-2", boot="b"))).encode()
    assert worker.submit([("careflow/v1/gw-1/batch", b"[" + deep + b"," + honest + b"]")])
    result = worker.result()
    assert result is not None and worker.alive
    ((decoded),) = result
    assert [r.code for r in decoded.rejected] == ["too_deep"]
    assert len(decoded.accepted) == 1


class PoisonedStore(SqliteStore):
    """The real store, failing with a non-store error on one event: stands in for a bug, or
    input no check caught (the deep nesting that did this is now refused at decode, so no real
    input is known to reach it; a fake is the only way to keep this path proven)."""

    poison = ""

    def append(self, batch: IncomingBatch) -> AppendResult:
        if any(accepted.event.id == self.poison for accepted, _ in batch.accepted):
            raise RecursionError("maximum recursion depth exceeded (injected by the test)")
        return super().append(batch)


@pytest.mark.broker
@pytest.mark.parametrize("decode_worker", [False, True], ids=["in-process", "decode-worker"])
def test_a_message_that_breaks_the_commit_is_its_own_dead_letter_and_the_writer_goes_on(
        mosquitto: Mosquitto, tmp_path: Path, decode_worker: bool) -> None:
    settings_ = make_settings(tmp_path / "data", mosquitto.url)
    store = PoisonedStore(settings_.db_path, synchronous="normal")
    service = HubService(settings_, store, decode_worker=decode_worker)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: service.ingress.connected, what="hub connected")
        sources = [Stamper(gateway="gw-1", device=f"s-{i}", boot="b") for i in range(20)]
        group = [heartbeat(source) for source in sources]
        store.poison = group[7]["id"]
        padding = "x" * 2000  # big enough that the decode worker takes the group
        payloads = [json.dumps({**e, "data": {**e["data"], "note": padding}}).encode()
                    if decode_worker else json.dumps(e).encode() for e in group]
        publish_raw(mosquitto, [(f"careflow/v1/gw-1/{e['device']}/heartbeat", p)
                                for e, p in zip(group, payloads, strict=True)])
        wait_until(lambda: store.count(EventFilter()) == 19, what="the 19 others stored")
        wait_until(lambda: store.dead_letter_count() == 1, what="the poisoned one dead-lettered")
        (letter,) = store.dead_letters()
        assert letter.code == "internal_error"
        assert "RecursionError" in letter.reason and letter.payload == payloads[7]
        later = heartbeat(Stamper(gateway="gw-1", device="s-later", boot="b"))
        publish_raw(mosquitto, [("careflow/v1/gw-1/s-later/heartbeat",
                                 json.dumps(later).encode())])
        wait_until(lambda: store.count(EventFilter()) == 20, what="the writer still writes")
        assert runner.is_alive()
    finally:
        service.stop()
        runner.join(timeout=15)
        store.close()


@pytest.mark.broker
def test_a_whole_batch_that_breaks_the_commit_is_kept_whole_in_its_dead_letter(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The finding: the dead letter of a message that made the hub fail kept only its first
    64 KiB, so a batch up to the message limit (256 KiB), acknowledged to the broker, lost the
    events after that. A message the hub failed on may be perfectly valid: it is kept whole."""
    settings_ = make_settings(tmp_path / "data", mosquitto.url)
    store = PoisonedStore(settings_.db_path, synchronous="normal")
    service = HubService(settings_, store)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: service.ingress.connected, what="hub connected")
        stamper = Stamper(gateway="gw-1", device="s-1", boot="b")
        group = [heartbeat(stamper, note="x" * 1900) for _ in range(MAX_BATCH_EVENTS)]
        store.poison = group[-1]["id"]
        payload = json.dumps(group).encode()
        assert 64 * 1024 < len(payload) <= LIMIT
        publish_raw(mosquitto, [("careflow/v1/gw-1/batch", payload)])
        wait_until(lambda: store.dead_letter_count() == 1, what="the batch dead-lettered")
        (letter,) = store.dead_letters()
        assert letter.code == "internal_error"
        assert letter.payload == payload  # every event of it, to be replayed once fixed
    finally:
        service.stop()
        runner.join(timeout=15)
        store.close()


@pytest.mark.broker
def test_a_retained_message_that_breaks_the_commit_is_one_dead_letter_however_often_it_returns(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The finding: a message left retained comes back at every (re)subscribe; junk is recorded
    once, but the dead letter of a message that broke the commit lost its retained mark, so
    it added a row at every restart of the hub."""
    settings_ = make_settings(tmp_path / "data", mosquitto.url)
    poisoned = heartbeat(Stamper(gateway="gw-1", device="s-1", boot="b"))
    url = parse_broker_url(mosquitto.url)
    client = make_client(client_id=f"retain-{new_event_id()}", clean_session=True, url=url)
    connect_blocking(client, url)
    client.publish("careflow/v1/gw-1/s-1/heartbeat", json.dumps(poisoned).encode(), qos=1,
                   retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    marker = Stamper(gateway="gw-1", device="marker", boot="b")
    for start in range(3):  # the hub's first subscribe, then two restarts
        store = PoisonedStore(settings_.db_path, synchronous="normal")
        store.poison = poisoned["id"]
        service = HubService(settings_, store)
        runner = threading.Thread(target=service.run, daemon=True)
        runner.start()
        try:
            wait_until(lambda s=service: s.ingress.connected, what="hub connected")
            publish_raw(mosquitto, [("careflow/v1/gw-1/marker/heartbeat",
                                     json.dumps(heartbeat(marker)).encode())])
            wait_until(lambda s=store, n=start: s.count(EventFilter()) == n + 1,
                       what="the marker stored")
            wait_until(lambda s=service: s.counters.messages >= 2, what="the retained one again")
            assert store.dead_letter_count() == 1
        finally:
            service.stop()
            runner.join(timeout=15)
            store.close()


def start_hub(mosquitto: Mosquitto, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(data_dir), "CAREFLOW_BROKER_URL": mosquitto.url,
           "CAREFLOW_SQLITE_SYNC": "normal"}
    with log.open("ab") as sink:
        return subprocess.Popen(careflow_cmd("hub"), env=env, stdout=sink, stderr=sink)


def hub_health(store: SqliteStore) -> dict[str, Any]:
    report = store.read_health()
    return report[1] if report else {}


@pytest.mark.broker
def test_a_real_hub_survives_deep_events_sent_twice_and_restarts_cleanly(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The finding: a ~1000-deep event sent twice killed the writer, and the broker redelivered
    it at every restart. Depths around the recursion limit, each sent twice, then an honest
    event; then a restart with one more deep copy waiting in the hub's session."""
    data_dir, log = tmp_path / "data", tmp_path / "hub.log"
    hub = start_hub(mosquitto, data_dir, log)
    try:
        wait_until((data_dir / "careflow.db").exists, what="store created")
        store = SqliteStore(data_dir / "careflow.db")
        wait_until(lambda: hub_health(store).get("connected") is True, what="hub connected")
        deep = [deep_event(levels, Stamper(gateway="gw-1", device=f"deep-{levels}", boot="b"))
                for levels in (950, 970, 980, 985, 988, 990, 995, 1000)]
        batch = b"[" + deep[0][1] + b"]"
        publish_raw(mosquitto, deep + deep + [("careflow/v1/gw-1/batch", batch)] * 2)
        honest = heartbeat(Stamper(gateway="gw-1", device="s-1", boot="b"))
        publish_raw(mosquitto, [("careflow/v1/gw-1/s-1/heartbeat", json.dumps(honest).encode())])
        wait_until(lambda: store.count(EventFilter()) == 1 or hub.poll() is not None,
                   what="the honest event stored")
        assert hub.poll() is None, log.read_text()[-3000:]
        wait_until(lambda: store.dead_letter_count() == 2 * len(deep) + 2,
                   what="every deep copy dead-lettered")
        assert {(d.code, d.reason) for d in store.dead_letters(limit=100)} == {(
            "too_deep", f"payload nests more than {MAX_DATA_DEPTH + 1} levels deep; an event's "
            f"data may nest at most {MAX_DATA_DEPTH} levels (MAX_DATA_DEPTH of the contract): "
            "flatten it")}
        assert [e.id for e in store.query(EventFilter())] == [honest["id"]]

        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=20) == 0, log.read_text()[-3000:]
        publish_raw(mosquitto, deep[-1:])  # waits in the hub's persistent session
        hub = start_hub(mosquitto, data_dir, log)
        wait_until(lambda: store.dead_letter_count() == 2 * len(deep) + 3 or
                   hub.poll() is not None, what="the waiting copy dead-lettered after restart")
        later = heartbeat(Stamper(gateway="gw-1", device="s-2", boot="b"))
        publish_raw(mosquitto, [("careflow/v1/gw-1/s-2/heartbeat", json.dumps(later).encode())])
        wait_until(lambda: store.count(EventFilter()) == 2 or hub.poll() is not None,
                   what="the restarted hub stores events")
        assert hub.poll() is None, log.read_text()[-3000:]
        store.close()
    finally:
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=20)


@given(events())
def test_honest_events_are_accepted(event: dict[str, Any]) -> None:
    topic = f"careflow/v1/gw-1/{event['device']}/heartbeat"
    decoded = decode_safely(topic, json.dumps(event).encode(), max_bytes=LIMIT)
    assert [a.event.id for a in decoded.accepted] == [event["id"]]
