"""The claim flow on real Mosquitto with the shipped TLS configuration (``careflow ca init``):
claim listener with the claim certificate → device listener with the gateway's own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from careflow.core import clock
from careflow.core.errors import BrokerError
from careflow.edge.claim import ClaimResult, claim_identity
from careflow.hub.app import AUTO
from careflow.hub.store.records import EventFilter
from careflow.provisioning.claims import hash_token
from careflow.provisioning.pki import current_certificate
from careflow.provisioning.service import Provisioning
from tests.conftest import RunningHub, make_settings, wait_until
from tests.provisioning.conftest import RenewalClock, TlsBroker, mqtt_handshake, run_agent

pytestmark = pytest.mark.broker


@dataclass
class TlsHub:
    """The hub answering claims on the device listener of the shipped TLS configuration."""

    broker: TlsBroker
    provisioning: Provisioning
    hub: RunningHub

    def register(self, serial: str, gateway_id: str, token: str = "t0ken") -> None:
        now_ms = clock.now_ms()
        self.provisioning.registry.register(serial=serial, site="lab", gateway_id=gateway_id,
                                            token_hash=hash_token(token),
                                            token_expires_ms=now_ms + 60_000, replace=False,
                                            now_ms=now_ms)

    def claim(self, serial: str, out: Path, token: str = "t0ken") -> ClaimResult:
        return claim_identity(serial=serial, token=token,
                              broker=self.broker.url(self.broker.claim_port), out=out,
                              tls=self.broker.claim_tls, timeout_s=10)

    def active(self, serial: str) -> bool:
        record = self.provisioning.registry.get(serial)
        return record is not None and record.state == "active"


@pytest.fixture
def tls_hub(tls_broker: TlsBroker, tmp_path: Path) -> Iterator[TlsHub]:
    pki = tls_broker.pki
    settings = make_settings(
        tmp_path / "data", f"mqtts://127.0.0.1:{tls_broker.device_port}",
        CAREFLOW_PKI_DIR=str(pki.dir), CAREFLOW_BROKER_CA=str(pki.device_ca_path),
        CAREFLOW_BROKER_CERT=str(pki.cert_path("hub")), CAREFLOW_BROKER_KEY=str(pki.key_path("hub")))
    hub = RunningHub(settings, provisioning=AUTO).start()  # the claim service of CAREFLOW_PKI_DIR
    assert hub.provisioning is not None
    yield TlsHub(tls_broker, hub.provisioning, hub)
    hub.stop()


def test_it_claims_on_the_claim_listener_and_runs_on_the_device_listener(
        tls_hub: TlsHub, tmp_path: Path) -> None:
    broker = tls_hub.broker
    tls_hub.register("SN-TLS", "gw-sn-tls")
    # the claim certificate opens the claim listener only, never the device listener
    assert not mqtt_handshake(broker.device_port, broker.claim_tls, "claim-SN-TLS")
    result = tls_hub.claim("SN-TLS", tmp_path / "gw")
    assert result.broker_url == f"mqtts://127.0.0.1:{broker.device_port}"
    agent, thread = run_agent(result.edge_config)
    try:
        wait_until(lambda: tls_hub.active("SN-TLS"), timeout_s=15, what="active over mutual TLS")
    finally:
        agent.stop()
        thread.join(10)


def test_it_refuses_a_claim_without_the_claim_certificate(tls_broker: TlsBroker,
                                                          tmp_path: Path) -> None:
    device_only = tls_broker.device_tls("gw-other", tmp_path)
    with pytest.raises(BrokerError):
        claim_identity(serial="SN-X", token="t", broker=tls_broker.url(tls_broker.claim_port),
                       out=tmp_path / "gw", tls=device_only, timeout_s=3)


def test_it_renews_over_mutual_tls_with_no_gap_in_events(tls_hub: TlsHub,
                                                         tmp_path: Path) -> None:
    """The production path of rotation: the renewal request goes out on the device listener
    under the current certificate; the agent reconnects with the new one and loses nothing."""
    registry, store = tls_hub.provisioning.registry, tls_hub.hub.store
    tls_hub.register("SN-ROT", "gw-sn-rot")
    result = tls_hub.claim("SN-ROT", tmp_path / "gw")
    first = registry.get("SN-ROT")
    assert first is not None
    clock = RenewalClock()
    agent, thread = run_agent(result.edge_config, clock)
    try:
        wait_until(lambda: tls_hub.active("SN-ROT"), timeout_s=15, what="active over mutual TLS")
        clock.agent, clock.ahead = agent, True
        sent, deadline = 0, time.monotonic() + 20
        while agent.renewer is not None and agent.renewer.state.renewals == 0:
            assert time.monotonic() < deadline, "no renewal within 20 s"
            agent.add("door-1", "status", {"state": "ok", "n": sent})
            sent += 1
            time.sleep(0.05)
        for _ in range(20):
            agent.add("door-1", "status", {"state": "ok", "n": sent})
            sent += 1
        wait_until(lambda: store.count(EventFilter(gateway="gw-sn-rot", device="door-1")) == sent,
                   timeout_s=20, what="every event, across the certificate swap")
        wait_until(lambda: agent.connected, what="reconnected with the new certificate")
    finally:
        agent.stop()
        thread.join(10)
    renewed = registry.get("SN-ROT")
    assert renewed is not None and renewed.cert_serial != first.cert_serial
    assert store.total_gaps() == 0
    # the issued index (what revocation acts on) now names the renewed certificate
    current = current_certificate(tls_hub.broker.pki, "gw-sn-rot")
    assert current is not None and format(current.serial, "x") in renewed.cert_serial.lower()
