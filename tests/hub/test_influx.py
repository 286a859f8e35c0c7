"""The InfluxDB sink against a real InfluxDB 1.6 (Debian's influxd) and, for the v2 API that
1.6 does not serve, a real local HTTP server that checks the exact request."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from careflow.core.config import InfluxSettings, load_influx
from careflow.core.errors import ConfigError, InfluxError
from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import PresenceUpdate, decode_message
from careflow.hub.sinks.influx.points import line, tag_value_as_stored
from careflow.hub.sinks.influx.sink import EVENTS_CURSOR, InfluxSink, V1Writer, V2Writer, read_refusal
from careflow.hub.store.records import EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import (
    Influxd,
    Mosquitto,
    RunningHub,
    careflow_cmd,
    heartbeat,
    wait_until,
)
from tests.hub.conftest import publish

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


_HOSTILE = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(site=st.one_of(_HOSTILE, _HOSTILE.map(lambda t: t + "\\"),
                      st.sampled_from(["oslo\\", "a\\\\", "\\", "x\\ y", "a\\,b=c",
                                       "line\nbreak", "cr\r", " lead", "trail ", "é漢😀\\"])),
       text=st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
                      st.text(max_size=20).map(lambda t: t + "\\")))
def test_tags_and_strings_survive_line_protocol_escaping(shared_influxd: Influxd, site: str,
                                                         text: str) -> None:
    """Whatever a gateway puts in ``labels.site`` or a message, the real InfluxDB reads back
    exactly that; the two things a tag value cannot carry (a line break, a final backslash)
    become what ``tag_value_as_stored`` says, and nothing else ever changes."""
    stamp = time.time_ns()
    point = line("escaping", {"site": site, "gateway": "gw-1"}, {"message": text}, stamp)
    assert point is not None
    V1Writer(InfluxSettings(url=shared_influxd.url, database="escaping")).write([point])
    rows = shared_influxd.query(
        f'SELECT "site", "message" FROM "escaping" WHERE time = {stamp}', db="escaping")
    assert rows, f"InfluxDB stored nothing for {point!r}"
    assert rows[0]["values"][0][1:] == [tag_value_as_stored(site), text]
    if "\n" not in site and "\r" not in site and not site.endswith("\\"):
        assert tag_value_as_stored(site) == site


def test_a_site_ending_in_a_backslash_costs_no_points(shared_influxd: Influxd,
                                                      tmp_path: Path) -> None:
    """A gateway declaring ``labels.site = "oslo\\"`` used to make InfluxDB refuse every
    point carrying that tag; its points and its neighbours' are all stored now."""
    db = "backslash_site"
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        events = mixed_events("gw-bs", "oslo\\", 5) + mixed_events("gw-ok", "bergen", 5)
        store.append(IncomingBatch([(a, 1) for e in events for a in decode_message(
            f"careflow/v1/{e['gateway']}/{e['device']}/{e['type']}", json.dumps(e).encode(),
            max_bytes=65536).accepted], []))
        sink = InfluxSink(store, V1Writer(InfluxSettings(url=shared_influxd.url, database=db)),
                          snapshots=False)
        sink.drain_once()
        assert sink.counters.points_rejected == 0
        assert count(shared_influxd, "events", db) == len(events)
        by_site = shared_influxd.query('SELECT count("seq") FROM "events" GROUP BY "site"', db=db)
        assert {s["tags"]["site"]: s["values"][0][1] for s in by_site} == {
            "oslo\\\ufffd": 9, "bergen": 9}
    finally:
        store.close()


def stored_events(store: SqliteStore, events: list[dict[str, Any]]) -> None:
    """Append valid events to the store, as the hub would after decoding them."""
    store.append(IncomingBatch([(a, 1) for e in events for a in decode_message(
        f"careflow/v1/{e['gateway']}/{e['device']}/{e['type']}", json.dumps(e).encode(),
        max_bytes=65536).accepted], []))


