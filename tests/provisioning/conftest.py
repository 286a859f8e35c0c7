"""A real Mosquitto running the shipped TLS configuration, rendered by ``careflow ca init``."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization

from careflow.core.config import BrokerUrl, TlsFiles
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.agent import EdgeAgent, load_agent_config
from careflow.provisioning.pki import (
    Pki,
    init_pki,
    load_pki,
    make_csr,
    new_device_key,
    record_issued,
    sign_device_csr,
    write_atomic,
)
from tests.conftest import MOSQUITTO, free_port, wait_for_port


@dataclass
class TlsBroker:
    """The rendered shipped config running in Mosquitto, with its PKI."""

    pki: Pki
    device_port: int
    claim_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, port: int) -> BrokerUrl:
        return BrokerUrl("127.0.0.1", port, tls=True)

    @property
    def hub_tls(self) -> TlsFiles:
        return TlsFiles(ca=self.pki.device_ca_path, cert=self.pki.cert_path("hub"),
                        key=self.pki.key_path("hub"))

    @property
    def claim_tls(self) -> TlsFiles:
        return TlsFiles(ca=self.pki.device_ca_path, cert=self.pki.cert_path("claim"),
                        key=self.pki.key_path("claim"))

    def device_tls(self, gateway_id: str, workdir: Path) -> TlsFiles:
        """A device certificate issued the way the claim flow will: CSR in, certificate out."""
        key = new_device_key()
        now = datetime.now(UTC)
        cert = sign_device_csr(self.pki.device_ca, make_csr(key, gateway_id=gateway_id),
                               gateway_id=gateway_id, serial=f"SN-{gateway_id}", now=now)
        record_issued(self.pki, gateway_id, cert, now=now)
        cert_path, key_path = workdir / f"{gateway_id}.crt", workdir / f"{gateway_id}.key"
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), mode=0o600)
        return TlsFiles(ca=self.pki.device_ca_path, cert=cert_path, key=key_path)

    def client(self, port: int, tls: TlsFiles, client_id: str) -> paho.Client:
        url = self.url(port)
        client = make_client(client_id=client_id, clean_session=True, url=url, tls=tls)
        connect_blocking(client, url, timeout_s=5)
        return client


def mqtt_handshake(port: int, tls: TlsFiles, client_id: str) -> bool:
    """TLS handshake + MQTT CONNECT on a raw socket: True only if the broker answers CONNACK 0.

    Used to prove refusals quickly: paho would keep retrying in its own thread.
    """
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    ident = client_id.encode()
    body = (b"\x00\x04MQTT\x04\x02\x00\x1e" + len(ident).to_bytes(2, "big") + ident)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(bytes([0x10, len(body)]) + body)
            answer = conn.recv(4)
    except (OSError, ssl.SSLError):
        return False
    return answer[:1] == b"\x20" and answer[3:4] == b"\x00"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    directory = tmp_path / "pki"
    device_port, claim_port = free_port(), free_port()
    init_pki(directory, now=datetime.now(UTC), device_port=device_port, claim_port=claim_port,
             bind="127.0.0.1", persistence_dir=tmp_path / "data")
    pki = load_pki(directory)
    text = pki.broker_conf_path.read_text()  # exactly what `careflow ca init` rendered
    log = tmp_path / "mosquitto.log"
    # As root, Mosquitto would drop to the `mosquitto` user, who cannot read pytest's tmp dirs.
    text = "user root\n" + text.replace("log_dest stdout", f"log_dest file {log}")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(device_port)
    wait_for_port(claim_port)
    yield TlsBroker(pki, device_port, claim_port, proc, log)
    proc.terminate()
    proc.wait(timeout=10)


DAY_S = 86_400


class RenewalClock:
    """The agent's clock, 21 days ahead (past two thirds of 30) until its first renewal."""

    def __init__(self) -> None:
        self.agent: EdgeAgent | None = None

    def __call__(self) -> float:
        renewer = self.agent.renewer if self.agent is not None else None
        ahead = self.ahead and renewer is not None and renewer.state.renewals == 0
        return time.time() + (21 * DAY_S if ahead else 0)

    ahead = False


def run_agent(config_path: Path, clock: RenewalClock | None = None,
              ) -> tuple[EdgeAgent, threading.Thread]:
    """Start the agent of a claimed gateway in a thread (heartbeats each second)."""
    config = load_agent_config(config_path, {"heartbeat_interval_s": 1, "batch_linger_s": 0.1})
    agent = EdgeAgent(config, clock=clock or time.time)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread
