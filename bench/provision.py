"""Time from registration to active: one gateway, then N gateways claiming at once.

Runs a broker, the hub and its provisioning service in this process, and real gateway code
(``claim_identity`` then ``EdgeAgent``) on threads. Prints the figures; never part of the test
suite.

    .venv/bin/python bench/provision.py [--gateways 200] [--tls]

``--tls`` runs Mosquitto with the shipped configuration that ``careflow ca init`` renders: claims
on the claim listener with the claim certificate, then each gateway on the device listener with
its own certificate (the production path). Without it, the embedded amqtt broker (demo path).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from careflow.core import clock
from careflow.core.config import BrokerUrl, TlsFiles, load_settings
from careflow.edge.agent import EdgeAgent, load_agent_config
from careflow.edge.claim import claim_identity
from careflow.hub.app import build_hub
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import hash_token, new_token
from careflow.provisioning.service import Provisioning
from tests.conftest import MOSQUITTO, free_port, wait_for_port

GATEWAYS_PER_PROCESS = 50  # paho uses select(): descriptors above 1023 break it, ~3 per client


def run_gateways(jobs: list[tuple[str, str]], broker: BrokerUrl, root: Path,
                 claim_tls: TlsFiles | None, stop: Any, errors: Any) -> None:
    """One worker process: claim every serial at once, then run each gateway's agent."""
    agents: list[EdgeAgent] = []
    lock = threading.Lock()

    def gateway(serial: str, token: str) -> None:
        try:
            result = claim_identity(serial=serial, token=token, broker=broker,
                                    out=root / serial, tls=claim_tls, timeout_s=120)
            agent = EdgeAgent(load_agent_config(result.edge_config,
                                                {"heartbeat_interval_s": 60}))
            with lock:
                agents.append(agent)
            threading.Thread(target=agent.run, daemon=True).start()
        except Exception as exc:
            errors.put(f"{serial}: {exc}")

    for serial, token in jobs:
        threading.Thread(target=gateway, args=(serial, token), daemon=True).start()
    stop.wait()
    for agent in agents:
        agent.stop()


def onboard(prov: Provisioning, broker: BrokerUrl, root: Path, count: int, first: int,
            claim_tls: TlsFiles | None, workers: list[Any], stop: Any) -> list[float]:
    """Register ``count`` serials, have them all claim at once from worker processes and run
    their agents; seconds from registration to active, per gateway."""
    now_ms = clock.now_ms()
    tokens: dict[str, str] = {}
    started: dict[str, float] = {}
    for i in range(count):
        serial = f"B{first + i:05d}"
        tokens[serial] = new_token()
        started[serial] = time.monotonic()
        prov.registry.register(serial=serial, site="bench", gateway_id=f"gw-{serial.lower()}",
                               token_hash=hash_token(tokens[serial]),
                               token_expires_ms=now_ms + 3_600_000, replace=False, now_ms=now_ms)
    context = multiprocessing.get_context("spawn")  # the hub's threads must not be forked
    errors = context.Queue()
    jobs = list(tokens.items())
    for at in range(0, len(jobs), GATEWAYS_PER_PROCESS):
        worker = context.Process(target=run_gateways, daemon=True, args=(
            jobs[at:at + GATEWAYS_PER_PROCESS], broker, root, claim_tls, stop, errors))
        worker.start()
        workers.append(worker)
    done: dict[str, float] = {}
    deadline = time.monotonic() + 300
    failures: list[str] = []
    while len(done) < count and time.monotonic() < deadline and not failures:
        for record in prov.registry.records():
            if record.serial in tokens and record.state == "active" and record.serial not in done:
                done[record.serial] = time.monotonic() - started[record.serial]
        while not errors.empty():
            failures.append(errors.get())
        time.sleep(0.05)
    if failures or len(done) < count:
        print(f"FAILED: {len(done)}/{count} active; errors: {failures[:5]}")
    return sorted(done.values())


