"""The hub's provisioning service: answers claims and renewals over MQTT; watches activations.

It runs inside ``careflow hub`` with its own MQTT session (client id ``{hub}-provisioning``, clean,
QoS 1) on ``careflow/provision/+/request`` and ``careflow/provision/+/renew``. paho's thread puts
each request on a queue; one worker thread decides (pure functions in ``claims.py``), signs
(``pki.py``), records (the registry) and only then answers. An answer that is lost costs nothing:
the gateway asks again with the same token and key and gets the same certificate back.

:class:`Activation` is the hub's hook: the ingest loop tells it which gateways sent a heartbeat
or came online after each commit, and it moves an issued identity to ``active``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from careflow.core.config import Settings
from careflow.core.errors import ContractError, CsrError, PkiError, StoreError
from careflow.core.mqtt import check, connect_blocking, make_client
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import (
    CLAIM_RATE_LIMIT,
    ClaimRecord,
    Proceed,
    RefusalLog,
    Reject,
    decide_claim,
    decide_renewal,
    expiring,
    hash_token,
    rate_limit,
    tokens_match,
)
from careflow.provisioning.protocol import (
    MAX_REQUEST_MESSAGE_BYTES,
    PROVISION_SUBSCRIPTIONS,
    AcceptedReply,
    ClaimRequest,
    RejectedReply,
    RenewRequest,
    accepted_topic,
    decode_request,
    parse_provision_topic,
    rejected_topic,
    renew_topic,
)
from careflow.provisioning.registry import ProvisioningRegistry, SqliteProvisioningRegistry
from careflow.schemas import ack_topic, batch_topic, command_topic, reply_topic, state_topic

__all__ = [
    "Activation",
    "DeviceConfig",
    "Provisioning",
    "ProvisioningService",
    "key_fingerprint",
    "provisioning_for",
    "revoke_pending",
]

log = logging.getLogger(__name__)

Reply = tuple[str, str]  # (topic, JSON payload)
EXPIRY_CHECK_INTERVAL_MS = 60_000


def key_fingerprint(csr_pem: bytes) -> str:
    """sha256 of the CSR's public key (DER): binds a spent token to one key.

    Raises:
        CsrError: ``csr_invalid`` when the text is not a PEM CSR.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        der = csr.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. a curve nobody supports
        raise CsrError("csr_invalid", "the request is not a PEM certificate signing request "
                       "with a supported key") from exc
    return hashlib.sha256(der).hexdigest()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def revoke_pending(registry: ProvisioningRegistry, pki: pki_mod.Pki, *, now: datetime) -> int:
    """Revoke, on the CA's CRL, the identities that ``register --replace`` withdrew."""
    done = 0
    for revocation_id, _serial, gateway_id, cert_serial in registry.pending_revocations():
        # that certificate and every earlier one of the old device (renewals leave older ones
        # valid for days); the successor's newer certificates stay valid
        pki_mod.revoke_identity(pki, gateway_id, now=now, up_to_serial=int(cert_serial, 16))
        registry.revoked(revocation_id, now_ms=_ms(now))
        log.warning("revoked a replaced identity", extra={"gateway": gateway_id,
                                                          "cert_serial": cert_serial})
        done += 1
    return done


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """What an accepted gateway is told to use."""

    broker_url: str
    heartbeat_interval_s: int = 60

    def for_gateway(self, gateway_id: str) -> dict[str, Any]:
        """The ``config`` object of an accepted reply."""
        return {"broker_url": self.broker_url, "heartbeat_interval_s": self.heartbeat_interval_s,
                "topics": {"events": f"careflow/v1/{gateway_id}/{{device}}/{{type}}",
                           "batch": batch_topic(gateway_id), "state": state_topic(gateway_id),
                           "ack": ack_topic(gateway_id), "cmd": command_topic(gateway_id),
                           "reply": reply_topic(gateway_id), "renew": renew_topic(gateway_id)}}


