"""The decode worker process: same result as decoding in-process, and nothing lost if it dies."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.ingest import decode_worker as decoder_module
from careflow.hub.ingest.decode import Decoded
from careflow.hub.ingest.decode_worker import DecodeWorker, decode_safely
from careflow.hub.store.records import EventFilter
from tests.conftest import Mosquitto, RunningHub, heartbeat, make_settings, wait_until
from tests.hub.conftest import fleet_events, publish

LIMIT = 256 * 1024


def comparable(decoded: Decoded) -> tuple[Any, ...]:
    """A decoding as plain values: the worker's EventHead and pydantic's Event compare alike."""
    accepted = [(a.event.id, a.event.gateway, a.event.device, a.event.type, a.event.time,
                 a.event.boot, int(a.event.seq), a.event.position, a.body, a.topic, a.data,
                 a.time_ms) for a in decoded.accepted]
    return accepted, decoded.rejected, decoded.presence


def messages() -> list[tuple[str, bytes]]:
    good = [heartbeat(Stamper(gateway="gw-1", device=f"s{i}", boot="b"), battery_pct=i)
            for i in range(5)]
    foreign = heartbeat(Stamper(gateway="gw-2", boot="b"))
    return [
        ("careflow/v1/gw-1/batch", json.dumps(good).encode()),
        ("careflow/v1/gw-1/batch", json.dumps([good[0], foreign, {**good[1], "seq": 0}]).encode()),
        ("careflow/v1/gw-1/s0/heartbeat", json.dumps(good[0]).encode()),
        ("careflow/v1/gw-1/state", b'{"v": 1, "state": "online", "conn": 1, "boot": "b"}'),
        ("careflow/v1/gw-1/batch", b"[not json"),
        ("careflow/v1/gw-1/batch", b"[" + b" " * LIMIT + b"]"),
        ("elsewhere/topic", b"{}"),
    ]


@pytest.fixture
def worker() -> Any:
    decoder = DecodeWorker(max_bytes=LIMIT)
    decoder.start()
    yield decoder
    decoder.stop()


def test_it_decodes_in_the_worker_exactly_as_in_process(worker: DecodeWorker) -> None:
    items = messages()
    for _ in range(2):  # the worker serves request after request
        assert worker.submit(items)
        result = worker.result()
        assert result is not None
        assert [comparable(d) for d in result] == \
            [comparable(decode_safely(t, p, max_bytes=LIMIT)) for t, p in items]


def test_it_takes_one_request_at_a_time(worker: DecodeWorker) -> None:
    assert worker.submit(messages())
    assert not worker.submit(messages())  # the caller decodes these in-process
    assert worker.result() is not None


def test_it_replaces_a_dead_worker_after_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder_module, "RESTART_DELAY_S", 0.5)
    worker = DecodeWorker(max_bytes=LIMIT)
    worker.start()
    try:
        assert worker._process is not None  # the test kills the real process
        worker._process.kill()
        worker._process.wait()
        submitted = worker.submit(messages())  # may still fit in the pipe buffer
        assert worker.result() is None
        assert not worker.alive
        assert not worker.submit(messages())  # the caller decodes these in-process meanwhile
        assert submitted or worker.result() is None
        items = messages()
        wait_until(lambda: worker.submit(items), timeout_s=10, what="a new worker")
        assert worker.alive and worker.restarts == 1
        result = worker.result()
        assert result is not None
        assert [comparable(d) for d in result] == \
            [comparable(decode_safely(t, p, max_bytes=LIMIT)) for t, p in items]
    finally:
        worker.stop()


def test_it_gives_up_on_a_worker_that_hangs(worker: DecodeWorker,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    small = messages()[:3]  # fits in the pipe buffer of a worker that reads nothing
    assert worker.submit(small)
    assert worker.result() is not None  # started and idle
    monkeypatch.setattr(decoder_module, "RESULT_TIMEOUT_S", 0.3)
    assert worker._process is not None  # the test freezes the real process
    os.kill(worker._process.pid, signal.SIGSTOP)
    assert worker.submit(small)
    assert worker.result() is None
    assert not worker.alive


def test_a_stopped_worker_cannot_block_the_hub_with_a_full_pipe(
        worker: DecodeWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than a pipe buffer to a worker that reads nothing: the send gives up in time."""
    assert worker._process is not None  # the test freezes the real process
    os.kill(worker._process.pid, signal.SIGSTOP)
    monkeypatch.setattr(decoder_module, "SEND_TIMEOUT_S", 0.3)
    count = 2 * decoder_module.PIPE_BYTES // 1024  # twice what the widened pipe holds
    big = [(f"careflow/v1/gw-{i}/gw-{i}/heartbeat", (f"{i:08d}" * 128).encode())
           for i in range(count)]  # distinct payloads: pickle would send one shared object once
    started = time.monotonic()
    assert not worker.submit(big)  # the caller decodes these in-process
    assert time.monotonic() - started < 5
    assert not worker.alive


@pytest.mark.broker
def test_it_stores_each_event_exactly_once_with_a_worker_that_dies_mid_ingest(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decoder_module, "RESTART_DELAY_S", 0.0)  # replaced at the next batch
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url), decode_worker=True)
    hub.start()
    try:
        events = fleet_events(gateways=3, devices=4, per_device=25)  # 300 events
        publish(mosquitto, events, batch=True)
        wait_until(lambda: hub.store.count(EventFilter()) == 300, what="300 events stored")
        decoder = hub.service._decoder  # the test kills the real worker
        assert decoder is not None and decoder.alive
        assert decoder._process is not None
        decoder._process.kill()
        sources = [Stamper(gateway=f"gw-{g}", device="dev-0", boot="boot-2") for g in range(3)]
        more = [heartbeat(source) for source in sources for _ in range(40)]  # 120 new events
        publish(mosquitto, random.Random(3).sample(events, 100) + more, batch=True)
        wait_until(lambda: hub.store.count(EventFilter()) == 420, what="420 events stored")
        wait_until(lambda: hub.service.counters.duplicates == 100, what="the repeats seen")
        source = Stamper(gateway="gw-0", device="dev-9", boot="boot-3")
        last = [heartbeat(source) for _ in range(5)]
        publish(mosquitto, last, batch=True)
        wait_until(lambda: hub.store.count(EventFilter()) == 425, what="425 events stored")
        assert decoder.alive and decoder.restarts == 1  # a new worker took over
        assert hub.store.dead_letter_count() == 0
        stored_ids = {ev.id for ev in hub.store.query(EventFilter(), limit=1000)}
        assert stored_ids == {e["id"] for e in events + more + last}
    finally:
        hub.stop()
