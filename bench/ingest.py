"""Hub ingest throughput against a raw broker pipe, measured in the same run.

    .venv/bin/python bench/ingest.py [--events 20000] [--batch-events 200000] [--repeat 3]

Starts a private Mosquitto on a free port, then for single-event messages and for 100-event
batches measures (a) a raw pipe: one subscriber process that only decodes JSON, with QoS 1, and
(b) the hub process (`careflow hub`: validate, dedupe, commit, then PUBACK). The same publisher
feeds both. Prints events/s, the hub/raw ratio, and the hub's events per CPU-second of its
processes (hub and decode worker; steadier than events/s on a shared machine). Never part of
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.stamper import Stamper
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.schemas import batch_topic, event_topic
from tests.conftest import Mosquitto, careflow_cmd

RAW_SUBSCRIBER = """
import json, sys, time, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, expected = int(sys.argv[1]), int(sys.argv[2])
seen = 0
done = threading.Event()
def on_message(client, userdata, msg):
    global seen
    value = json.loads(msg.payload)
    seen += len(value) if isinstance(value, list) else 1
    if seen >= expected:
        print(json.dumps({"last": time.time()}), flush=True)
        done.set()
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-bench",
                clean_session=True, protocol=paho.MQTTv311)
c.on_message = on_message
c.on_connect = lambda c, u, f, r, p: c.subscribe([("careflow/v1/+/+/+", 1), ("careflow/v1/+/batch", 1)])
c.connect("127.0.0.1", port)
c.loop_start()
time.sleep(1.0)
print("ready", flush=True)
done.wait(600)
"""


def make_messages(total: int, per_message: int) -> list[tuple[str, bytes]]:
    sources = [Stamper(gateway=f"gw-{g:04d}", device=f"dev-{d}", boot="bench")
               for g in range(100) for d in range(10)]
    messages: list[tuple[str, bytes]] = []
    if per_message == 1:
        for i in range(total):
            e = sources[i % len(sources)].stamp("heartbeat", {"interval_s": 60, "battery_pct": 80})
            messages.append((event_topic(e["gateway"], e["device"], "heartbeat"),
                             json.dumps(e).encode()))
        return messages
    for g in range(total // per_message):
        gateway = f"gw-{g % 100:04d}"
        group = [s for s in sources if s.gateway == gateway]
        batch = [group[i % len(group)].stamp("heartbeat", {"interval_s": 60})
                 for i in range(per_message)]
        messages.append((batch_topic(gateway), json.dumps(batch).encode()))
    return messages


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    url = parse_broker_url(f"mqtt://127.0.0.1:{port}")
    client = make_client(client_id=f"bench-pub-{time.time_ns()}", clean_session=True, url=url)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    connect_blocking(client, url)
    start = time.time()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()
    return start


def run_raw(port: int, messages: list[tuple[str, bytes]], events: int) -> float:
    sub = subprocess.Popen([sys.executable, "-c", RAW_SUBSCRIBER, str(port), str(events)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    start = publish_all(port, messages)
    last = json.loads(sub.stdout.readline())["last"]
    sub.wait(timeout=30)
    return events / (last - start)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its children (the decode worker) have used so
    far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(cpu_s(int(child)) for child in children)


def run_hub(port: int, messages: list[tuple[str, bytes]], events: int,
            sync: str, profile: Path | None = None) -> tuple[float, float]:
    """Events/s of the hub, and events per CPU-second of the hub's processes (less noisy)."""
    data = Path(tempfile.mkdtemp(prefix="careflow-bench-"))
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(data), "CAREFLOW_SQLITE_SYNC": sync,
           "CAREFLOW_BROKER_URL": f"mqtt://127.0.0.1:{port}",
           "CAREFLOW_HUB_CLIENT_ID": f"bench-hub-{time.time_ns()}"}
    command = careflow_cmd("hub", "--log-level", "warning")
    if profile is not None:  # sample the hub and its decode worker; see --profile
        command = ["py-spy", "record", "--subprocesses", "--threads", "--format", "raw",
                   "--rate", "250", "--output", str(profile), "--", *command]
    log = data / "hub.log"  # the hub's own output, out of the table's way
    with log.open("wb") as out:
        hub = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    while not (data / "careflow.db").exists():
        if hub.poll() is not None:
            raise SystemExit(f"the hub exited with {hub.returncode}; see {log}")
        time.sleep(0.05)
    store = SqliteStore(data / "careflow.db")
    while not (store.read_health() or (0, {}))[1].get("connected"):
        time.sleep(0.05)
    cpu_before = cpu_s(hub.pid)
    start = publish_all(port, messages)
    # Poll the log's last position (one index lookup), not COUNT(*): counting a growing table
    # every 10 ms took a large share of a core by the end of a long run, slowing the hub it
    # measures. Positions are consecutive from an empty store, and the count is checked below.
    while store.last_pos() < events:
        time.sleep(0.01)
    done = time.time()
    stored = store.count(EventFilter())
    if stored != events:
        msg = f"the hub stored {stored} events of {events}"
        raise SystemExit(msg)
    cpu = cpu_s(hub.pid) - cpu_before
    hub.send_signal(signal.SIGINT if profile is not None else signal.SIGTERM)
    hub.wait(timeout=60)
    return events / (done - start), events / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="single-event messages")
    parser.add_argument("--batch-events", type=int, default=200_000, help="events in batches")
    parser.add_argument("--sync", default="full", choices=["full", "normal"])
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each hub run with py-spy (pip install py-spy) into DIR as "
                             "collapsed stacks, one file per mode")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each mode N times, raw and hub alternating, and add a median "
                             "row (the machine's noise is ±30%% run to run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            rows: list[dict[str, Any]] = []
            for label, total, per in (("single", args.events, 1),
                                      ("batch100", args.batch_events, 100)):
                runs = [measure(broker.port, label, total, per, args, run)
                        for run in range(args.repeat)]
                rows += runs
                if args.repeat > 1:
                    rows.append(median_row(runs))
        finally:
            broker.stop()
    print(f"{'mode':<10}{'events':>9}{'raw ev/s':>11}{'hub ev/s':>11}{'hub/raw':>9}"
          f"{'hub ev/cpu-s':>14}")
    for r in rows:
        print(f"{r['mode']:<10}{r['events']:>9}{r['raw_events_per_s']:>11}"
              f"{r['hub_events_per_s']:>11}{r['ratio']:>9}{r['hub_events_per_cpu_s']:>14}")
    print(json.dumps({"sync": args.sync, "results": rows}))


def measure(port: int, label: str, total: int, per: int, args: argparse.Namespace,
            run: int) -> dict[str, Any]:
    """One raw run, then one hub run, of the same messages (the hub's with fresh ids)."""
    raw = run_raw(port, make_messages(total, per), total)
    profile = args.profile / f"hub-{label}-{run}.txt" if args.profile else None
    hub, per_cpu = run_hub(port, make_messages(total, per), total, args.sync, profile)
    return {"mode": label, "events": total, "raw_events_per_s": round(raw),
            "hub_events_per_s": round(hub), "ratio": round(hub / raw, 2),
            "hub_events_per_cpu_s": round(per_cpu)}


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each column over repeated runs of one mode."""
    row: dict[str, Any] = {"mode": f"{runs[0]['mode']} med", "events": runs[0]["events"]}
    for key in ("raw_events_per_s", "hub_events_per_s", "ratio", "hub_events_per_cpu_s"):
        row[key] = statistics.median(r[key] for r in runs)
    return row

if __name__ == "__main__":
    main()