class Activation:
    """Moves issued identities to active on their first heartbeat; warns of expiring ones.

    Only gateways waiting for activation are looked at, from memory, so the hub's ingest loop
    pays one set lookup per committed gateway and a write only on a first heartbeat.
    """

    def __init__(self, registry: ProvisioningRegistry, *, warn_within_ms: int,
                 pki: pki_mod.Pki | None = None) -> None:
        self._registry = registry
        self._warn_within_ms = warn_within_ms
        self._pki = pki  # set: also watch the CRL, whose expiry locks every gateway out
        self._waiting = {r.gateway_id for r in registry.records() if r.state == "issued"}
        self._unconnected = {r.gateway_id for r in registry.records()
                             if r.state == "issued" and r.connected_ms is None}
        self._lock = threading.Lock()
        self._expiry: tuple[int, str | None] = (-EXPIRY_CHECK_INTERVAL_MS, None)
        self._revoked: tuple[int, frozenset[str]] = (-REVOKED_CHECK_INTERVAL_MS, frozenset())

    def expect(self, gateway_id: str) -> None:
        """A certificate was just issued: watch for this gateway's first heartbeat."""
        with self._lock:
            self._waiting.add(gateway_id)
            self._unconnected.add(gateway_id)

    def observe(self, *, heartbeats: Iterable[str], online: Iterable[str], now_ms: int) -> None:
        """After a commit: gateways that sent their own heartbeat, and that came online."""
        with self._lock:
            connected = [g for g in set(online) if g in self._unconnected]
            active = [g for g in set(heartbeats) if g in self._waiting]
        if not connected and not active:
            return
        if connected:
            self._registry.mark_connected(connected, now_ms=now_ms)
        changed = self._registry.mark_active(active, now_ms=now_ms) if active else []
        with self._lock:
            self._unconnected.difference_update(connected + active)
            self._waiting.difference_update(active)
        for gateway_id in changed:
            log.info("gateway active under its own identity", extra={"gateway": gateway_id})

    def expiry_problem(self, now_ms: int) -> str | None:
        """A self-check problem when device certificates are about to run out (cached a minute).

        Renewal happens at two thirds of the lifetime, so an identity this close to its end
        has failed to renew for days: its gateway will be locked out.
        """
        checked_ms, problem = self._expiry
        if now_ms - checked_ms < EXPIRY_CHECK_INTERVAL_MS:
            return problem
        soon = expiring(self._registry.records(), now_ms=now_ms, within_ms=self._warn_within_ms)
        problem = None
        if soon:
            names = ", ".join(
                f"{r.gateway_id} ({max(0, (r.cert_not_after_ms or 0) - now_ms) // 3_600_000}h)"
                for r in soon[:10])
            problem = (f"{len(soon)} device certificate(s) expire soon and were not renewed: "
                       f"{names}. Check that these gateways are online and that "
                       "`careflow provision list` shows no renewal error.")
        crl = self._crl_problem(now_ms)
        if crl:
            problem = f"{crl} {problem}" if problem else crl
        self._expiry = (now_ms, problem)
        return problem


    def revoked(self, now_ms: int) -> frozenset[str]:
        """Gateways whose current certificate is on the CRL (re-read every few seconds:
        `careflow devices revoke` runs in another process)."""
        checked_ms, revoked = self._revoked
        if self._pki is None or now_ms - checked_ms < REVOKED_CHECK_INTERVAL_MS:
            return revoked
        try:
            revoked = frozenset(pki_mod.revoked_identities(self._pki))
        except PkiError as exc:  # keep the last known set rather than let everyone in
            log.warning("cannot read the CRL; keeping the last revoked set",
                        extra={"error": str(exc)})
        except Exception:  # a bug here is no message's fault: the hub would dead-letter each
            log.exception("reading the revoked certificates failed; keeping the last set")
        self._revoked = (now_ms, revoked)
        return revoked

    def _crl_problem(self, now_ms: int) -> str | None:
        """The CRL must be re-signed (`careflow ca crl-refresh`, daily) well before nextUpdate:
        Mosquitto refuses every device certificate once it has passed."""
        if self._pki is None:
            return None
        now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        try:
            if not pki_mod.crl_needs_refresh(self._pki, now=now, within=CRL_WARN):
                return None
            next_update = pki_mod.crl_next_update(self._pki)
        except PkiError as exc:
            return f"the CRL cannot be read ({exc}): gateways may be locked out."
        return (f"the CRL's nextUpdate is {next_update:%Y-%m-%d %H:%M} UTC: run "
                "`careflow ca crl-refresh` (and schedule it daily), or every gateway is locked "
                "out when it passes.")


