"""MQTT ingress of the hub: a persistent QoS 1 session with acknowledgements sent after commit.

paho's network thread puts each message on a bounded queue; when the queue is full the put
blocks, so TCP back-pressure slows the broker down instead of the hub growing its memory.
A message is PUBACKed only once the service has committed it (``manual_ack``), so the broker
redelivers anything the hub had not stored when it died.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import paho.mqtt.client as paho

from careflow.core import clock
from careflow.core.config import Settings
from careflow.core.errors import BrokerError, SessionTakenError
from careflow.core.mqtt import check, connect_blocking, make_client
from careflow.schemas import EVENT_SUBSCRIPTIONS

__all__ = ["TAKEOVER_FAST_S", "IncomingMessage", "MqttIngress", "SessionVerdict", "TakeoverWatch"]

log = logging.getLogger(__name__)

# A session lost this soon after the broker accepted it was probably taken over.
TAKEOVER_FAST_S = 5.0


class SessionVerdict(StrEnum):
    """What a lost broker session says about the hub's situation."""

    LOST = "lost"  # an ordinary loss: paho reconnects
    FIGHTING = "fighting"  # dropped again and again right after the broker accepted us
    YIELD = "yield"  # fighting, and this hub never had a steady session: it is the newcomer


@dataclass(slots=True)
class TakeoverWatch:
    """Tells a session taken over again and again from a link that is merely lost.

    Two clients with one client id take each other's session over (MQTT 3.1.1 says the broker
    closes the older connection): each reconnects a second later and drops the other, and paho
    only sees "Unspecified error". The signature is a session dropped again and again, each
    time within ``fast_s`` of being accepted, within ``window_s``. A hub that never held a
    session longer than ``fast_s`` is the newcomer and yields after ``yield_after`` such drops;
    the one that ran steadily before keeps its place and says what is happening after
    ``warn_after`` (by then the newcomer, which started the fight, has had one drop more).
    """

    fast_s: float = TAKEOVER_FAST_S
    warn_after: int = 2
    yield_after: int = 3
    window_s: float = 60.0
    _recent: collections.deque[float] = field(default_factory=collections.deque)
    _steady: bool = False

    def dropped(self, *, lasted_s: float, now: float) -> SessionVerdict:
        """A session that had lasted ``lasted_s`` was lost at ``now`` (monotonic seconds)."""
        if lasted_s >= self.fast_s:
            self._steady = True
            self._recent.clear()
            return SessionVerdict.LOST
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if self._steady:
            return (SessionVerdict.FIGHTING if len(self._recent) >= self.warn_after
                    else SessionVerdict.LOST)
        if len(self._recent) < self.yield_after:
            return SessionVerdict.LOST
        return SessionVerdict.YIELD


class IncomingMessage(NamedTuple):
    """One MQTT message as the hub received it (a NamedTuple: one is built per message)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_ms: int
    retain: bool = False  # a retained message, delivered because the hub (re)subscribed


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
        self._connected_at: float | None = None
        self._takeover = TakeoverWatch()
        self._warned_takeover = False
        # set when this hub must stop: the service raises it after finishing what it holds
        self.failure: BrokerError | None = None

    @property
    def connected(self) -> bool:
        """Whether the broker session is up right now."""
        return self._connected.is_set()

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; raises BrokerError when the broker cannot be used."""
        connect_blocking(self._client, self._settings.effective_broker_url, timeout_s=timeout_s,
                         on_connected=self._on_connected)

    def _on_connected(self, client: paho.Client) -> None:
        self._connected_at = time.monotonic()
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
            if self._connected_at is not None:
                now = time.monotonic()
                self._judge(self._takeover.dropped(lasted_s=now - self._connected_at, now=now))
        self._connected.clear()

    def _judge(self, verdict: SessionVerdict) -> None:
        """Say clearly when another client uses this hub's id; the newcomer stops fighting."""
        if verdict is SessionVerdict.LOST:
            self._warned_takeover = False
            return
        client_id = self._settings.hub_client_id
        cause = (f"the broker {self._settings.effective_broker_url} drops this hub's session "
                 "again and again right after accepting it: most likely another client is "
                 f"using the client id {client_id!r} and the two take the session over from "
                 f"each other (another hub with CAREFLOW_HUB_CLIENT_ID={client_id} on another "
                 "data directory?)")
        if verdict is SessionVerdict.YIELD:
            self.failure = SessionTakenError(
                f"{cause}. This hub started last, so it stops instead of fighting: stop the "
                "other hub, or give each hub its own CAREFLOW_HUB_CLIENT_ID.")
            log.error("another client holds this hub's session; stopping",
                      extra={"client_id": client_id, "error": str(self.failure)})
            self._stopping = True
            self._client.disconnect()  # no more reconnects: the other hub keeps the session
        elif not self._warned_takeover:
            log.error(f"{cause}; this hub keeps its place and goes on reconnecting. Stop the "
                      "other one.", extra={"client_id": client_id})
            self._warned_takeover = True

    def _on_message(self, _client: paho.Client, _userdata: object,
                    message: paho.MQTTMessage) -> None:
        # Never raise here: an exception would stop paho's network loop.
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic is not UTF-8)"
        self._inbox.put(IncomingMessage(topic, bytes(message.payload), message.mid, message.qos,
                                        clock.now_ms(), message.retain))

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
