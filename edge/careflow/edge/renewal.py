"""Certificate rotation on the gateway: renew at two thirds of the lifetime, swap without a gap.

The agent asks on ``careflow/provision/{gateway}/renew`` over its live connection (the broker
already authenticated it by its current certificate, so no token is needed) and hears the answer
on ``.../accepted`` or ``.../rejected``. A new identity is written as a new generation, tried with a
separate short connection, and only then made current; the old generation stays on disk until
the agent's own connection is back up under the new one. Events wait in the outbox throughout,
so the swap loses nothing: what was in flight is resent and deduplicated by the hub.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from careflow.core.config import BrokerUrl, TlsFiles
from careflow.core.errors import CareflowError
from careflow.core.mqtt import GATEWAY_SIDE_HINT, connect_blocking, make_client
from careflow.edge.identity import CA_FILE, CERT_FILE, KEY_FILE, IdentityStore
from careflow.provisioning.claims import renew_at_ms
from careflow.provisioning.pki import make_csr, new_device_key
from careflow.provisioning.protocol import AcceptedReply, RejectedReply, RenewRequest

__all__ = ["RenewalState", "Renewer"]

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 30.0
RETRY_AFTER_S = 300.0


@dataclass(slots=True)
class RenewalState:
    """What the renewer is doing, for diagnostics and tests."""

    renewals: int = 0
    failures: int = 0
    last_error: str | None = None
    in_flight: str | None = None  # request id
    swapped_to: Path | None = None  # promoted, waiting for the agent to reconnect with it


class Renewer:
    """Decides when to renew, sends the request, and installs the answer."""

    def __init__(self, *, gateway: str, identity: IdentityStore, broker: BrokerUrl,
                 clock: Callable[[], float] = time.time) -> None:
        self.gateway = gateway
        self.identity = identity
        self.broker = broker
        self.clock = clock
        self.state = RenewalState()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._sent_at = 0.0
        self._not_before = 0.0
        self._reply: AcceptedReply | RejectedReply | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        """Whether the certificate in use has reached two thirds of its life."""
        if not self.identity.exists() or self.clock() < self._not_before:
            return False
        cert = x509.load_pem_x509_certificate((self.identity.current / CERT_FILE).read_bytes())
        renew_ms = renew_at_ms(int(cert.not_valid_before_utc.timestamp() * 1000),
                               int(cert.not_valid_after_utc.timestamp() * 1000))
        return self.clock() * 1000 >= renew_ms

    def request(self) -> RenewRequest | None:
        """A renewal request to publish now, or None (not due, or one is in flight)."""
        now = self.clock()
        if self.state.in_flight is not None:
            if now - self._sent_at < ANSWER_TIMEOUT_S:
                return None
            self._fail("no answer to the renewal request", retry_s=60.0)
            return None
        if not self.due():
            return None
        self._key = new_device_key()
        request = RenewRequest(csr=make_csr(self._key, gateway_id=self.gateway).decode(),
                               request_id=uuid.uuid4().hex)
        self.state.in_flight = request.request_id
        self._sent_at = now
        log.info("renewing the device certificate", extra={"gateway": self.gateway})
        return request

    def on_reply(self, reply: AcceptedReply | RejectedReply) -> None:
        """An answer arrived (paho's thread): kept for :meth:`install` on the agent's thread."""
        with self._lock:
            if reply.request_id == self.state.in_flight:
                self._reply = reply

    def _fail(self, why: str, *, retry_s: float) -> None:
        self.state.failures += 1
        self.state.last_error = why
        self.state.in_flight = None
        self._not_before = self.clock() + retry_s
        log.warning("certificate renewal failed; the current certificate stays in use",
                    extra={"gateway": self.gateway, "error": why, "retry_in_s": retry_s})

    def install(self, tls: TlsFiles | None) -> bool:
        """Install an accepted answer: write, try, promote. True when the identity changed.

        ``tls`` is how the agent reaches its broker (None: no TLS); the new identity is tried
        with a separate connection before it replaces the one in use.
        """
        with self._lock:
            reply, self._reply = self._reply, None
        if reply is None:
            return False
        if isinstance(reply, RejectedReply):
            self._fail(f"{reply.code}: {reply.message}",
                       retry_s=float(reply.retry_after_s or RETRY_AFTER_S))
            return False
        assert self._key is not None
        generation = self.identity.write_generation(
            key=self._key, certificate=reply.certificate, ca_chain=reply.ca_chain,
            config=reply.config)
        try:
            self._try(generation, tls)
        except CareflowError as exc:
            self._fail(f"the new certificate cannot connect: {exc}", retry_s=RETRY_AFTER_S)
            return False
        self.identity.promote(generation)
        self.state.in_flight = None
        self.state.renewals += 1
        self.state.swapped_to = generation
        log.info("device certificate renewed", extra={"gateway": self.gateway,
                                                      "generation": generation.name})
        return True

    def _try(self, generation: Path, tls: TlsFiles | None) -> None:
        files = None if tls is None else TlsFiles(generation / CA_FILE, generation / CERT_FILE,
                                                  generation / KEY_FILE)
        probe = make_client(client_id=f"careflow-gw-{self.gateway}-probe", clean_session=True,
                            url=self.broker, tls=files)
        connect_blocking(probe, self.broker, timeout_s=10.0, unreachable_hint=GATEWAY_SIDE_HINT)
        probe.disconnect()
        probe.loop_stop()

    def on_connected(self) -> None:
        """The agent is connected: once under the new identity, the old one can go."""
        if self.state.swapped_to is not None:
            self.identity.prune(keep=1)
            self.state.swapped_to = None