class ProvisioningService:
    """Claims and renewals over MQTT, answered by one worker thread."""

    def __init__(self, settings: Settings, registry: ProvisioningRegistry, pki: pki_mod.Pki, *,
                 device: DeviceConfig, activation: Activation | None = None,
                 cert_days: int = 30, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.pki = pki
        self.device = device
        self.activation = activation
        self.cert_days = cert_days
        self.clock = clock or (lambda: datetime.now(UTC))
        self.answered: dict[str, int] = defaultdict(int)  # status or code -> count
        self.failures = 0  # requests whose serving raised (a bug): logged, answered, survived
        self._attempts: dict[str, deque[int]] = {}
        # refusals are counted here and written in one transaction every few seconds: a flood
        # of refused claims must not cost a synced write each
        self.refusals = RefusalLog(max_keys=MAX_PENDING_REFUSALS)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self._inbox_bytes = 0  # what the queued requests hold: bounded by MAX_INBOX_BYTES
        self._inbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="provisioning", daemon=True)
        self._client = make_client(
            client_id=f"{settings.hub_client_id}-provisioning", clean_session=True,
            url=settings.effective_broker_url, username=settings.broker_username,
            password=settings.broker_password, tls=settings.broker_tls)
        self._client.on_message = self._on_message

    # -- MQTT adapter -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, and start answering."""
        self._worker.start()

        def subscribe(client: paho.Client) -> None:
            rc, _ = client.subscribe([(topic, 1) for topic in PROVISION_SUBSCRIPTIONS])
            check(rc, "subscribe")

        connect_blocking(self._client, self.settings.effective_broker_url,
                         on_connected=subscribe)
        log.info("provisioning service answering claims",
                 extra={"pki": str(self.pki.dir), "device_broker": self.device.broker_url})

    def stop(self) -> None:
        """Stop answering and disconnect."""
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker.is_alive():
            self._worker.join(timeout=10)
        if not self._worker.is_alive():
            self.flush_refusals()

    def _on_message(self, _client: paho.Client, _userdata: object,
                    message: paho.MQTTMessage) -> None:
        # A request longer than the limit is refused unread, so only its start is kept; and the
        # queue is bounded in bytes as well as in number (the broker passes 1 MiB a message).
        payload = bytes(message.payload[:MAX_REQUEST_MESSAGE_BYTES + 1])
        with self._inbox_lock:
            admitted = self._inbox_bytes + len(payload) <= MAX_INBOX_BYTES
            if admitted:
                self._inbox_bytes += len(payload)
        if not admitted:  # a flood: the gateway times out and asks again
            log.warning("provisioning queue full (bytes); dropped a request")
            return
        try:
            self._inbox.put_nowait((message.topic, payload))
        except queue.Full:  # a flood: the gateway times out and asks again
            self._dequeued(payload)
            log.warning("provisioning queue full; dropped a request")
        except UnicodeDecodeError:
            self._dequeued(payload)

    def _dequeued(self, payload: bytes) -> None:
        with self._inbox_lock:
            self._inbox_bytes -= len(payload)

    def _work(self) -> None:
        flush_at = time.monotonic() + REFUSAL_FLUSH_S
        while not self._stop.is_set():
            if time.monotonic() >= flush_at:
                flush_at = time.monotonic() + REFUSAL_FLUSH_S
                self.flush_refusals()
            try:
                topic, payload = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._dequeued(payload)
            try:
                for reply_to, body in self.handle(topic, payload):
                    self._client.publish(reply_to, body, qos=1)
            except Exception:  # one request must never end the service
                self._failed(topic)

    def flush_refusals(self) -> None:
        """Write the refusals counted since the last flush (one transaction); never raises:
        they are for operators to read, and answering goes on if the store refuses them (they
        are folded back for the next flush)."""
        taken = self.refusals.take()
        try:
            self.registry.record_refusals(taken, max_rows=MAX_REFUSAL_ROWS)
        except Exception:  # StoreError, or a bug: either way, keep serving
            self.refusals.restore(taken)
            log.exception("cannot record refused provisioning requests; kept for the next try",
                          extra={"refusals": sum(r.count for r in taken)})

    def _failed(self, topic: str) -> None:
        """Serving one request raised: log it, count it, tell the requester if we can."""
        self.failures += 1
        log.exception("provisioning request failed; serving the next",
                      extra={"topic": topic[:200], "failures": self.failures})
        parsed = parse_provision_topic(topic)
        if parsed is None:
            return
        try:
            reply_to, body = self._reject(parsed[0], None, Reject(
                "internal_error", "the hub could not answer this request; try again later"))
            self._client.publish(reply_to, body, qos=1)
        except Exception:
            log.exception("cannot tell the requester", extra={"topic": topic[:200]})

    # -- decisions and effects (no MQTT: tests call this directly) -----------------------------

    def handle(self, topic: str, payload: bytes) -> list[Reply]:  # noqa: PLR0911 - one per outcome
        """Answer one request; never raises (a bug becomes an ``internal_error`` answer)."""
        parsed = parse_provision_topic(topic)
        if parsed is None:
            return []
        client_id, kind = parsed
        try:
            body = decode_request(payload)
        except ContractError as exc:
            return [self._reject(client_id, None, Reject(exc.code, str(exc)))]
        request_id = body.get("request_id")
        request_id = request_id if isinstance(request_id, str) else None
        try:
            if kind == "request":
                return [self._claim(client_id, ClaimRequest.model_validate(body))]
            return [self._renew(client_id, RenewRequest.model_validate(body))]
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors()[:3])
            serial = body.get("serial")
            return [self._reject(client_id, request_id, Reject("bad_request", problems),
                                 serial=serial[:64] if isinstance(serial, str) else "")]
        except (StoreError, PkiError) as exc:
            log.error("provisioning failed", extra={"error": str(exc), "topic": topic})
            return [self._reject(client_id, request_id, Reject(
                "internal_error", "the hub could not complete this request; try again later"))]
        except Exception:
            log.exception("provisioning failed unexpectedly", extra={"topic": topic})
            return [self._reject(client_id, request_id, Reject(
                "internal_error", "the hub hit a bug; try again later and report it"))]

    def _reject(self, client_id: str, request_id: str | None, reject: Reject, *,
                serial: str = "") -> Reply:
        """A refusal: counted, folded into the refusal log (logged once per source, serial and
        code per flush), answered."""
        self.answered[reject.code] += 1
        if self.refusals.note(source=client_id, serial=serial, code=reject.code,
                              now_ms=_ms(self.clock())):
            log.warning("provisioning request refused", extra={
                "source": client_id[:RefusalLog.SOURCE_CHARS], "serial": serial,
                "code": reject.code})
        reply = RejectedReply(request_id=request_id, code=reject.code, message=reject.message,
                              retry_after_s=reject.retry_after_s)
        return rejected_topic(client_id), reply.model_dump_json(exclude_none=True)

    def _accept(self, client_id: str, request_id: str, record: ClaimRecord,
                cert_pem: str) -> Reply:
        self.answered["accepted"] += 1
        reply = AcceptedReply(request_id=request_id, gateway_id=record.gateway_id,
                              certificate=cert_pem, ca_chain=self.pki.ca_chain_pem.decode(),
                              config=self.device.for_gateway(record.gateway_id))
        return accepted_topic(client_id), reply.model_dump_json()

    def _rate_limited(self, key: str, now_ms: int) -> Reject | None:
        """Whether ``key`` has had too many attempts lately (the attempts are noted apart)."""
        attempts = self._attempts.get(key)
        if attempts is None:
            return None
        while attempts and now_ms - attempts[0] >= 3_600_000:  # forget what no window needs
            attempts.popleft()
        if not attempts:
            del self._attempts[key]
            return None
        wait_s = rate_limit(attempts, now_ms)
        if wait_s is None:
            return None
        return Reject("rate_limited", f"too many attempts for {key}; wait {wait_s}s",
                      retry_after_s=wait_s)

    def _note_attempt(self, key: str, now_ms: int) -> None:
        """Count an allowed attempt. Bounded both ways: per key only the last few matter to
        the limit, and anyone holding the claim certificate chooses the serials it names (the
        longest-known keys are forgotten first)."""
        self._attempts.setdefault(key, deque(maxlen=CLAIM_RATE_LIMIT)).append(now_ms)
        while len(self._attempts) > MAX_TRACKED_KEYS:
            del self._attempts[next(iter(self._attempts))]

    def _sign(self, record: ClaimRecord, csr: bytes, now: datetime) -> tuple[str, str, int]:
        """(PEM, hex serial, not_after ms) of a new certificate, recorded in the PKI's index."""
        cert = pki_mod.sign_device_csr(self.pki.device_ca, csr, gateway_id=record.gateway_id,
                                       serial=record.serial, now=now, days=self.cert_days)
        pki_mod.record_issued(self.pki, record.gateway_id, cert, now=now)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return pem, format(cert.serial_number, "x"), _ms(cert.not_valid_after_utc)

    def _claim(self, client_id: str, request: ClaimRequest) -> Reply:  # noqa: PLR0911
        now = self.clock()
        now_ms = _ms(now)
        # Only refused claims count, and only they are throttled: someone spamming a serial
        # printed on a device's label must not lock out the technician holding the real token
        # (192 random bits: guessing is hopeless anyway; the limit spares the hub's work).
        key = f"serial {request.serial}"
        limited = self._rate_limited(key, now_ms)
        record = self.registry.get(request.serial)
        # Only a requester holding the serial's token may leave a mark on its row; a stranger's
        # refusals go to the refusal log alone.
        proven = record is not None and tokens_match(request.token, record.token_hash)
        if proven:  # the limit is for strangers: the token holder always hears the real reason
            limited = None
        csr = request.csr.encode()
        try:
            fingerprint = key_fingerprint(csr)
        except CsrError as exc:
            if limited is None:
                self._note_attempt(key, now_ms)
            return self._refuse(client_id, request, limited or Reject(exc.code, str(exc)),
                                now_ms, proven=proven)
        verdict = decide_claim(record, serial=request.serial, token=request.token,
                               key_fingerprint=fingerprint, now_ms=now_ms)
        if isinstance(verdict, Reject):
            if limited is None:
                self._note_attempt(key, now_ms)
            return self._refuse(client_id, request, limited or verdict, now_ms, proven=proven)
        assert record is not None  # decide_claim refuses unknown serials
        if verdict == Proceed(replay=True) and record.cert_pem is not None:
            if record.renewed_ms is not None:  # the stored certificate is for a newer key now
                return self._refuse(client_id, request, Reject(
                    "token_used", "this claim token was used and the identity has since been "
                    "renewed; the gateway already holds its certificate"), now_ms, proven=True)
            log.info("claim answered again", extra={"serial": record.serial})
            return self._accept(client_id, request.request_id, record, record.cert_pem)
        try:
            pem, cert_serial, not_after_ms = self._sign(record, csr, now)
        except CsrError as exc:
            return self._refuse(client_id, request, Reject(exc.code, str(exc)), now_ms,
                                proven=True)
        if record.state == "registered" and not self.registry.claim(
                record.serial, token_hash=hash_token(request.token), key_fingerprint=fingerprint,
                now_ms=now_ms):
            return self._refuse(client_id, request, Reject(
                "token_used", "this claim token was used by a concurrent claim"), now_ms,
                proven=True)
        self.registry.issue(record.serial, cert_serial=cert_serial, not_after_ms=not_after_ms,
                            cert_pem=pem, now_ms=_ms(self.clock()))
        if self.activation is not None:
            self.activation.expect(record.gateway_id)
        log.info("certificate issued by claim", extra={"serial": record.serial,
                                                        "gateway": record.gateway_id,
                                                        "cert_serial": cert_serial})
        return self._accept(client_id, request.request_id, record, pem)

    def _refuse(self, client_id: str, request: ClaimRequest, reject: Reject, now_ms: int, *,
                proven: bool) -> Reply:
        """Refuse a claim; the serial's own row learns of it only if the token was right."""
        if proven:
            self.registry.record_error(request.serial, f"claim refused: {reject.code}: "
                                       f"{reject.message}", now_ms=now_ms)
        return self._reject(client_id, request.request_id, reject, serial=request.serial)

    def _renew(self, gateway_id: str, request: RenewRequest) -> Reply:
        now = self.clock()
        now_ms = _ms(now)
        limited = self._rate_limited(f"gateway {gateway_id}", now_ms)
        if limited:
            return self._reject(gateway_id, request.request_id, limited)
        self._note_attempt(f"gateway {gateway_id}", now_ms)
        record = self.registry.by_gateway(gateway_id)
        verdict = decide_renewal(record, gateway_id=gateway_id,
                                 revoked=gateway_id in pki_mod.revoked_identities(self.pki))
        if isinstance(verdict, Reject):
            return self._reject(gateway_id, request.request_id, verdict)
        assert record is not None
        try:
            pem, cert_serial, not_after_ms = self._sign(record, request.csr.encode(), now)
        except CsrError as exc:
            self.registry.record_error(record.serial, f"renewal refused: {exc.code}: {exc}",
                                       now_ms=now_ms)
            return self._reject(gateway_id, request.request_id, Reject(exc.code, str(exc)))
        self.registry.renew(gateway_id, cert_serial=cert_serial, not_after_ms=not_after_ms,
                            cert_pem=pem, now_ms=now_ms)
        log.info("certificate renewed", extra={"gateway": gateway_id, "cert_serial": cert_serial})
        return self._accept(gateway_id, request.request_id, record, pem)


