"""Time from registration to active: one gateway, then N gateways claiming at once.

Runs the embedded broker, the hub and its provisioning service in this process, and real
gateway code (``claim_identity`` then ``EdgeAgent``) on threads. Prints the figures; never part
of the test suite.

    .venv/bin/python bench/provision.py [--gateways 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.config import load_settings, parse_broker_url
from careflow.edge.agent import EdgeAgent, load_agent_config
from careflow.edge.claim import claim_identity
from careflow.hub.broker import EmbeddedBroker
from careflow.hub.service import HubService
from careflow.hub.sqlite_store import SqliteStore
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import hash_token, new_token
from careflow.provisioning.service import Provisioning
from tests.conftest import free_port


def onboard(prov: Provisioning, broker: str, root: Path, count: int,
            agents: list[EdgeAgent]) -> list[float]:
    """Register ``count`` serials, claim them all at once, run their agents; seconds each."""
    now_ms = time.time_ns() // 1_000_000
    tokens: dict[str, str] = {}
    started: dict[str, float] = {}
    for i in range(count):
        serial = f"B{len(agents) + i:05d}"
        tokens[serial] = new_token()
        started[serial] = time.monotonic()
        prov.registry.register(serial=serial, site="bench", gateway_id=f"gw-{serial.lower()}",
                               token_hash=hash_token(tokens[serial]),
                               token_expires_ms=now_ms + 3_600_000, replace=False, now_ms=now_ms)
    errors: list[str] = []
    lock = threading.Lock()

    def gateway(serial: str) -> None:
        try:
            result = claim_identity(serial=serial, token=tokens[serial],
                                    broker=parse_broker_url(broker), out=root / serial,
                                    timeout_s=120)
            agent = EdgeAgent(load_agent_config(result.edge_config,
                                                {"heartbeat_interval_s": 60}))
            with lock:
                agents.append(agent)
            threading.Thread(target=agent.run, daemon=True).start()
        except Exception as exc:
            errors.append(f"{serial}: {exc}")

    threads = [threading.Thread(target=gateway, args=(s,)) for s in tokens]
    for thread in threads:
        thread.start()
    done: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(done) < count and time.monotonic() < deadline and not errors:
        for record in prov.registry.records():
            if record.serial in tokens and record.state == "active" and record.serial not in done:
                done[record.serial] = time.monotonic() - started[record.serial]
        time.sleep(0.05)
    for thread in threads:
        thread.join(10)
    if errors or len(done) < count:
        print(f"FAILED: {len(done)}/{count} active; errors: {errors[:5]}")
    return sorted(done.values())


def main() -> None:
    """Run both measurements and print them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        pki_mod.init_pki(root / "pki", now=datetime.now(UTC), force=True)
        settings = load_settings({"CAREFLOW_DATA_DIR": str(root / "data"),
                                  "CAREFLOW_LISTEN": f"127.0.0.1:{port}",
                                  "CAREFLOW_PKI_DIR": str(root / "pki")})
        broker = EmbeddedBroker("127.0.0.1", port)
        broker.start()
        prov = Provisioning(settings, pki_dir=root / "pki")
        prov.start()
        store = SqliteStore(settings.db_path)
        hub = HubService(settings, store, provisioning=prov.activation)
        hub_thread = threading.Thread(target=hub.run, daemon=True)
        hub_thread.start()
        agents: list[EdgeAgent] = []
        broker_url = str(settings.effective_broker_url)
        try:
            one = onboard(prov, broker_url, root / "gw", 1, agents)
            print(f"1 gateway: register → active {one[0]:.2f} s" if one else "1 gateway: FAILED")
            t0 = time.monotonic()
            many = onboard(prov, broker_url, root / "gw", args.gateways, agents)
            wall = time.monotonic() - t0
            if many:
                print(f"{args.gateways} gateways at once: all active in {wall:.1f} s; per gateway "
                      f"median {statistics.median(many):.1f} s, max {many[-1]:.1f} s; "
                      f"{len(many) / wall:.1f} gateways/s; answers {dict(prov.service.answered)}")
        finally:
            for agent in agents:
                agent.stop()
            hub.stop()
            hub_thread.join(15)
            prov.stop()
            broker.stop()
            store.close()


if __name__ == "__main__":
    main()
