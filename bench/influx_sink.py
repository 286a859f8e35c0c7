"""InfluxDB sink throughput against raw line-protocol POSTs of the same points, in the same run.

    .venv/bin/python bench/influx_sink.py [--events 50000] [--chunk 5000]

Fills a SQLite event store with a mixed fleet's events, starts a private influxd (Debian's 1.x)
on free ports, then measures (a) the baseline: the very points the sink would write, rendered
beforehand, POSTed to /write in chunks of the same size, and (b) the sink draining the log from
its cursor (read, parse, render, POST, move the cursor). Prints points/s and the sink/raw ratio.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.core.config import InfluxSettings
from careflow.edge.stamper import Stamper
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.ingest.decode import decode_message
from careflow.hub.sinks.influx.points import event_points
from careflow.hub.sinks.influx.sink import InfluxSink, V1Writer
from careflow.hub.store.records import EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import Influxd


def fill(store: SqliteStore, events: int) -> None:
    """A fleet of 100 gateways x 10 sensors sending heartbeats with battery, some statuses."""
    stampers = [Stamper(gateway=f"gw-{g:03d}", device=f"gw-{g:03d}-s{d}", boot="b1")
                for g in range(100) for d in range(10)]
    pending = []
    for i in range(events):
        source = stampers[i % len(stampers)]
        if i % 10 == 9:
            event = source.stamp("status", {"state": "ok", "battery_pct": 50 + i % 50})
        else:
            event = source.stamp("heartbeat", {"interval_s": 60, "battery_pct": 50 + i % 50,
                                               "rssi_dbm": -60})
        topic = f"careflow/v1/{event['gateway']}/{event['device']}/{event['type']}"
        pending += decode_message(topic, json.dumps(event).encode(), max_bytes=65536).accepted
        if len(pending) >= 5000:
            store.append(IncomingBatch([(a, 0) for a in pending], []))
            pending = []
    if pending:
        store.append(IncomingBatch([(a, 0) for a in pending], []))


def raw_posts(url: str, db: str, chunks: list[str]) -> float:
    start = time.perf_counter()
    for body in chunks:
        request = urllib.request.Request(f"{url}/write?db={db}&precision=ns", data=body.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = SqliteStore(work / "careflow.db", synchronous="normal")
        fill(store, args.events)
        (work / "influxd").mkdir()
        server = Influxd(work / "influxd")
        server.start()
        try:
            server.create_database("raw")
            sites = SiteBook()
            chunks, points = [], 0
            for chunk in store.iter_log(EventFilter(), chunk=args.chunk):
                lines = [text for event in chunk
                         for text in event_points(event, event.data, sites.site_of(event.gateway))]
                points += len(lines)
                chunks.append("\n".join(lines))
            raw_s = raw_posts(server.url, "raw", chunks)

            server.create_database("sink")
            sink = InfluxSink(store, V1Writer(InfluxSettings(url=server.url, database="sink")),
                              chunk=args.chunk, snapshots=False)
            start = time.perf_counter()
            while sink.drain_once():  # as the hub's sink thread catches up on a backlog
                pass
            sink_s = time.perf_counter() - start
            written = sink.counters.points_written
        finally:
            server.stop()
            store.close()
    raw_rate, sink_rate = points / raw_s, written / sink_s
    print(f"events: {args.events}, points: {points} (sink wrote {written})")
    print(f"raw line-protocol POSTs: {raw_rate:,.0f} points/s")
    print(f"careflow sink (log -> points -> POST -> cursor): {sink_rate:,.0f} points/s")
    print(f"ratio sink/raw: {sink_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
