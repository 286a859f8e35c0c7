"""Hostile requests against the real provisioning service over a real Mosquitto: no request,
however it is built, stops the service from answering the next one."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from careflow.core import clock
from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.claim import claim_identity
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import hash_token
from careflow.provisioning.protocol import rejected_topic, renew_topic, request_topic
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.service import DeviceConfig, ProvisioningService
from tests.conftest import Mosquitto, make_settings, wait_until

pytestmark = pytest.mark.broker


@dataclass
class Running:
    service: ProvisioningService
    registry: SqliteProvisioningRegistry
    broker_url: str


@pytest.fixture
def running(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Running]:
    pki_mod.init_pki(tmp_path / "pki", now=datetime.now(UTC), force=True)
    settings = make_settings(tmp_path / "data", mosquitto.url)
    registry = SqliteProvisioningRegistry(settings.db_path, synchronous="normal")
    service = ProvisioningService(settings, registry, pki_mod.load_pki(tmp_path / "pki"),
                                  device=DeviceConfig(broker_url=mosquitto.url))
    service.start()
    yield Running(service, registry, mosquitto.url)
    service.stop()
    registry.close()


class Listener:
    """A client of its own on the broker that keeps what arrives on the topics it watches."""

    def __init__(self, broker_url: str, *topics: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        url = parse_broker_url(broker_url)
        self.client = make_client(client_id=f"listener-{time.time_ns()}", clean_session=True,
                                  url=url)
        self.client.on_message = self._keep
        self.client.on_subscribe = lambda *_: subscribed.set()
        connect_blocking(self.client, url, timeout_s=10,
                         on_connected=lambda c: c.subscribe([(t, 1) for t in topics]))
        assert subscribed.wait(10), "the broker did not confirm the subscription"

    def _keep(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload)))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def answers(self, topic: str) -> list[dict[str, object]]:
        with self._lock:
            return [json.loads(p) for t, p in self.received if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


NESTED = b'{"serial": "SN-X", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"  # 20 KB


def assert_a_real_claim_is_served(running: Running, serial: str, gateway_id: str,
                                  out: Path) -> None:
    """Register ``serial`` as ``gateway_id`` and claim it as a gateway would: still served."""
    now_ms = clock.now_ms()
    running.registry.register(serial=serial, site="lab", gateway_id=gateway_id,
                              token_hash=hash_token("t0ken"), token_expires_ms=now_ms + 60_000,
                              replace=False, now_ms=now_ms)
    result = claim_identity(serial=serial, token="t0ken",
                            broker=parse_broker_url(running.broker_url), out=out, timeout_s=10)
    assert result.gateway_id == gateway_id


@pytest.mark.parametrize("topic", [request_topic("claim-evil"), renew_topic("claim-evil")])
def test_it_answers_a_real_claim_after_a_deeply_nested_request(
        running: Running, tmp_path: Path, topic: str) -> None:
    listener = Listener(running.broker_url, rejected_topic("claim-evil"))
    try:
        listener.publish(topic, NESTED)
        wait_until(lambda: bool(listener.answers(rejected_topic("claim-evil"))), timeout_s=10,
                   what="the nested request refused")
        [answer] = listener.answers(rejected_topic("claim-evil"))
        assert answer["code"] == "bad_request", answer
        assert "deep" in str(answer["message"])
    finally:
        listener.close()

    assert_a_real_claim_is_served(running, "SN-1", "gw-sn-1", tmp_path / "gw")


def test_it_keeps_serving_when_answering_a_request_fails(
        running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any bug in serving one request (here: handling itself raises) is logged, counted and
    answered with an error; the next request is served."""
    original = running.service.handle
    calls = 0

    def flaky(topic: str, payload: bytes) -> list[tuple[str, str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RecursionError("a bug nobody foresaw")
        return original(topic, payload)

    monkeypatch.setattr(running.service, "handle", flaky)
    listener = Listener(running.broker_url, rejected_topic("claim-SN-2"))
    try:
        listener.publish(request_topic("claim-SN-2"), b"{}")
        wait_until(lambda: bool(listener.answers(rejected_topic("claim-SN-2"))), timeout_s=10,
                   what="the failed request answered")
        [answer] = listener.answers(rejected_topic("claim-SN-2"))
        assert answer["code"] == "internal_error", answer
    finally:
        listener.close()
    assert running.service.answered["internal_error"] == 1
    assert_a_real_claim_is_served(running, "SN-2", "gw-sn-2", tmp_path / "gw")
