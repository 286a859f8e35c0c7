"""careflow.core.mqtt: paho on a buffered socket reads exactly what was sent, and never stalls on
bytes it has already buffered."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from paho.mqtt.client import MQTTv311
from paho.mqtt.enums import CallbackAPIVersion

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import Client, _BufferedSocket, connect_blocking, make_client
from tests.conftest import Mosquitto, wait_until


def test_it_serves_small_reads_from_one_large_read() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"\x30\x05hello\x40\x02\x00\x01")
        buffered = _BufferedSocket(left)
        assert buffered.recv(1) == b"\x30"
        assert buffered.pending() == 10  # the rest arrived with the first read
        assert buffered.recv(1) == b"\x05"
        assert buffered.recv(5) == b"hello"
        assert buffered.recv(100) == b"\x40\x02\x00\x01"  # never more than is buffered
        assert buffered.pending() == 0
        right.sendall(b"next")
        assert buffered.recv(2) == b"ne"
        assert buffered.recv(2) == b"xt"


def test_it_reports_the_peer_closing_and_keeps_the_socket_interface() -> None:
    left, right = socket.socketpair()
    with left:
        buffered = _BufferedSocket(left)
        assert buffered.fileno() == left.fileno()
        assert buffered.send(b"ping") == 4
        assert right.recv(4) == b"ping"
        right.close()
        assert buffered.recv(1) == b""


@pytest.mark.broker
def test_a_burst_arrives_whole_without_waiting_on_buffered_bytes(mosquitto: Mosquitto) -> None:
    """Hundreds of messages land in one read. Packets left in the buffer must be read without
    new bytes arriving on the socket, or the end of a burst would wait for the next keepalive."""
    url = parse_broker_url(mosquitto.url)
    received: list[bytes] = []
    all_in = threading.Event()
    total = 2000
    subscriber = make_client(client_id="burst-sub", clean_session=True, url=url)

    def on_message(_client: object, _userdata: object, message: object) -> None:
        received.append(message.payload)  # type: ignore[attr-defined]
        if len(received) == total:
            all_in.set()

    subscriber.on_message = on_message
    connect_blocking(subscriber, url)
    publisher = make_client(client_id="burst-pub", clean_session=True, url=url)
    connect_blocking(publisher, url)
    try:
        subscriber.subscribe("burst/#", qos=1)
        time.sleep(0.2)
        payloads = [f"message {i:05d} ".encode() * 8 for i in range(total)]
        infos = [publisher.publish("burst/x", payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(10)
        wait_until(all_in.is_set, timeout_s=20, what="the whole burst")
        assert received == payloads  # in order, none lost, none split or merged
    finally:
        for client in (publisher, subscriber):
            client.disconnect()
            client.loop_stop()


@pytest.mark.broker
def test_ack_all_acknowledges_exactly_the_messages_it_names(mosquitto: Mosquitto) -> None:
    """Acknowledged messages are gone from the persistent session; the others are redelivered
    when the same client id comes back."""
    url = parse_broker_url(mosquitto.url)
    total = 300
    inbox: list[tuple[int, bytes]] = []

    def session() -> Client:
        client = make_client(client_id="acker", clean_session=False, manual_ack=True, url=url)
        client.on_message = lambda _c, _u, m: inbox.append((m.mid, m.payload))
        return client

    subscriber = session()
    connect_blocking(subscriber, url)
    subscriber.subscribe("acks/#", qos=1)
    time.sleep(0.2)
    publisher = make_client(client_id="acks-pub", clean_session=True, url=url)
    connect_blocking(publisher, url)
    for info in [publisher.publish("acks/x", f"{i}".encode(), qos=1) for i in range(total)]:
        info.wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()
    wait_until(lambda: len(inbox) == total, what="every message delivered")
    odd = [mid for mid, payload in inbox if int(payload) % 2]
    subscriber.ack_all(odd)
    time.sleep(0.5)  # the acks leave with the next pass of paho's loop
    subscriber.disconnect()
    subscriber.loop_stop()

    inbox.clear()
    again = session()
    connect_blocking(again, url)
    try:
        wait_until(lambda: len(inbox) >= total // 2, what="the unacknowledged half redelivered")
        time.sleep(0.5)  # nothing more may come
        assert sorted(int(payload) for _, payload in inbox) == list(range(0, total, 2))
    finally:
        again.disconnect()
        again.loop_stop()


@pytest.mark.broker
def test_ack_all_while_reconnecting_never_goes_out_before_connect(mosquitto: Mosquitto) -> None:
    """A commit can finish while paho opens a new connection; its PUBACKs must not precede
    CONNECT, or the broker closes the connection for a protocol error on every attempt."""
    url = parse_broker_url(mosquitto.url)

    class AckingWhileConnecting(Client):
        def _create_socket(self) -> Any:
            sock = super()._create_socket()
            self.ack_all([1, 2, 3])  # as the hub's writer thread could, at this moment
            return sock

    client = AckingWhileConnecting(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="acks-racing", clean_session=True,
                                   protocol=MQTTv311, manual_ack=True)
    connect_blocking(client, url)  # raises BrokerError if the broker refused the connection
    try:
        time.sleep(0.5)
        assert client.is_connected()
    finally:
        client.disconnect()
        client.loop_stop()
