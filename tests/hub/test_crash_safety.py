"""SIGKILL the hub process in the middle of a 20,000-event ingest: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.publish import publish_events
from careflow.edge.stamper import Stamper
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import Mosquitto, careflow_cmd, heartbeat, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TOTAL = 20_000


def start_hub(mosquitto: Mosquitto, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(data_dir),
           "CAREFLOW_BROKER_URL": mosquitto.url}
    with log.open("ab") as sink:
        return subprocess.Popen(careflow_cmd("hub"), env=env, stdout=sink, stderr=sink)


def health(store: SqliteStore) -> dict[str, Any]:
    report = store.read_health()
    return report[1] if report else {}


def test_it_loses_and_doubles_nothing_when_killed_mid_ingest(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "hub.log"
    hub = start_hub(mosquitto, data_dir, log)
    wait_until((data_dir / "careflow.db").exists, what="store created")
    store = SqliteStore(data_dir / "careflow.db")
    wait_until(lambda: health(store).get("connected") is True, what="hub connected")

    sources = [Stamper(gateway=f"gw-{g}", device=f"dev-{d}", boot="b1")
               for g in range(10) for d in range(10)]
    events = [heartbeat(sources[i % len(sources)]) for i in range(TOTAL)]
    publisher = threading.Thread(target=publish_events, args=(
        parse_broker_url(mosquitto.url), events), kwargs={"client_id": "crash-publisher",
                                                          "timeout_s": 120})
    publisher.start()
    wait_until(lambda: store.count(EventFilter()) >= 3_000, timeout_s=60,
               what="ingest under way")
    hub.send_signal(signal.SIGKILL)
    hub.wait(timeout=10)
    killed_at = store.count(EventFilter())
    publisher.join(timeout=180)
    assert not publisher.is_alive()
    assert killed_at < TOTAL, "the kill came too late to prove anything"

    hub = start_hub(mosquitto, data_dir, log)
    try:
        wait_until(lambda: store.count(EventFilter()) >= TOTAL, timeout_s=120,
                   what=f"all {TOTAL} events after restart")
        wait_until(lambda: health(store).get("queue_depth") == 0, what="hub idle")
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=20) == 0, log.read_text()[-2000:]
    assert store.count(EventFilter()) == TOTAL
    stored_ids = {ev.id for ev in store.query(EventFilter(), limit=TOTAL + 10)}
    assert stored_ids == {e["id"] for e in events}
    assert store.total_gaps() == 0
    assert store.dead_letter_count() == 0
    # the registry, folded in the same commit as the events, counts each of them once
    assert sum(device.events for device in store.devices()) == TOTAL
