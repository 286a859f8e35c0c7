"""The provisioning service's answers, with requests injected as decoded MQTT messages (no broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509

from careflow.edge.claim import claim_csr
from careflow.provisioning import pki as pki_mod
from careflow.provisioning import service as service_module
from careflow.provisioning.claims import hash_token
from careflow.provisioning.protocol import request_topic
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.revocation import revoke_gateway
from careflow.provisioning.service import Activation, DeviceConfig, ProvisioningService
from tests.conftest import make_settings

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pki_mod.Pki:
    directory = tmp_path_factory.mktemp("pki")
    pki_mod.init_pki(directory, now=T0, force=True)
    return pki_mod.load_pki(directory)


@pytest.fixture
def service(tmp_path: Path, pki: pki_mod.Pki) -> Iterator[ProvisioningService]:
    settings = make_settings(tmp_path, "mqtt://127.0.0.1:1")
    registry = SqliteProvisioningRegistry(settings.db_path, synchronous="normal")
    svc = ProvisioningService(settings, registry, pki,
                              device=DeviceConfig(broker_url="mqtts://hub:8883"),
                              activation=Activation(registry, warn_within_ms=7 * 86_400_000),
                              clock=Clock())
    yield svc
    registry.close()


def register(svc: ProvisioningService, serial: str, token: str = "tok",
             ttl: timedelta = timedelta(hours=1)) -> None:
    now_ms = int(svc.clock().timestamp() * 1000)
    svc.registry.register(serial=serial, site="berlin", gateway_id=f"gw-{serial.lower()}",
                          token_hash=hash_token(token),
                          token_expires_ms=now_ms + int(ttl.total_seconds() * 1000),
                          replace=False, now_ms=now_ms)


def ask(svc: ProvisioningService, serial: str, token: str = "tok", csr: bytes | None = None,
        client: str = "claim-x") -> tuple[str, dict[str, object]]:
    body = {"serial": serial, "token": token, "request_id": "r1",
            "csr": (csr or claim_csr(pki_mod.new_device_key())).decode()}
    [(topic, payload)] = svc.handle(request_topic(client), json.dumps(body).encode())
    return topic.rsplit("/", 1)[1], json.loads(payload)


def test_it_accepts_a_good_claim_with_certificate_chain_and_config(
        service: ProvisioningService) -> None:
    register(service, "SN-1")
    kind, body = ask(service, "SN-1")
    assert kind == "accepted", body
    assert body["gateway_id"] == "gw-sn-1"
    assert "BEGIN CERTIFICATE" in str(body["certificate"]) and body["ca_chain"]
    config = body["config"]
    assert isinstance(config, dict) and config["broker_url"] == "mqtts://hub:8883"
    assert config["topics"]["renew"] == "careflow/provision/gw-sn-1/renew"
    record = service.registry.get("SN-1")
    assert record is not None and record.state == "issued" and record.cert_not_after_ms


def test_it_answers_a_repeated_claim_with_the_same_certificate(
        service: ProvisioningService) -> None:
    register(service, "SN-1")
    csr = claim_csr(pki_mod.new_device_key())
    _, first = ask(service, "SN-1", csr=csr)
    kind, again = ask(service, "SN-1", csr=csr)
    assert kind == "accepted" and again["certificate"] == first["certificate"]


@pytest.mark.parametrize(("setup", "request_", "code"), [
    ("none", {}, "unknown_serial"),
    ("registered", {"token": "wrong"}, "token_invalid"),
    ("expired", {}, "token_expired"),
    ("used", {}, "token_used"),
    ("registered", {"csr": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                           b"-----END CERTIFICATE REQUEST-----\n"}, "csr_invalid"),
    ("registered", {"csr": pki_mod.make_csr(pki_mod.new_device_key(), gateway_id="gw-other")},
     "csr_identity_mismatch"),
])
def test_it_rejects_with_a_code(service: ProvisioningService, setup: str,
                                request_: dict[str, object], code: str) -> None:
    if setup != "none":
        register(service, "SN-1")
    if setup == "expired":
        service.clock.now = T0 + timedelta(hours=2)  # type: ignore[attr-defined]
    if setup == "used":
        ask(service, "SN-1")
    kind, body = ask(service, "SN-1", **request_)  # type: ignore[arg-type]
    assert (kind, body["code"]) == ("rejected", code), body
    assert body["request_id"] == "r1"
    record = service.registry.get("SN-1")
    if record is not None and code == "token_invalid":  # a stranger: the row stays as it was
        assert record.last_error is None
    elif record is not None and code != "token_used":
        assert record.last_error and code in record.last_error
    service.flush_refusals()
    assert service.registry.refusals(limit=1, serial="SN-1")[0].code == code


def test_it_rate_limits_claims_per_serial_with_retry_after(service: ProvisioningService) -> None:
    register(service, "SN-1")
    codes = [ask(service, "SN-1", token="guess")[1]["code"] for _ in range(5)]
    assert codes == ["token_invalid"] * 5
    kind, body = ask(service, "SN-1", token="guess")  # the sixth wrong guess waits
    assert (kind, body["code"]) == ("rejected", "rate_limited")
    assert body["retry_after_s"] == 600
    # the technician's real token is never locked out by someone spamming the serial
    assert ask(service, "SN-1")[0] == "accepted"
    service.clock.now = T0 + timedelta(minutes=10, seconds=1)  # type: ignore[attr-defined]
    assert ask(service, "SN-1", token="guess")[1]["code"] == "token_invalid"  # window over


def test_it_refuses_malformed_requests_without_crashing(service: ProvisioningService) -> None:
    [(topic, payload)] = service.handle(request_topic("claim-x"), b"not json")
    assert topic.endswith("/rejected") and json.loads(payload)["code"] == "bad_request"
    [(_, payload)] = service.handle(request_topic("claim-x"), b'{"serial": "SN-1"}')
    assert json.loads(payload)["code"] == "bad_request"
    assert service.handle("careflow/provision/a/b/request", b"{}") == []


def test_it_renews_only_known_gateways(service: ProvisioningService) -> None:
    register(service, "SN-1")
    ask(service, "SN-1")
    csr = pki_mod.make_csr(pki_mod.new_device_key(), gateway_id="gw-sn-1").decode()
    [(topic, payload)] = service.handle("careflow/provision/gw-sn-1/renew",
                                        json.dumps({"csr": csr, "request_id": "r2"}).encode())
    assert topic == "careflow/provision/gw-sn-1/accepted", payload
    [(topic, payload)] = service.handle("careflow/provision/gw-nobody/renew",
                                        json.dumps({"csr": csr, "request_id": "r3"}).encode())
    assert json.loads(payload)["code"] == "unknown_gateway"


def test_it_warns_when_certificates_near_their_end(service: ProvisioningService) -> None:
    register(service, "SN-1")
    ask(service, "SN-1")
    assert service.activation is not None
    assert service.activation.expiry_problem(int(T0.timestamp() * 1000)) is None
    late_ms = int((T0 + timedelta(days=25)).timestamp() * 1000)
    problem = service.activation.expiry_problem(late_ms)
    assert problem is not None and "gw-sn-1" in problem


def test_it_warns_before_the_crl_expires_and_stops_once_it_is_refreshed(
        tmp_path: Path) -> None:
    """An expired CRL locks every gateway out, so the hub raises it a week ahead."""
    directory = tmp_path / "pki"
    pki_mod.init_pki(directory, now=T0, force=True)  # CRL valid for 30 days
    pki = pki_mod.load_pki(directory)
    registry = SqliteProvisioningRegistry(tmp_path / "careflow.db", synchronous="normal")
    try:
        activation = Activation(registry, warn_within_ms=7 * 86_400_000, pki=pki)
        assert activation.expiry_problem(int((T0 + timedelta(days=20)).timestamp() * 1000)) \
            is None
        late = T0 + timedelta(days=25)
        problem = activation.expiry_problem(int(late.timestamp() * 1000))
        assert problem is not None and "crl-refresh" in problem
        pki_mod.resign_crl(pki, now=late)
        # cached for a minute, then clear
        assert activation.expiry_problem(int(late.timestamp() * 1000) + 61_000) is None
    finally:
        registry.close()


def test_a_revoked_gateway_cannot_keep_an_older_certificate_or_renew_its_way_back(
        service: ProvisioningService) -> None:
    """A stolen gateway that renewed twice before the operator acted: revocation takes every
    certificate it holds, and the hub refuses to sign it a fresh one."""
    register(service, "SN-REV")
    _, first = ask(service, "SN-REV")
    held = [str(first["certificate"])]
    for request_id in ("r2", "r3"):
        csr = pki_mod.make_csr(pki_mod.new_device_key(), gateway_id="gw-sn-rev").decode()
        [(topic, payload)] = service.handle("careflow/provision/gw-sn-rev/renew",
                                            json.dumps({"csr": csr, "request_id": request_id}
                                                       ).encode())
        assert topic.endswith("/accepted"), payload
        held.append(json.loads(payload)["certificate"])
    serials = [x509.load_pem_x509_certificate(pem.encode()).serial_number for pem in held]

    revoke_gateway(service.pki, "gw-sn-rev", now=service.clock())
    assert all(pki_mod.is_revoked(service.pki, serial) for serial in serials)
    assert "gw-sn-rev" in pki_mod.revoked_identities(service.pki)

    csr = pki_mod.make_csr(pki_mod.new_device_key(), gateway_id="gw-sn-rev").decode()
    [(topic, payload)] = service.handle("careflow/provision/gw-sn-rev/renew",
                                        json.dumps({"csr": csr, "request_id": "r4"}).encode())
    assert topic.endswith("/rejected") and json.loads(payload)["code"] == "revoked"
    assert "gw-sn-rev" in pki_mod.revoked_identities(service.pki)  # still out


def test_replacing_a_device_revokes_its_certificates_but_not_its_successors(
        tmp_path: Path) -> None:
    pki_mod.init_pki(tmp_path / "pki", now=T0, force=True)
    pki = pki_mod.load_pki(tmp_path / "pki")

    def issue(at: datetime) -> int:
        cert = pki_mod.sign_device_csr(
            pki.device_ca, pki_mod.make_csr(pki_mod.new_device_key(), gateway_id="gw-r"),
            gateway_id="gw-r", serial="SN-R", now=at)
        pki_mod.record_issued(pki, "gw-r", cert, now=at)
        return int(cert.serial_number)

    old_first, old_renewed = issue(T0), issue(T0 + timedelta(days=20))
    successor = issue(T0 + timedelta(days=21))
    pki_mod.revoke_identity(pki, "gw-r", now=T0 + timedelta(days=22), up_to_serial=old_renewed)
    assert pki_mod.is_revoked(pki, old_first) and pki_mod.is_revoked(pki, old_renewed)
    assert not pki_mod.is_revoked(pki, successor)
    assert "gw-r" not in pki_mod.revoked_identities(pki)


def test_the_rate_limit_memory_is_bounded_whatever_serials_are_named(
        service: ProvisioningService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "MAX_TRACKED_KEYS", 50)
    for i in range(200):
        ask(service, f"SN-SPAM-{i}")
    assert len(service._attempts) == 50


def test_a_strangers_refused_claims_leave_a_real_serials_row_unchanged(
        service: ProvisioningService) -> None:
    register(service, "SN-1")
    before = service.registry.get("SN-1")
    bad_csr = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    for i in range(20):  # wrong tokens, with good and bad CSRs, past the rate limit
        ask(service, "SN-1", token=f"guess-{i}", csr=bad_csr if i % 2 else None,
            client=f"claim-evil-{i % 3}")
    assert service.registry.get("SN-1") == before
    service.flush_refusals()
    assert service.registry.get("SN-1") == before
    refused = service.registry.refusals(limit=100, serial="SN-1")
    assert sum(r.count for r in refused) == 20
    assert {r.source for r in refused} == {"claim-evil-0", "claim-evil-1", "claim-evil-2"}
    assert ask(service, "SN-1")[0] == "accepted"  # the technician is not locked out


def test_refused_claims_are_written_in_one_transaction_per_flush_not_one_each(
        service: ProvisioningService) -> None:
    """A flood of refusals costs the store nothing until the flush, then one commit."""
    register(service, "SN-1")
    statements: list[str] = []
    service.registry._conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    csr = claim_csr(pki_mod.new_device_key())
    for i in range(100):
        ask(service, "SN-1" if i % 2 else f"SN-NOBODY-{i}", token="guess", csr=csr)
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT", "UPDATE", "INSERT"))] == []
    service.flush_refusals()
    assert sum(s == "COMMIT" for s in statements) == 1
    assert sum(r.count for r in service.registry.refusals(limit=1000)) == 100


def test_the_refusal_table_and_memory_stay_bounded(
        service: ProvisioningService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "MAX_REFUSAL_ROWS", 40)
    service.refusals.max_keys = 25
    for round_ in range(4):
        for i in range(60):
            ask(service, f"SN-SPAM-{round_}-{i}")
        assert len(service.refusals) <= 25 + 1  # the overflow key keeps the count
        service.clock.now += timedelta(seconds=1)  # type: ignore[attr-defined]
        service.flush_refusals()
    rows = service.registry.refusals(limit=1000)
    assert len(rows) == 40
    assert rows[0].last_ms >= rows[-1].last_ms  # newest first
    assert any(r.source == "*" for r in rows)  # beyond the memory bound, counted, not named
    # one serial hammered: its rate-limit memory holds the few attempts that matter, not all
    for _ in range(300):
        ask(service, "SN-HAMMERED", token="guess")
    assert len(service._attempts["serial SN-HAMMERED"]) <= 5


def test_listing_refusals_reads_through_an_index_not_a_sort(
        service: ProvisioningService) -> None:
    conn = service.registry._conn  # type: ignore[attr-defined]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    service.registry.refusals(limit=10)
    service.registry.refusals(limit=10, serial="SN-1")
    conn.set_trace_callback(None)
    assert len(statements) == 2
    for sql in statements:  # as run, with the parameters bound
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "INDEX" in plan and "TEMP B-TREE" not in plan, plan


def test_requests_waiting_for_the_worker_are_bounded_in_bytes_not_only_in_number(
        service: ProvisioningService) -> None:
    """The broker passes up to max_packet_size (1 MiB) per message; while the worker waits on a
    busy database, 10,000 queued requests must not mean 10 GiB held. paho's own message object
    is handed to the adapter directly (no worker runs, so nothing drains the queue)."""
    huge = b"{" * (1024 * 1024)
    for _ in range(300):
        message = paho.MQTTMessage(topic=request_topic("claim-x").encode())
        message.payload = huge
        service._on_message(service._client, None, message)
    held = [payload for _, payload in list(service._inbox.queue)]
    assert sum(map(len, held)) <= service_module.MAX_INBOX_BYTES
    assert held, "oversized requests are still queued, to be answered bad_request"
    [(topic, answer)] = service.handle(request_topic("claim-x"), held[0])
    assert topic.endswith("/rejected") and json.loads(answer)["code"] == "bad_request"


def test_a_strangers_guesses_never_hide_the_real_reason_from_the_token_holder(
        service: ProvisioningService) -> None:
    """The rate limit is for strangers: the technician holding the real token is told what is
    really wrong (here: the token expired), on the wire and on the serial's row, however many
    wrong guesses someone else made at the same serial."""
    register(service, "SN-1", ttl=timedelta(minutes=1))
    for i in range(6):
        ask(service, "SN-1", token=f"guess-{i}", client="claim-evil")
    assert ask(service, "SN-1", token="guess-6", client="claim-evil")[1]["code"] == \
        "rate_limited"
    service.clock.now = T0 + timedelta(minutes=2)  # type: ignore[attr-defined]
    kind, body = ask(service, "SN-1")
    assert (kind, body["code"]) == ("rejected", "token_expired")
    record = service.registry.get("SN-1")
    assert record is not None and "token_expired" in (record.last_error or "")


def test_refusals_the_store_cannot_take_are_kept_for_the_next_flush(
        service: ProvisioningService) -> None:
    """A flush that fails (here SQLite itself refuses the write) must not lose the counts: they
    are folded back and written by the next flush."""
    register(service, "SN-1")
    for i in range(7):
        ask(service, "SN-1", token=f"guess-{i}", client="claim-evil")
    conn = service.registry._conn  # type: ignore[attr-defined]
    conn.execute("PRAGMA query_only = ON")  # every write now fails inside SQLite
    service.flush_refusals()  # logged, never raised
    conn.execute("PRAGMA query_only = OFF")
    ask(service, "SN-1", token="guess-7", client="claim-evil")
    service.flush_refusals()
    refused = service.registry.refusals(limit=100, serial="SN-1")
    assert sum(r.count for r in refused) == 8