CERT_WARN_MS = 7 * 86_400_000  # renewal starts at day 20 of 30; a week left means it failed
REVOKED_CHECK_INTERVAL_MS = 5_000
MAX_TRACKED_KEYS = 10_000  # rate-limit memory: serials and gateways seen in the last hour
REFUSAL_FLUSH_S = 5.0  # refusals reach the registry at most this late (and so often)
MAX_PENDING_REFUSALS = 10_000  # distinct (source, serial, code) held between two flushes
MAX_INBOX_BYTES = 16 * 1024 * 1024  # queued requests; a claim is ~1 KiB, 256 of the largest fit
MAX_REFUSAL_ROWS = 10_000  # the refusal table keeps the most recently active this many
CRL_WARN = timedelta(days=7)  # `careflow ca crl-refresh` runs daily and signs for 30 days


class Provisioning:
    """Everything ``careflow hub`` runs for the claim flow: registry, activation hook, service."""

    def __init__(self, settings: Settings, *, pki_dir: Path) -> None:
        self.pki = pki_mod.load_pki(pki_dir)
        self.registry = SqliteProvisioningRegistry(settings.db_path,
                                                   synchronous=settings.sqlite_synchronous)
        self.activation = Activation(self.registry, warn_within_ms=CERT_WARN_MS, pki=self.pki)
        device_url = settings.device_broker_url or settings.effective_broker_url
        self.service = ProvisioningService(settings, self.registry, self.pki,
                                           device=DeviceConfig(broker_url=str(device_url)),
                                           activation=self.activation,
                                           cert_days=settings.cert_days)

    def start(self) -> None:
        """Carry out pending revocations, then answer claims."""
        revoke_pending(self.registry, self.pki, now=datetime.now(UTC))
        self.service.start()

    def stop(self) -> None:
        """Stop answering; close the registry."""
        self.service.stop()
        self.registry.close()


