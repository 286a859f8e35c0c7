"""The gateway's side of the claim flow: make a key, send a CSR with the token, install the answer.

``claim_identity`` connects with the shared claim certificate (on Mosquitto's claim listener; on
the embedded broker there is no TLS and the hub's checks of serial, token and CSR are the only
gate), subscribes to its answer topics, then sends ``{serial, token, csr, request_id}``. The key
is written 0600 before the CSR leaves, and reused if the claim is run again, so a claim whose
answer was lost is answered again instead of burning the token. The accepted certificate, key,
CA chain and configuration are installed atomically (see ``identity.py``), and ``edge.yaml`` is
written for ``careflow edge run --config``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from careflow.core.config import BrokerUrl, TlsFiles, parse_broker_url
from careflow.core.errors import BrokerError, ClaimError, ConfigError
from careflow.core.mqtt import GATEWAY_SIDE_HINT, connect_blocking, make_client
from careflow.edge.identity import CA_FILE, CERT_FILE, KEY_FILE, IdentityStore
from careflow.provisioning.pki import new_device_key, write_atomic
from careflow.provisioning.protocol import (
    AcceptedReply,
    ClaimRequest,
    RejectedReply,
    accepted_topic,
    claim_client_id,
    rejected_topic,
    request_topic,
)

__all__ = ["ClaimResult", "claim_csr", "claim_identity", "exchange", "write_edge_config"]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What a successful claim installed."""

    gateway_id: str
    identity_dir: Path
    edge_config: Path
    broker_url: str
    elapsed_ms: float


def claim_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR that names no identity: the hub decides the gateway id and sets the subject."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def exchange(*, broker: BrokerUrl, tls: TlsFiles | None, client_id: str, request_to: str,
             answer_client: str, body: dict[str, Any],
             timeout_s: float) -> AcceptedReply | RejectedReply:
    """Subscribe to the answers of ``answer_client``, send ``body``, wait for its answer.

    Raises:
        BrokerError: the broker cannot be reached or refused us, or no answer came in time.
    """
    answered = threading.Event()
    replies: list[AcceptedReply | RejectedReply] = []
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        try:
            if message.topic == accepted_topic(answer_client):
                reply: AcceptedReply | RejectedReply = AcceptedReply.model_validate_json(
                    message.payload)
            else:
                reply = RejectedReply.model_validate_json(message.payload)
        except ValueError:
            return
        if reply.request_id in (body["request_id"], None):
            replies.append(reply)
            answered.set()

    client = make_client(client_id=client_id, clean_session=True, url=broker, tls=tls)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()

    def subscribe(connected: paho.Client) -> None:
        connected.subscribe([(accepted_topic(answer_client), 1),
                             (rejected_topic(answer_client), 1)])

    connect_blocking(client, broker, timeout_s=timeout_s, on_connected=subscribe,
                     unreachable_hint=GATEWAY_SIDE_HINT)
    try:
        if not subscribed.wait(min(timeout_s, 10)):
            msg = f"the broker at {broker} did not confirm the subscription to the answers"
            raise BrokerError(msg)
        client.publish(request_to, json.dumps(body), qos=1)
        if not answered.wait(timeout_s):
            msg = (f"no answer from the hub within {timeout_s:g}s. Is `careflow hub` running "
                   "with provisioning on (CAREFLOW_PKI_DIR, or the embedded broker)? The claim "
                   "can be run again safely: it reuses its key.")
            raise BrokerError(msg)
    finally:
        client.disconnect()
        client.loop_stop()
    return replies[0]


def write_edge_config(out: Path, *, gateway_id: str, broker_url: str,
                      heartbeat_interval_s: int) -> Path:
    """``edge.yaml`` for the agent, pointing at the installed identity."""
    identity = out / "identity"
    lines = [
        "# Written by `careflow-edge claim`; run: careflow-edge run --config <this file>",
        f"gateway: {gateway_id}",
        f"broker: {broker_url}",
        f"data_dir: {out / 'data'}",
        f"identity_dir: {identity}",
        f"heartbeat_interval_s: {heartbeat_interval_s}",
    ]
    if parse_broker_url(broker_url).tls:
        lines += [f"ca_file: {identity / 'current' / CA_FILE}",
                  f"cert_file: {identity / 'current' / CERT_FILE}",
                  f"key_file: {identity / 'current' / KEY_FILE}"]
    path = out / "edge.yaml"
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def claim_identity(*, serial: str, token: str, broker: BrokerUrl, out: Path,
                   tls: TlsFiles | None = None, timeout_s: float = 30.0) -> ClaimResult:
    """Claim an identity for this gateway and install it under ``out``.

    Raises:
        ClaimError: the hub refused (its code, message and maybe retry_after_s).
        BrokerError: no broker, or no answer in time (safe to run again).
        ConfigError: ``out`` already holds an identity.
    """
    started = time.monotonic()
    store = IdentityStore(out / "identity")
    if store.exists():
        msg = (f"{out} already holds an identity ({store.current.resolve().name}); the agent "
               "renews it by itself. To provision afresh, register with --replace on the hub "
               "and claim into an empty directory.")
        raise ConfigError(msg)
    key = store.pending_key()
    if key is None:
        key = new_device_key()
        store.keep_pending_key(key)
    client_id = claim_client_id(serial)
    request = ClaimRequest(serial=serial, token=token, csr=claim_csr(key).decode(),
                           request_id=uuid.uuid4().hex)
    reply = exchange(broker=broker, tls=tls, client_id=client_id,
                     request_to=request_topic(client_id), answer_client=client_id,
                     body=request.model_dump(), timeout_s=timeout_s)
    if isinstance(reply, RejectedReply):
        raise ClaimError(reply.code, reply.message, retry_after_s=reply.retry_after_s)
    generation = store.write_generation(key=key, certificate=reply.certificate,
                                        ca_chain=reply.ca_chain, config=reply.config)
    store.promote(generation)
    store.drop_pending_key()
    broker_url = str(reply.config.get("broker_url") or broker)
    edge_config = write_edge_config(
        out, gateway_id=reply.gateway_id, broker_url=broker_url,
        heartbeat_interval_s=int(reply.config.get("heartbeat_interval_s") or 60))
    return ClaimResult(reply.gateway_id, store.root, edge_config, broker_url,
                       (time.monotonic() - started) * 1000)
