"""Builders the hub's tests share: committed batches, MQTT publishers, a real SMTP server and a
recording stand-in for the MQTT ingress."""

from __future__ import annotations

import json
from typing import Any

from aiosmtpd.controller import Controller

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.publish import publish_events
from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.ingest.decode import decode_message
from careflow.hub.ingest.ingress import IncomingMessage
from careflow.hub.store.records import EventFilter, IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.schemas.limits import MAX_BATCH_EVENTS
from tests.conftest import Mosquitto, heartbeat

BATCH_LIMIT = 256 * 1024  # the message size batch_of decodes under


def batch_of(events: list[dict[str, Any]], received_ms: int = 1_000) -> IncomingBatch:
    """``events`` as the hub would commit them: decoded from batches as gateways pack them."""
    by_gateway: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_gateway.setdefault(e["gateway"], []).append(e)
    accepted, rejected = [], []
    for gateway, items in by_gateway.items():
        for start in range(0, len(items), MAX_BATCH_EVENTS):  # as gateways pack them
            decoded = decode_message(f"careflow/v1/{gateway}/batch",
                                     json.dumps(items[start:start + MAX_BATCH_EVENTS]).encode(),
                                     max_bytes=BATCH_LIMIT)
            accepted += [(a, received_ms) for a in decoded.accepted]
            rejected += [(r, received_ms) for r in decoded.rejected]
    return IncomingBatch(accepted, rejected)


def publish(mosquitto: Mosquitto, events: list[dict[str, Any]], *, batch: bool = False) -> None:
    """Publish events through the broker as a gateway does (QoS 1)."""
    publish_events(parse_broker_url(mosquitto.url), events, client_id=f"test-{new_event_id()}",
                   batch=batch)


def publish_raw(mosquitto: Mosquitto, items: list[tuple[str, bytes]]) -> None:
    """Publish (topic, payload) pairs as they are, however wrong (QoS 1)."""
    url = parse_broker_url(mosquitto.url)
    client = make_client(client_id=f"raw-{new_event_id()}", clean_session=True, url=url)
    connect_blocking(client, url)
    try:
        for topic, payload in items:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def fleet_events(gateways: int, devices: int, per_device: int) -> list[dict[str, Any]]:
    """Heartbeats of ``devices`` devices behind each of ``gateways`` gateways."""
    events = []
    for g in range(gateways):
        for d in range(devices):
            source = Stamper(gateway=f"gw-{g}", device=f"dev-{d}", boot="boot-1")
            events += [heartbeat(source, battery_pct=50) for _ in range(per_device)]
    return events


class Mailbox:
    """A real SMTP server on a free loopback port that keeps what it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[str] = []
        mailbox = self

        class Handler:
            async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
                mailbox.messages.append(envelope.content.decode("utf-8", "replace"))
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port)

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class RecordingIngress:
    """Stands in for the MQTT ingress: records acks, and checks each against the store.

    A fake, not Mosquitto: what this test needs is the moment of each ack relative to the
    commit, which a broker does not show (the end-to-end tests against Mosquitto cover the rest).
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.acks: list[int] = []
        self.connected = True

    def ack(self, messages: list[IncomingMessage]) -> None:
        stored = {event.id for event in self.store.query(EventFilter(), limit=10**6)}
        for message in messages:
            ids = {event["id"] for event in json.loads(message.payload)}
            assert ids <= stored, f"message {message.mid} acknowledged before its commit"
            self.acks.append(message.mid)

    def publish(self, topic: str, payload: str, *, qos: int = 1) -> None:
        """Confirmations to gateways are not what this test looks at."""
