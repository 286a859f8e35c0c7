"""One place that builds and connects paho-mqtt clients, shared by hub, edge and CLI.

paho's errors (OSError, error codes) become :class:`BrokerError` with a message that names the
broker and what to check.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from careflow.config import BrokerUrl, TlsFiles
from careflow.errors import BrokerError

__all__ = ["KEEPALIVE_S", "check", "connect_blocking", "make_client", "tls_context"]

KEEPALIVE_S = 30


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
) -> paho.Client:
    """A paho client speaking MQTT 3.1.1 (what both Mosquitto and amqtt serve).

    ``ssl_context`` (from :func:`tls_context`) replaces ``tls`` for a caller that must load a
    new client certificate later: the gateway agent after renewing its identity.
    """
    client = paho.Client(
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


def connect_blocking(
    client: paho.Client,
    url: BrokerUrl,
    *,
    timeout_s: float = 10.0,
    on_connected: Callable[[paho.Client], None] | None = None,
) -> None:
    """Connect, start paho's network thread, and return once the broker said yes.

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
        msg = (f"cannot reach the MQTT broker at {url}: {exc.strerror or exc}. "
               "Is it running? Start `careflow hub` (embedded broker) or set CAREFLOW_BROKER_URL.")
        raise BrokerError(msg) from exc
    client.loop_start()
    if not answered.wait(timeout_s):
        client.loop_stop()
        msg = f"the MQTT broker at {url} accepted TCP but did not answer CONNECT in {timeout_s:g}s"
        raise BrokerError(msg)
    if outcome[0].is_failure:
        client.loop_stop()
        msg = f"the MQTT broker at {url} refused the connection: {outcome[0]}"
        raise BrokerError(msg)


def check(rc: MQTTErrorCode, action: str) -> None:
    """Raise BrokerError unless paho said success."""
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        msg = f"MQTT {action} failed: {paho.error_string(rc)}"
        raise BrokerError(msg)
