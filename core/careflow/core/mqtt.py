"""One place that builds and connects paho-mqtt clients, shared by hub, edge and CLI.

paho's errors (OSError, error codes) become :class:`BrokerError` with a message that names the
broker and what to check.
"""

from __future__ import annotations

import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from careflow.core.config import BrokerUrl, TlsFiles
from careflow.core.errors import BrokerError

__all__ = ["KEEPALIVE_S", "Client", "check", "connect_blocking", "make_client", "tls_context"]

KEEPALIVE_S = 30
# CONNACK reason codes that refuse for now: server unavailable, busy, quota, connection rate.
_REFUSED_FOR_NOW = frozenset({136, 137, 151, 159})
_READ_CHUNK = 65536
_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, message id
_MAX_BUFFERED_READS = 1000  # extra reads of buffered packets per pass of paho's loop


class _BufferedSocket:
    """A socket whose reads come from one large ``recv`` instead of several small ones.

    paho reads every packet with at least three ``recv`` calls (command byte, length bytes one
    at a time, body): three system calls for a 200-byte message, the largest cost of its network
    thread under load. This wrapper reads up to 64 KiB at once and serves paho from that.
    ``pending()`` tells paho's loop that buffered bytes are waiting, as it already asks of an
    SSL socket, so it reads them instead of waiting in ``select()``.
    """

    def __init__(self, sock: Any) -> None:  # noqa: ANN401 - a socket or an SSL socket
        self._sock = sock
        self._buffer = b""
        self._offset = 0

    def recv(self, length: int) -> bytes:
        """Up to ``length`` bytes, from the buffer or from one large read of the socket."""
        if self._offset >= len(self._buffer):
            data = self._sock.recv(max(length, _READ_CHUNK))
            if len(data) <= length:  # all of it is wanted (b"" too: the broker closed)
                return bytes(data)
            self._buffer, self._offset = data, 0
        start = self._offset
        self._offset = min(start + length, len(self._buffer))
        return self._buffer[start:self._offset]

    def send(self, data: bytes | bytearray) -> int:
        """Send as the socket does (defined here: paho calls it for every packet)."""
        return int(self._sock.send(data))

    def pending(self) -> int:
        """Bytes readable without waiting: what is buffered here, and in TLS's own buffer."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buffer) - self._offset + inner

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever the socket has
        return getattr(self._sock, name)


class Client(paho.Client):
    """paho's client on a buffered socket (see :class:`_BufferedSocket`), with batched acks.

    It leans on three private parts of paho 2.x: ``_create_socket()``, ``_sock`` and
    ``_packet_queue(command, packet, mid, qos)``. tests/test_mqtt.py exercises each against
    Mosquitto, so a paho release that changes them fails there first.
    """

    def _create_socket(self) -> Any:  # noqa: ANN401 - paho's SocketLike
        return _BufferedSocket(super()._create_socket())

    def ack_all(self, mids: Sequence[int]) -> None:
        """PUBACK QoS 1 messages (``manual_ack``) as one write, not one per message.

        paho's ``ack()`` queues each 4-byte PUBACK on its own: a wake-up of the network thread
        and a ``send()`` each, thousands per commit. The PUBACKs are the same bytes (MQTT 3.1.1,
        which :func:`make_client` always speaks), queued as one packet.
        """
        # While paho reconnects, a queued PUBACK would go out before CONNECT and the broker
        # would close the new connection for a protocol error. Not acknowledging is always
        # safe: the broker delivers the messages again, and dedupe absorbs them.
        if mids and self.is_connected():
            packet = b"".join(_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids)
            self._packet_queue(paho.PUBACK, packet, 0, 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read every packet already buffered, not one per pass of paho's loop (each pass costs
        a ``select()`` and paho's bookkeeping); bounded, so writes never wait long."""
        rc = super().loop_read(max_packets)
        for _ in range(_MAX_BUFFERED_READS):
            sock = self._sock
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, _BufferedSocket) \
                    or not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc


def make_client(
    *,
    client_id: str,
    clean_session: bool,
    manual_ack: bool = False,
    url: BrokerUrl,
    username: str | None = None,
    password: str | None = None,
    tls: TlsFiles | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Client:
    """A paho client speaking MQTT 3.1.1 (what both Mosquitto and amqtt serve).

    ``ssl_context`` (from :func:`tls_context`) replaces ``tls`` for a caller that must load a
    new client certificate later: the gateway agent after renewing its identity.
    """
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=paho.MQTTv311,
        manual_ack=manual_ack,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if url.tls:
        client.tls_set_context(ssl_context or tls_context(tls or TlsFiles()))
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    return client


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """What paho's ``tls_set`` builds: verify the broker (``files.ca`` or the system CAs) and
    present ``files.cert`` if given; ``load_cert_chain`` on it later swaps the identity."""
    context = ssl.create_default_context(cafile=str(files.ca) if files.ca else None)
    if files.cert is not None:
        context.load_cert_chain(str(files.cert), str(files.key) if files.key else None)
    return context


# What to do when the broker is away, on the hub's machine (the default) and on a gateway.
HUB_SIDE_HINT = "Is it running? Start `careflow hub` (embedded broker) or set CAREFLOW_BROKER_URL."
GATEWAY_SIDE_HINT = ("Is the hub's broker up, and reachable from this gateway? Check --broker "
                     "(or `broker:` in edge.yaml) and the network; then run this again.")


def connect_blocking(
    client: paho.Client,
    url: BrokerUrl,
    *,
    timeout_s: float = 10.0,
    on_connected: Callable[[paho.Client], None] | None = None,
    unreachable_hint: str = HUB_SIDE_HINT,
) -> None:
    """Connect, start paho's network thread, and return once the broker said yes.

    ``unreachable_hint`` ends the error when the broker cannot be reached: what to do next
    where the caller runs (a gateway has no `careflow hub` to start).

    ``on_connected`` runs on this and on every automatic reconnect (subscribe there).

    Raises:
        BrokerError: the broker is unreachable, refused us, or did not answer in time.
    """
    answered = threading.Event()
    outcome: list[ReasonCode] = []

    def handle_connect(
        connected: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        if not answered.is_set():
            outcome.append(reason)
            answered.set()
        if not reason.is_failure and on_connected is not None:
            on_connected(connected)

    client.on_connect = handle_connect
    try:
        client.connect(url.host, url.port, keepalive=KEEPALIVE_S)
    except OSError as exc:
        msg = f"cannot reach the MQTT broker at {url}: {exc.strerror or exc}. {unreachable_hint}"
        raise BrokerError(msg) from exc
    client.loop_start()
    if not answered.wait(timeout_s):
        client.loop_stop()
        msg = f"the MQTT broker at {url} accepted TCP but did not answer CONNECT in {timeout_s:g}s"
        raise BrokerError(msg)
    if outcome[0].is_failure:
        client.loop_stop()
        msg = f"the MQTT broker at {url} refused the connection: {outcome[0]}"
        # unavailable, busy, over quota or rate: later may work; credentials or a bad client
        # id must be fixed first
        raise BrokerError(msg, retry=outcome[0].value in _REFUSED_FOR_NOW)


def check(rc: MQTTErrorCode, action: str) -> None:
    """Raise BrokerError unless paho said success."""
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        msg = f"MQTT {action} failed: {paho.error_string(rc)}"
        raise BrokerError(msg)
