"""The claim flow on real Mosquitto with the shipped TLS configuration (``careflow ca init``):
claim listener with the claim certificate → device listener with the gateway's own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from careflow.edge.agent import EdgeAgent, load_agent_config
from careflow.edge.claim import claim_identity
from careflow.errors import BrokerError
from careflow.provisioning.claims import hash_token
from careflow.provisioning.service import Provisioning
from tests.conftest import RunningHub, make_settings, wait_until
from tests.provisioning.conftest import TlsBroker, mqtt_handshake

pytestmark = pytest.mark.broker


def test_it_claims_on_the_claim_listener_and_runs_on_the_device_listener(
        tls_broker: TlsBroker, tmp_path: Path) -> None:
    pki = tls_broker.pki
    device_url = f"mqtts://127.0.0.1:{tls_broker.device_port}"
    settings = make_settings(
        tmp_path / "data", device_url, CAREFLOW_PKI_DIR=str(pki.dir),
        CAREFLOW_BROKER_CA=str(pki.device_ca_path), CAREFLOW_BROKER_CERT=str(pki.cert_path("hub")),
        CAREFLOW_BROKER_KEY=str(pki.key_path("hub")))
    provisioning = Provisioning(settings, pki_dir=pki.dir)
    provisioning.start()
    hub = RunningHub(settings, provisioning=provisioning.activation).start()
    try:
        now_ms = time.time_ns() // 1_000_000
        provisioning.registry.register(serial="SN-TLS", site="lab", gateway_id="gw-sn-tls",
                                       token_hash=hash_token("t0ken"),
                                       token_expires_ms=now_ms + 60_000, replace=False,
                                       now_ms=now_ms)
        # the claim certificate opens the claim listener only, never the device listener
        assert not mqtt_handshake(tls_broker.device_port, tls_broker.claim_tls, "claim-SN-TLS")
        result = claim_identity(serial="SN-TLS", token="t0ken",
                                broker=tls_broker.url(tls_broker.claim_port), out=tmp_path / "gw",
                                tls=tls_broker.claim_tls, timeout_s=10)
        assert result.broker_url == device_url
        agent = EdgeAgent(load_agent_config(result.edge_config, {"heartbeat_interval_s": 1}))
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            wait_until(lambda: (r := provisioning.registry.get("SN-TLS")) is not None
                       and r.state == "active", timeout_s=15, what="active over mutual TLS")
        finally:
            agent.stop()
            runner.join(10)
    finally:
        hub.stop()
        provisioning.stop()


def test_it_refuses_a_claim_without_the_claim_certificate(tls_broker: TlsBroker,
                                                          tmp_path: Path) -> None:
    device_only = tls_broker.device_tls("gw-other", tmp_path)
    with pytest.raises(BrokerError):
        claim_identity(serial="SN-X", token="t", broker=tls_broker.url(tls_broker.claim_port),
                       out=tmp_path / "gw", tls=device_only, timeout_s=3)
