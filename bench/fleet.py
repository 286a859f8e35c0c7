"""A simulated fleet against a real Mosquitto and hub: can one machine carry it, and at what cost?

    .venv/bin/python bench/fleet.py [--gateways 1000] [--devices 10] [--interval 60] [--seconds 120]

Runs `careflow hub` and `careflow simulate` as separate processes (each simulated gateway is the
real agent code), waits for the fleet to connect, then measures for --seconds: the hub's CPU and
commit lag, the simulator's CPU and RSS, events per second stored, and whether any simulated
gateway's outbox is growing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.edge_agent import cpu_s, rss_mb
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import Mosquitto, careflow_cmd


def family(pid: int) -> list[int]:
    """A process and its children (the simulator runs its fleet in child processes)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def family_cpu_s(pid: int) -> float:
    return sum(cpu_s(p) for p in family(pid))


def family_rss_mb(pid: int) -> float:
    return sum(rss_mb(p) for p in family(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--interval", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="careflow-fleet-"))
    broker = Mosquitto(tmp)
    broker.start()
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(tmp / "hub"), "CAREFLOW_BROKER_URL": broker.url}
    hub = subprocess.Popen(careflow_cmd("hub", "--log-level", "warning"), env=env)
    time.sleep(2)
    sim_log = (tmp / "simulate.log").open("w")
    sim = subprocess.Popen(careflow_cmd("simulate", "--gateways", str(args.gateways),
                                        "--devices-per-gateway", str(args.devices),
                                        "--interval", str(args.interval)),
                           env=env, stdout=sim_log, stderr=subprocess.STDOUT)
    store = SqliteStore(tmp / "hub" / "careflow.db")
    try:
        start = time.monotonic()
        while len(store.presence()) < args.gateways and time.monotonic() - start < 300:
            time.sleep(1)
        ramp = time.monotonic() - start
        online = sum(p.state == "online" for p in store.presence().values())
        hub_cpu0, sim_cpu0 = cpu_s(hub.pid), family_cpu_s(sim.pid)
        events0 = store.count(EventFilter())
        t0 = time.monotonic()
        lags: list[float] = []
        peak_rss = 0.0
        while time.monotonic() - t0 < args.seconds:
            health = (store.read_health() or (0, {}))[1]
            lags.append(float(health.get("commit_latency_ms") or 0))
            peak_rss = max(peak_rss, family_rss_mb(sim.pid))
            time.sleep(2)
        elapsed = time.monotonic() - t0
        events = store.count(EventFilter()) - events0
        result = {
            "gateways": args.gateways, "devices_per_gateway": args.devices,
            "interval_s": args.interval, "connect_all_s": round(ramp, 1), "online": online,
            "events_per_s": round(events / elapsed, 1),
            "expected_events_per_s": round(args.gateways * (args.devices + 1) / args.interval, 1),
            "hub_cpu_pct": round((cpu_s(hub.pid) - hub_cpu0) / elapsed * 100, 1),
            "hub_commit_lag_ms_max": max(lags, default=0.0),
            "hub_commit_lag_ms_median": sorted(lags)[len(lags) // 2] if lags else 0.0,
            "simulator_cpu_pct": round((family_cpu_s(sim.pid) - sim_cpu0) / elapsed * 100, 1),
            "simulator_rss_mb": round(peak_rss, 1),
            "gaps": store.total_gaps(), "dead_letters": store.dead_letter_count(),
        }
        print(json.dumps(result, indent=2))
        print("last simulator lines:\n" + "".join((tmp / "simulate.log").read_text()
                                                   .splitlines(keepends=True)[-3:]))
    finally:
        sim.terminate()
        sim.wait(timeout=120)
        hub.terminate()
        hub.wait(timeout=30)
        broker.stop()


if __name__ == "__main__":
    main()
