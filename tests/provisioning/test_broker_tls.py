"""The shipped TLS configuration in a real Mosquitto: two CAs, two listeners, per-identity ACLs."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.hub.store.records import EventFilter
from careflow.provisioning.pki import write_atomic
from tests.conftest import RunningHub, wait_until
from tests.provisioning.conftest import TlsBroker, mqtt_handshake

pytestmark = pytest.mark.broker


def recorder(client: paho.Client, *topics: str) -> list[str]:
    """Subscribe and collect the topics that arrive."""
    received: list[str] = []
    client.on_message = lambda _c, _u, m: received.append(m.topic)
    for topic in topics:
        client.subscribe(topic, qos=1)
    client.publish("careflow/v1/probe/ack/x", b"", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/v1/probe/ack/x" in received, what="subscriptions active")
    received.clear()
    return received


def close(*clients: paho.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_it_lets_a_device_publish_only_under_its_own_id(tls_broker: TlsBroker,
                                                        tmp_path: Path) -> None:
    hub = tls_broker.client(tls_broker.device_port, tls_broker.hub_tls, "careflow-hub")
    received = recorder(hub, "careflow/v1/#")
    gateway = tls_broker.client(tls_broker.device_port, tls_broker.device_tls("gw-a", tmp_path),
                                "careflow-gw-gw-a")
    gateway.publish("careflow/v1/gw-b/gw-b/heartbeat", b"{}", qos=1).wait_for_publish(5)
    gateway.publish("careflow/v1/gw-a/gw-a/heartbeat", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/v1/gw-a/gw-a/heartbeat" in received, what="own topic delivered")
    assert "careflow/v1/gw-b/gw-b/heartbeat" not in received
    close(hub, gateway)


def test_it_lets_a_claim_client_use_only_its_own_provisioning_topics(tls_broker: TlsBroker) -> None:
    hub = tls_broker.client(tls_broker.device_port, tls_broker.hub_tls, "careflow-hub")
    received = recorder(hub, "careflow/v1/#", "careflow/provision/+/request")
    claimer = tls_broker.client(tls_broker.claim_port, tls_broker.claim_tls, "gw-new")
    replies: list[str] = []
    claimer.on_message = lambda _c, _u, m: replies.append(m.topic)
    claimer.subscribe([("careflow/provision/gw-new/accepted", 1),
                       ("careflow/provision/gw-other/accepted", 1)])
    for topic in ("careflow/v1/gw-new/gw-new/heartbeat", "careflow/provision/gw-other/request",
                  "careflow/provision/gw-new/request"):
        claimer.publish(topic, b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/provision/gw-new/request" in received, what="own request")
    assert received == ["careflow/provision/gw-new/request"]
    # The hub answers from the device listener; the claim client reads only its own answer.
    hub.publish("careflow/provision/gw-other/accepted", b"{}", qos=1).wait_for_publish(5)
    hub.publish("careflow/provision/gw-new/accepted", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/provision/gw-new/accepted" in replies, what="own answer")
    assert replies == ["careflow/provision/gw-new/accepted"]
    close(hub, claimer)


def test_it_refuses_each_certificate_on_the_other_listener(tls_broker: TlsBroker,
                                                           tmp_path: Path) -> None:
    device = tls_broker.device_tls("gw-a", tmp_path)
    assert mqtt_handshake(tls_broker.device_port, device, "careflow-gw-gw-a")
    assert mqtt_handshake(tls_broker.claim_port, tls_broker.claim_tls, "gw-a")
    assert not mqtt_handshake(tls_broker.device_port, tls_broker.claim_tls, "gw-a")
    assert not mqtt_handshake(tls_broker.claim_port, device, "gw-a")
    assert not mqtt_handshake(tls_broker.claim_port, tls_broker.hub_tls, "gw-a")


def test_it_honours_a_deny_block_over_the_gateway_pattern(tls_broker: TlsBroker,
                                                          tmp_path: Path) -> None:
    """Mosquitto 2.0.11 checks `topic deny` before the pattern grants: the ACL half of revoke."""
    acl = tls_broker.pki.device_acl_path
    write_atomic(acl, (acl.read_text() + "\nuser gw-d\ntopic deny #\n").encode())
    tls_broker.proc.send_signal(signal.SIGHUP)
    hub = tls_broker.client(tls_broker.device_port, tls_broker.hub_tls, "careflow-hub")
    received = recorder(hub, "careflow/v1/#")
    denied = tls_broker.client(tls_broker.device_port, tls_broker.device_tls("gw-d", tmp_path),
                               "careflow-gw-gw-d")
    allowed = tls_broker.client(tls_broker.device_port, tls_broker.device_tls("gw-e", tmp_path),
                                "careflow-gw-gw-e")
    denied.publish("careflow/v1/gw-d/gw-d/heartbeat", b"{}", qos=1).wait_for_publish(5)
    allowed.publish("careflow/v1/gw-e/gw-e/heartbeat", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/v1/gw-e/gw-e/heartbeat" in received, what="allowed gateway")
    assert "careflow/v1/gw-d/gw-d/heartbeat" not in received
    close(hub, denied, allowed)


def test_it_carries_an_agents_events_to_the_hub_and_confirmations_back(
        tls_broker: TlsBroker, tmp_path: Path, hub_factory: Callable[..., RunningHub]) -> None:
    """The hub with its device-CA certificate, as `careflow ca init` tells operators to run it."""
    hub = hub_factory(f"mqtts://127.0.0.1:{tls_broker.device_port}",
                      CAREFLOW_BROKER_CA=str(tls_broker.pki.device_ca_path),
                      CAREFLOW_BROKER_CERT=str(tls_broker.pki.cert_path("hub")),
                      CAREFLOW_BROKER_KEY=str(tls_broker.pki.key_path("hub")))
    tls = tls_broker.device_tls("gw-e2e", tmp_path)
    agent = EdgeAgent(AgentConfig(
        gateway="gw-e2e", broker=parse_broker_url(f"mqtts://127.0.0.1:{tls_broker.device_port}"),
        data_dir=tmp_path / "edge", ca_file=tls.ca, cert_file=tls.cert, key_file=tls.key,
        batch_linger_s=0.1))
    agent.start()
    try:
        wait_until(lambda: agent.connected, what="the agent over mutual TLS")
        agent.add("gw-e2e", "status", {"state": "ok"})
        agent.tick()
        wait_until(lambda: hub.store.count(EventFilter(gateway="gw-e2e", type="status")) == 1,
                   what="the event stored by the hub")
        wait_until(lambda: agent.outbox.size() == 0, what="the hub's confirmation (ack)")
    finally:
        agent.shutdown()
