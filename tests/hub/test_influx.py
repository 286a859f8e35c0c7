"""The InfluxDB sink against a real InfluxDB 1.6 (Debian's influxd) and, for the v2 API that
1.6 does not serve, a real local HTTP server that checks the exact request."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.config import InfluxSettings, load_influx
from careflow.edge.stamper import Stamper
from careflow.errors import ConfigError, InfluxError
from careflow.hub.influx import EVENTS_CURSOR, InfluxSink, V1Writer, V2Writer
from careflow.hub.influx_points import line
from careflow.hub.ingest import PresenceUpdate, decode_message
from careflow.hub.sqlite_store import SqliteStore
from careflow.hub.store import EventFilter, IncomingBatch
from tests.conftest import (
    Influxd,
    Mosquitto,
    RunningHub,
    careflow_cmd,
    heartbeat,
    wait_until,
)
from tests.hub.test_hub_mosquitto import publish

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def shared_influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    server = Influxd(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()


def influx_env(server: Influxd, db: str = "careflow") -> dict[str, str]:
    return {"CAREFLOW_INFLUX_URL": server.url, "CAREFLOW_INFLUX_DB": db}


def count(server: Influxd, measurement: str, db: str = "careflow", field: str = "seq",
          where: str = "") -> int:
    series = server.query(f'SELECT count("{field}") FROM "{measurement}" {where}', db=db)
    return int(series[0]["values"][0][1]) if series else 0


def mixed_events(gateway: str, site: str, n: int) -> list[dict[str, Any]]:
    """A gateway declaring its site, then heartbeats with battery, a status, an error, an alarm."""
    gw = Stamper(gateway=gateway, device=gateway, boot="b1")
    sensor = Stamper(gateway=gateway, device=f"{gateway}-fall", boot="s1")
    events = [gw.stamp("provision", {"action": "added", "kind": "fall-sensor",
                                     "serial": "FS-1", "labels": {"site": site}})]
    events += [heartbeat(sensor, battery_pct=80 - i % 70) for i in range(n)]
    events += [sensor.stamp("status", {"state": "degraded", "battery_pct": 12,
                                       "message": 'battery "low", replace'}),
               gw.stamp("error", {"code": "ZB_RESET", "message": "coordinator reset",
                                  "severity": "error", "component": "zigbee"}),
               sensor.stamp("alert", {"kind": "fall", "state": "raised",
                                      "location": "bath room"})]
    return events


def test_events_through_the_hub_become_queryable_points(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], shared_influxd: Influxd
) -> None:
    db = "through_hub"
    hub = hub_factory(mosquitto.url, **influx_env(shared_influxd, db))
    events = mixed_events("gw-a", "oslo-12", 40) + mixed_events("gw-b", "bergen-3", 20)
    publish(mosquitto, events)
    wait_until(lambda: hub.store.count(EventFilter()) == len(events), what="events stored")
    wait_until(lambda: count(shared_influxd, "events", db) == len(events), timeout_s=30,
               what="every event in InfluxDB")

    assert count(shared_influxd, "heartbeat", db, "interval_s") == 60
    assert count(shared_influxd, "battery", db, "pct") == 62  # 60 heartbeats + 2 statuses
    assert count(shared_influxd, "error", db, "seq", "WHERE \"component\" = 'zigbee'") == 2
    assert count(shared_influxd, "alarm", db, "seq", "WHERE \"kind\" = 'fall'") == 2
    by_site = shared_influxd.query('SELECT count("seq") FROM "events" GROUP BY "site"', db=db)
    assert {s["tags"]["site"]: s["values"][0][1] for s in by_site} == {
        "oslo-12": 44, "bergen-3": 24}
    message = shared_influxd.query('SELECT "message" FROM "status" WHERE "gateway" = \'gw-a\'',
                                   db=db)
    assert message[0]["values"][0][1] == 'battery "low", replace'
    status = hub.service.health()["influx"]
    assert status["backlog_events"] == 0 or hub.sink_backlog() == 0
    assert status["points_rejected"] == 0


def test_an_influxdb_outage_loses_nothing_and_duplicates_nothing(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], tmp_path: Path
) -> None:
    workdir = tmp_path / "influx-outage"
    workdir.mkdir()
    server = Influxd(workdir)
    server.start()
    try:
        hub = hub_factory(mosquitto.url, **influx_env(server))
        source = Stamper(gateway="gw-o", device="gw-o", boot="b1")
        first = [heartbeat(source) for _ in range(100)]
        publish(mosquitto, first)
        wait_until(lambda: count(server, "events") == 100, timeout_s=30, what="first 100")

        server.stop()
        during = [heartbeat(source) for _ in range(300)]
        publish(mosquitto, during)
        wait_until(lambda: hub.store.count(EventFilter()) == 400, what="ingest goes on")
        wait_until(lambda: hub.sink_backlog() == 300, what="backlog of 300")
        wait_until(lambda: (hub.service.health()["influx"] or {}).get("write_errors", 0) > 0,
                   what="the sink to notice")

        server.start()
        after = [heartbeat(source) for _ in range(50)]
        publish(mosquitto, after)
        wait_until(lambda: count(server, "events") == 450, timeout_s=60, what="all 450 points")
        time.sleep(1.5)  # a duplicate would show up as a higher count, not a lower one
        assert count(server, "events") == 450
        seqs = server.query('SELECT "seq" FROM "events"')[0]["values"]
        assert sorted(v[1] for v in seqs) == list(range(1, 451))
        assert hub.sink_backlog() == 0
    finally:
        server.stop()


def test_replay_rebuilds_an_emptied_database_to_the_same_results(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], shared_influxd: Influxd
) -> None:
    db = "replayed"
    hub = hub_factory(mosquitto.url, **influx_env(shared_influxd, db))
    events = mixed_events("gw-r", "tromso-1", 30)
    publish(mosquitto, events)
    wait_until(lambda: count(shared_influxd, "events", db) == len(events), timeout_s=30,
               what="points written")
    queries = ['SELECT count("seq") FROM "events" GROUP BY "site", "type"',
               'SELECT mean("pct") FROM "battery" GROUP BY "device"',
               'SELECT * FROM "alarm"', 'SELECT * FROM "status"']
    before = [shared_influxd.query(q, db=db) for q in queries]
    hub.stop()

    shared_influxd.query(f'DROP DATABASE "{db}"', db=db)
    env = {"CAREFLOW_DATA_DIR": str(hub.settings.data_dir), **influx_env(shared_influxd, db)}
    done = subprocess.run(careflow_cmd("replay", "--target", "influx"), env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"replayed {len(events)} event(s)" in done.stdout
    assert "InfluxDB:" in done.stdout
    assert [shared_influxd.query(q, db=db) for q in queries] == before


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tag=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)
       .filter(lambda t: t.strip() == t and not t.endswith("\\")),
       text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_tags_and_strings_survive_line_protocol_escaping(shared_influxd: Influxd, tag: str,
                                                         text: str) -> None:
    """Whatever a device puts in its labels and messages, InfluxDB reads back exactly that.

    Tags exclude control characters, which line protocol cannot carry in a tag (careflow's ids
    cannot contain them: the contract's id patterns forbid them)."""
    stamp = time.time_ns()
    point = line("escaping", {"gateway": tag}, {"message": text}, stamp)
    assert point is not None
    V1Writer(InfluxSettings(url=shared_influxd.url, database="escaping")).write([point])
    rows = shared_influxd.query(f'SELECT "gateway", "message" FROM "escaping" WHERE time = {stamp}',
                                db="escaping")
    assert rows[0]["values"][0][1:] == [tag, text]


def test_a_point_influxdb_rejects_is_counted_and_skipped_not_retried_forever(
    shared_influxd: Influxd, tmp_path: Path
) -> None:
    db = "conflicts"
    writer = V1Writer(InfluxSettings(url=shared_influxd.url, database=db))
    writer.write([f'events,gateway=gw-x seq="text" {time.time_ns()}'])  # seq typed as string
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        source = Stamper(gateway="gw-x", device="gw-x", boot="b1")
        decoded = [decode_message("careflow/v1/gw-x/gw-x/heartbeat",
                                  json.dumps(heartbeat(source)).encode(), max_bytes=65536)
                   for _ in range(3)]
        store.append(IncomingBatch([(a, 1) for d in decoded for a in d.accepted], []))
        sink = InfluxSink(store, writer, snapshots=False)
        sink.drain_once()
        assert sink.counters.points_rejected > 0
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
    finally:
        store.close()


class V2Receiver:
    """A real HTTP server standing in for InfluxDB 2/3's `/api/v2/write`, which no server
    installable here serves (InfluxDB 1.6 has no v2 API; 2.x and 3.x cannot be installed).
    It records the exact request and answers as InfluxDB would."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.answer = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, dict(self.headers), body))
                self.send_response(receiver.answer)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if receiver.answer != 204:
                    self.wfile.write(b'{"code":"unauthorized","message":"unauthorized access"}')

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_v2_api_gets_org_bucket_token_and_exact_line_protocol() -> None:
    receiver = V2Receiver()
    try:
        settings_v2 = load_influx({"CAREFLOW_INFLUX_URL": receiver.url,
                                   "CAREFLOW_INFLUX_ORG": "care org",
                                   "CAREFLOW_INFLUX_BUCKET": "fleet",
                                   "CAREFLOW_INFLUX_TOKEN": "s3cret"})
        assert settings_v2 is not None and settings_v2.api == "v2"
        writer = V2Writer(settings_v2)
        lines = ["events,gateway=gw-1,site=oslo seq=1i,skew_ms=3i 1764219600000000001",
                 'status,device=d\\ 1,gateway=gw-1 message="a \\"b\\"" 1764219600000000002']
        writer.write(lines)
        path, headers, body = receiver.requests[0]
        parsed = urllib.parse.urlsplit(path)
        assert parsed.path == "/api/v2/write"
        assert urllib.parse.parse_qs(parsed.query) == {
            "org": ["care org"], "bucket": ["fleet"], "precision": ["ns"]}
        assert headers["Authorization"] == "Token s3cret"
        assert body.decode() == "\n".join(lines)

        receiver.answer = 401
        with pytest.raises(InfluxError, match="credentials") as refused:
            writer.write(lines)
        assert refused.value.retry
        writer.close()
    finally:
        receiver.close()


def test_influx_settings_say_what_is_missing() -> None:
    assert load_influx({}) is None
    with pytest.raises(ConfigError, match="exactly one"):
        load_influx({"CAREFLOW_INFLUX_URL": "http://x:8086"})
    with pytest.raises(ConfigError, match="ORG"):
        load_influx({"CAREFLOW_INFLUX_URL": "http://x:8086", "CAREFLOW_INFLUX_BUCKET": "b"})
    with pytest.raises(ConfigError, match="http"):
        load_influx({"CAREFLOW_INFLUX_URL": "x:8086", "CAREFLOW_INFLUX_DB": "d"})


def test_presence_incidents_snapshots_and_hub_health_become_series(
    shared_influxd: Influxd, tmp_path: Path
) -> None:
    """The derived series the dashboards chart: online/offline changes, incident phases with
    time-to-acknowledge/-resolve, the per-minute device snapshot and the hub's own health."""
    db = "derived"
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        now_ms = int(time.time() * 1000)
        events = mixed_events("gw-d", "oslo-12", 3)
        decoded = [a for e in events for a in decode_message(
            f"careflow/v1/{e['gateway']}/{e['device']}/{e['type']}", json.dumps(e).encode(),
            max_bytes=65536).accepted]
        online = PresenceUpdate("gw-d", "online", 1, "b1", None)
        offline = PresenceUpdate("gw-d", "offline", 1, "b1", "connection lost")
        store.append(IncomingBatch([(a, now_ms - 60_000) for a in decoded], [],
                                   [(online, now_ms - 60_000)]))
        store.append(IncomingBatch([], [], [(offline, now_ms - 30_000)]))
        incident_id = store.open_incident(rule="gateway_offline", gateway="gw-d", device="gw-d",
                                          severity="critical", summary="gw-d offline",
                                          detail="", at_ms=now_ms - 30_000)
        assert incident_id is not None
        store.acknowledge_incident(incident_id, by="nurse", at_ms=now_ms - 20_000)
        store.resolve_incident(incident_id, by="nurse", at_ms=now_ms - 10_000)

        writer = V1Writer(InfluxSettings(url=shared_influxd.url, database=db))
        sink = InfluxSink(store, writer, health=lambda: {"events_per_s": 12.5, "connected": True,
                                                         "queue_depth": 3})
        sink.drain_once(now_ms=now_ms)

        presence = shared_influxd.query('SELECT "online", "site" FROM "presence"', db=db)
        assert [row[1:] for row in presence[0]["values"]] == [[1, "oslo-12"], [0, "oslo-12"]]
        phases = shared_influxd.query(
            'SELECT last("tta_s"), last("ttr_s") FROM "incident" GROUP BY "phase"', db=db)
        by_phase = {s["tags"]["phase"]: s["values"][0][1:] for s in phases}
        assert by_phase == {"acknowledged": [10, None], "resolved": [10, 20]}
        opened = shared_influxd.query('SELECT count("id") FROM "incident" GROUP BY "phase"', db=db)
        assert {s["tags"]["phase"]: s["values"][0][1] for s in opened} == {
            "opened": 1, "acknowledged": 1, "resolved": 1}
        snapshot = shared_influxd.query(
            'SELECT "online", "role" FROM "device_status" GROUP BY "device"', db=db)
        # the gateway is offline, so its sensor counts as unreachable too
        assert {s["tags"]["device"]: s["values"][0][1:] for s in snapshot} == {
            "gw-d": [0, "gateway"], "gw-d-fall": [0, "sensor"]}
        hub = shared_influxd.query('SELECT "events_per_s", "connected", "backlog_events" '
                                   'FROM "hub"', db=db)
        assert hub[0]["values"][0][1:] == [12.5, 1, 0]
        assert store.queued_lines("influx") == []  # delivered snapshots leave the outbox
    finally:
        store.close()


def test_requests_over_the_servers_body_limit_are_split_and_a_lone_giant_is_skipped(
        tmp_path: Path) -> None:
    """InfluxDB answers 413 past its max-body-size: the sink halves the chunk until it fits,
    and a single point that can never fit is counted and skipped instead of blocking the log."""
    workdir = tmp_path / "small-influxd"
    workdir.mkdir()
    server = Influxd(workdir, max_body_size=4000)
    server.start()
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        source = Stamper(gateway="gw-s", device="gw-s", boot="b1")
        events = [heartbeat(source) for _ in range(60)]
        events.append(source.stamp("status", {"state": "degraded", "message": "x" * 1000}))
        # an error message may hold 4,096 characters: its point alone is over the limit
        events.append(source.stamp("error", {"code": "DUMP", "message": "y" * 4096}))
        store.append(IncomingBatch([(a, 1) for e in events for a in decode_message(
            f"careflow/v1/gw-s/gw-s/{e['type']}", json.dumps(e).encode(),
            max_bytes=65536).accepted], []))
        sink = InfluxSink(store, V1Writer(InfluxSettings(url=server.url, database="small")),
                          snapshots=False)
        sink.drain_once()
        assert count(server, "events", "small") == 62  # every event's small point, split up
        assert count(server, "status", "small", "ok") == 1
        assert count(server, "error", "small") == 0  # the giant alone: skipped, not retried
        assert sink.counters.points_rejected == 1
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()  # the log moved on past it
    finally:
        store.close()
        server.stop()


def test_catching_up_moves_the_cursor_only_past_confirmed_chunks(
        shared_influxd: Influxd, tmp_path: Path) -> None:
    """Chunks are rendered while the previous one is written; a write that fails leaves the
    cursor after the last confirmed chunk, and the next drain resends from there."""

    class FailingOnce(V1Writer):
        calls = 0

        def write(self, lines: Sequence[str]) -> None:
            self.calls += 1
            if self.calls == 3:
                msg = "InfluxDB went away"
                raise InfluxError(msg, retry=True)
            super().write(lines)

    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        source = Stamper(gateway="gw-c", device="gw-c", boot="b1")
        events = [heartbeat(source) for _ in range(100)]
        store.append(IncomingBatch([(a, 1) for e in events for a in decode_message(
            "careflow/v1/gw-c/gw-c/heartbeat", json.dumps(e).encode(),
            max_bytes=65536).accepted], []))
        first_pos = store.query(EventFilter(), limit=1, newest_first=False)[0].pos
        sink = InfluxSink(store, FailingOnce(InfluxSettings(url=shared_influxd.url,
                                                            database="catchup")),
                          chunk=10, snapshots=False)
        with pytest.raises(InfluxError):
            sink.drain_once()
        assert store.cursor(EVENTS_CURSOR) == first_pos + 19  # two chunks confirmed, no more
        while sink.drain_once():
            pass
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
        assert count(shared_influxd, "events", "catchup") == 100
    finally:
        store.close()
