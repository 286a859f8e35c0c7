"""Edge agent footprint: RSS and CPU of `careflow edge run` at idle and at 100 events/s.

    .venv/bin/python bench/edge_agent.py [--seconds 30] [--rate 100]

Starts a private Mosquitto and a hub, then the agent as its own process; feeds it readings
through its spool directory (the real local input). Target from the edge issue: RSS <= 40 MB.
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

from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import Mosquitto, careflow_cmd


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, seconds: float) -> tuple[float, float]:
    """(CPU %, peak RSS MB) over ``seconds``."""
    start_cpu, start = cpu_s(pid), time.monotonic()
    peak = 0.0
    while time.monotonic() - start < seconds:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.5)
    return (cpu_s(pid) - start_cpu) / (time.monotonic() - start) * 100, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=int, default=100, help="events per second under load")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="careflow-edge-bench-"))
    broker = Mosquitto(tmp)
    broker.start()
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(tmp / "hub"), "CAREFLOW_BROKER_URL": broker.url}
    hub = subprocess.Popen(careflow_cmd("hub", "--log-level", "warning"), env=env)
    agent = subprocess.Popen(careflow_cmd("edge", "run", "--gateway", "gw-bench", "--broker",
                                          broker.url, "--data-dir", str(tmp / "edge"),
                                          "--log-level", "warning"), env=env)
    try:
        time.sleep(3)
        idle_cpu, idle_rss = measure(agent.pid, args.seconds)
        spool = tmp / "edge" / "spool"
        sent = 0
        start = time.monotonic()
        start_cpu = cpu_s(agent.pid)
        peak = 0.0
        while time.monotonic() - start < args.seconds:
            lines = [json.dumps({"device": f"s{i % 10}", "type": "status",
                                 "data": {"state": "ok", "battery_pct": 80}})
                     for i in range(args.rate // 10)]
            part = spool / f"{time.time_ns()}.tmp"
            part.write_text("\n".join(lines) + "\n")
            part.rename(part.with_suffix(".jsonl"))
            sent += len(lines)
            peak = max(peak, rss_mb(agent.pid))
            time.sleep(0.1)
        load_cpu = (cpu_s(agent.pid) - start_cpu) / (time.monotonic() - start) * 100
        store = SqliteStore(tmp / "hub" / "careflow.db")
        deadline = time.monotonic() + 60
        while store.count(EventFilter(type="status")) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        stored = store.count(EventFilter(type="status"))
        rate = sent / args.seconds
        print(f"idle:        CPU {idle_cpu:5.1f} %   RSS {idle_rss:5.1f} MB")
        print(f"{rate:5.0f} ev/s:  CPU {load_cpu:5.1f} %   RSS {peak:5.1f} MB   "
              f"stored {stored}/{sent}")
        print(json.dumps({"idle_cpu_pct": round(idle_cpu, 1), "idle_rss_mb": round(idle_rss, 1),
                          "load_events_per_s": round(rate), "load_cpu_pct": round(load_cpu, 1),
                          "load_rss_mb": round(peak, 1), "stored": stored, "sent": sent}))
    finally:
        for proc in (agent, hub):
            proc.terminate()
            proc.wait(timeout=20)
        broker.stop()


if __name__ == "__main__":
    main()