def provisioning_for(settings: Settings) -> Provisioning | None:
    """The claim flow for this hub: with ``CAREFLOW_PKI_DIR`` (or the default PKI directory of
    ``careflow ca init`` if it exists), or on the embedded broker with a demo PKI in the data
    directory (made on first use); otherwise off (None).

    The demo PKI lets ``careflow demo`` and a laptop hub run the whole flow; its keys live next
    to the event store and its broker has no TLS, so only the hub's own checks (serial, token,
    CSR) protect it. Production sets CAREFLOW_PKI_DIR to a directory made by ``careflow ca init``.
    """
    if settings.pki_dir is not None:
        return Provisioning(settings, pki_dir=settings.pki_dir)
    default = pki_mod.default_pki_dir({})  # where `careflow ca init` writes by default
    if (default / f"{pki_mod.DEVICE_CA}.crt").exists():
        return Provisioning(settings, pki_dir=default)
    if not settings.embedded:
        return None
    demo_dir = settings.data_dir / "demo-pki"
    if not (demo_dir / f"{pki_mod.DEVICE_CA}.crt").exists():
        pki_mod.init_pki(demo_dir, now=datetime.now(UTC), broker_hosts=[settings.listen.host],
                         force=True)
        log.info("made a demo PKI for the embedded broker", extra={"dir": str(demo_dir)})
    return Provisioning(settings, pki_dir=demo_dir)