def test_points_beyond_retention_are_skipped_and_the_rest_of_the_chunk_is_stored(
        shared_influxd: Influxd, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A gateway whose clock reset sends events older than the retention policy: InfluxDB
    stores the chunk's other points and refuses those ("partial write"). The sink counts and
    logs exactly the refused ones, with the reason, and moves on."""
    db = "short_retention"
    shared_influxd.query(f'CREATE DATABASE "{db}" WITH DURATION 1h', db=db)
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        old_clock = Stamper(gateway="gw-old", device="gw-old", boot="b1")
        long_ago = datetime.now(UTC) - timedelta(hours=3)
        old = [old_clock.stamp("heartbeat", {"interval_s": 60},
                               at=long_ago + timedelta(seconds=i)) for i in range(7)]
        fresh = Stamper(gateway="gw-new", device="gw-new", boot="b1")
        new = [heartbeat(fresh) for _ in range(20)]
        stored_events(store, old[:3] + new[:10] + old[3:] + new[10:])
        writer = V1Writer(InfluxSettings(url=shared_influxd.url, database=db))
        sink = InfluxSink(store, writer, snapshots=False)
        with caplog.at_level(logging.ERROR, logger="careflow.hub.sinks.influx.sink"):
            sink.drain_once()
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
        assert count(shared_influxd, "events", db) == 20
        assert count(shared_influxd, "heartbeat", db, "interval_s") == 20
        assert sink.counters.points_rejected == 14  # 7 events x (events + heartbeat)
        assert sink.counters.points_written == 40
        assert "beyond retention" in (sink.counters.last_rejection or "")
        refused = [r for r in caplog.records if r.getMessage().startswith("InfluxDB refused")]
        assert refused and refused[0].points == 14  # type: ignore[attr-defined]
    finally:
        store.close()


@pytest.mark.parametrize(("status", "body", "partial", "dropped"), [
    (400, '{"error":"partial write: points beyond retention policy dropped=3"}', True, 3),
    (400, '{"error":"partial write: field type conflict: input field \\"seq\\" on '
          'measurement \\"events\\" is type string, already exists as type integer dropped=1"}',
     True, 1),
    (400, '{"error":"partial write: unable to parse \'m,site=a\\\\ f=1i 1\': invalid tag '
          'format\\nunable to parse \'m,site=dropped=9 f=1i 2\': bad dropped=0"}', True, 2),
    (400, '{"error":"unable to parse \'m,site=x\\\\ f=1i 1\': invalid tag format"}', False, 1),
    (422, '{"code":"unprocessable entity","message":"failure writing points to database: '
          'partial write: points beyond retention policy dropped=2"}', True, 2),
    (422, '{"code":"unprocessable entity","message":"some points were refused"}', True, 0),
    (400, '{"code":"invalid","message":"unable to parse \'x y\': missing fields"}', False, 1),
])
def test_it_reads_what_influxdb_refused(status: int, body: str, partial: bool,
                                        dropped: int) -> None:
    refusal = read_refusal(status, body, "InfluxDB")
    assert (refusal.partial, refusal.dropped, refusal.retry) == (partial, dropped, False)


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
        self.answer_body = b'{"code":"unauthorized","message":"unauthorized access"}'
        # when set: decides the answer from the request body, as InfluxDB would
        self.decide: Callable[[bytes], tuple[int, bytes]] | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, dict(self.headers), body))
                status, text = (receiver.decide(body) if receiver.decide is not None
                                else (receiver.answer, receiver.answer_body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if status != 204:
                    self.wfile.write(text)

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


def v2_settings(receiver: V2Receiver) -> InfluxSettings:
    settings_v2 = load_influx({"CAREFLOW_INFLUX_URL": receiver.url, "CAREFLOW_INFLUX_ORG": "o",
                               "CAREFLOW_INFLUX_BUCKET": "fleet", "CAREFLOW_INFLUX_TOKEN": "t"})
    assert settings_v2 is not None
    return settings_v2


def test_a_partial_write_on_the_v2_api_is_skipped_not_retried_forever(tmp_path: Path) -> None:
    """InfluxDB 2.x answers 422 when it stored a request but refused some points (older than
    the bucket's retention). The sink counts what was refused and moves on, once."""
    receiver = V2Receiver()
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        receiver.answer = 422
        receiver.answer_body = (b'{"code":"unprocessable entity","message":"failure writing '
                                b'points to database: partial write: points beyond retention '
                                b'policy dropped=2"}')
        source = Stamper(gateway="gw-v", device="gw-v", boot="b1")
        stored_events(store, [heartbeat(source) for _ in range(5)])
        writer = V2Writer(v2_settings(receiver))
        sink = InfluxSink(store, writer, snapshots=False)
        sink.drain_once()
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
        assert sink.counters.points_rejected == 2
        assert sink.counters.points_written == 8
        assert len(receiver.requests) == 1
        writer.close()
    finally:
        store.close()
        receiver.close()


def test_one_refused_point_never_costs_the_points_beside_it(tmp_path: Path) -> None:
    """InfluxDB 2.x refuses a whole request (400) for one line it cannot take. The sink halves
    the chunk until that line stands alone: every other gateway's points are stored, only the
    refused line is skipped. The receiver is a real HTTP server answering as 2.x does (no 2.x
    can run here); it stores the lines of the requests it accepts."""
    receiver = V2Receiver()
    stored: list[str] = []

    def as_influxdb_2(body: bytes) -> tuple[int, bytes]:
        lines = body.decode().split("\n")
        bad = [text for text in lines if text.startswith("alarm,")]
        if bad:
            message = f"unable to parse '{bad[0]}': pretend it is malformed"
            return 400, json.dumps({"code": "invalid", "message": message}).encode()
        stored.extend(lines)
        return 204, b""

    receiver.decide = as_influxdb_2
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal")
    try:
        events = mixed_events("gw-a", "oslo", 30) + mixed_events("gw-b", "bergen", 30)
        stored_events(store, events)
        writer = V2Writer(v2_settings(receiver))
        sink = InfluxSink(store, writer, snapshots=False)
        sink.drain_once()
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
        assert sink.counters.points_rejected == 2  # the two alarm points, one per gateway
        assert sum(text.startswith("events,") for text in stored) == len(events)
        assert not any(text.startswith("alarm,") for text in stored)
        assert sink.counters.points_written == len(stored)
        writer.close()
    finally:
        store.close()
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
                          chunk=10, snapshots=False, clock=lambda: 1_800_000_000_000)
        with pytest.raises(InfluxError):
            sink.drain_once()
        assert store.cursor(EVENTS_CURSOR) == first_pos + 19  # two chunks confirmed, no more
        assert sink.status()["last_write_ms"] == 1_800_000_000_000  # by the sink's clock
        while sink.drain_once():
            pass
        assert store.cursor(EVENTS_CURSOR) == store.last_pos()
        assert count(shared_influxd, "events", "catchup") == 100
    finally:
        store.close()
