"""MQTT ingress of the hub: a persistent QoS 1 session with acknowledgements sent after commit.

paho's network thread puts each message on a bounded queue; when the queue is full the put
blocks, so TCP back-pressure slows the broker down instead of the hub growing its memory.
A message is PUBACKed only once the service has committed it (``manual_ack``), so the broker
redelivers anything the hub had not stored when it died.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import paho.mqtt.client as paho

from careflow.config import Settings
from careflow.mqtt import check, connect_blocking, make_client
from careflow.schemas import EVENT_SUBSCRIPTIONS

__all__ = ["IncomingMessage", "MqttIngress"]

log = logging.getLogger(__name__)


class IncomingMessage(NamedTuple):
    """One MQTT message as the hub received it (a NamedTuple: one is built per message)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int


class MqttIngress:
    """Subscriber with a fixed client id, ``clean_session=False`` and manual acks."""

    def __init__(self, settings: Settings, inbox: queue.Queue[IncomingMessage]) -> None:
        self._settings = settings
        self._inbox = inbox
        self._connected = threading.Event()
        self._client = make_client(
            client_id=settings.hub_client_id,
            clean_session=False,
            manual_ack=True,
            url=settings.effective_broker_url,
            username=settings.broker_username,
            password=settings.broker_password,
            tls=settings.broker_tls,
        )
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self.reconnects = 0
        self._stopping = False

    @property
    def connected(self) -> bool:
        """Whether the broker session is up right now."""
        return self._connected.is_set()

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; raises BrokerError when the broker cannot be used."""
        connect_blocking(self._client, self._settings.effective_broker_url, timeout_s=timeout_s,
                         on_connected=self._on_connected)

    def _on_connected(self, client: paho.Client) -> None:
        if self._connected.is_set():
            return
        rc, _mid = client.subscribe([(topic, 1) for topic in EVENT_SUBSCRIPTIONS])
        check(rc, "subscribe")
        if self.reconnects:
            log.info("reconnected to broker", extra={"broker": str(self._settings.
                                                                    effective_broker_url)})
        self.reconnects += 1
        self._connected.set()

    def _on_disconnect(self, _client: paho.Client, _userdata: object, _flags: object,
                       reason: object, _props: object) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("lost the broker; paho reconnects by itself", extra={"reason": str(reason)})
        self._connected.clear()

    def _on_message(self, _client: paho.Client, _userdata: object,
                    message: paho.MQTTMessage) -> None:
        # Never raise here: an exception would stop paho's network loop.
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic is not UTF-8)"
        self._inbox.put(IncomingMessage(topic, bytes(message.payload), message.mid, message.qos,
                                        time.time_ns() // 1_000_000))

    def ack(self, messages: Sequence[IncomingMessage]) -> None:
        """PUBACK messages whose events are durably stored. The hub subscribes at QoS 1, so a
        message arrives at QoS 1 or, when its publisher used 0, at QoS 0 and needs no ack."""
        self._client.ack_all([message.mid for message in messages if message.qos])

    def publish(self, topic: str, payload: str, *, qos: int = 1) -> None:
        """Publish; at QoS 1 paho queues it while the broker is away, QoS 0 is fire and forget."""
        self._client.publish(topic, payload, qos=qos)

    def stop(self) -> None:
        """Disconnect cleanly; unacknowledged messages stay with the broker."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