def start_tls_broker(root: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """Mosquitto with the configuration `careflow ca init` renders (root: it cannot drop to the
    mosquitto user and still read a temporary directory)."""
    device_port, claim_port = free_port(), free_port()
    pki_mod.init_pki(root / "pki", now=datetime.now(UTC), device_port=device_port,
                     claim_port=claim_port, bind="127.0.0.1", persistence_dir=root / "broker")
    pki = pki_mod.load_pki(root / "pki")
    conf = root / "mosquitto.conf"
    conf.write_text("user root\n" + pki.broker_conf_path.read_text().replace(
        "log_dest stdout", f"log_dest file {root}/mosquitto.log"))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(device_port)
    wait_for_port(claim_port)
    return proc, device_port, claim_port


def main() -> None:
    """Run both measurements and print them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", type=int, default=200)
    parser.add_argument("--tls", action="store_true",
                        help="Mosquitto with the shipped TLS configuration (else embedded amqtt)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mosquitto: subprocess.Popen[bytes] | None = None
        claim_tls: TlsFiles | None = None
        if args.tls:
            mosquitto, device_port, claim_port = start_tls_broker(root)
            pki = pki_mod.load_pki(root / "pki")
            settings = load_settings({
                "CAREFLOW_DATA_DIR": str(root / "data"), "CAREFLOW_PKI_DIR": str(root / "pki"),
                "CAREFLOW_BROKER_URL": f"mqtts://127.0.0.1:{device_port}",
                "CAREFLOW_BROKER_CA": str(pki.device_ca_path),
                "CAREFLOW_BROKER_CERT": str(pki.cert_path("hub")),
                "CAREFLOW_BROKER_KEY": str(pki.key_path("hub"))})
            claim_url = BrokerUrl("127.0.0.1", claim_port, tls=True)
            claim_tls = TlsFiles(ca=pki.device_ca_path, cert=pki.cert_path("claim"),
                                 key=pki.key_path("claim"))
        else:
            port = free_port()
            pki_mod.init_pki(root / "pki", now=datetime.now(UTC), force=True)
            settings = load_settings({"CAREFLOW_DATA_DIR": str(root / "data"),
                                      "CAREFLOW_LISTEN": f"127.0.0.1:{port}",
                                      "CAREFLOW_PKI_DIR": str(root / "pki")})
            claim_url = settings.effective_broker_url
        # the hub as `careflow hub` wires it (embedded broker without --tls, the claim service
        # of CAREFLOW_PKI_DIR), without alerting and decoding in this process
        hub = build_hub(settings, rules=None, channels={}, decode_worker=False)
        prov = hub.provisioning
        assert prov is not None  # CAREFLOW_PKI_DIR is set
        workers: list[Any] = []
        stop = multiprocessing.get_context("spawn").Event()
        mode = "Mosquitto, shipped TLS configuration" if args.tls else "embedded amqtt, no TLS"
        try:
            hub.start()  # the broker, then the claim service
            hub.run_in_thread()
            one = onboard(prov, claim_url, root / "gw", 1, 0, claim_tls, workers, stop)
            print(f"[{mode}] 1 gateway: register → active {one[0]:.2f} s" if one
                  else "1 gateway: FAILED")
            t0 = time.monotonic()
            many = onboard(prov, claim_url, root / "gw", args.gateways, 1, claim_tls,
                           workers, stop)
            wall = time.monotonic() - t0
            if many:
                print(f"[{mode}] {args.gateways} gateways at once: all active in "
                      f"{wall:.1f} s; per gateway median {statistics.median(many):.1f} s, "
                      f"max {many[-1]:.1f} s; {len(many) / wall:.1f} gateways/s; "
                      f"answers {dict(prov.service.answered)}")
        finally:
            stop.set()
            for worker in workers:
                worker.join(15)
            hub.close()
            if mosquitto is not None:
                mosquitto.terminate()
                mosquitto.wait(10)


if __name__ == "__main__":
    main()
