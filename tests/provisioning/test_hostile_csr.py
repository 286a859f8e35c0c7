"""CSRs the builder refuses to make but an attacker can (valid signatures over hostile DER):
each is a refusal with a CSR code, never the hub's ``internal_error`` "bug" answer with a
traceback in the log, whether the sender holds the token or not."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import hash_token
from careflow.provisioning.protocol import request_topic
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.service import DeviceConfig, ProvisioningService
from tests.conftest import make_settings

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
P256_OID = bytes.fromhex("06082a8648ce3d030107")
UNKNOWN_CURVE_OID = bytes.fromhex("06082a8648ce3d030109")  # a prime curve nobody supports


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _children(der: bytes) -> list[bytes]:
    """The elements of a DER SEQUENCE."""
    def header(buf: bytes, at: int) -> tuple[int, int]:  # (start of body, body length)
        length = buf[at + 1]
        at += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(buf[at:at + size], "big")
            at += size
        return at, length
    start, length = header(der, 0)
    body, out, at = der[start:start + length], [], 0
    while at < len(body):
        inner, size = header(body, at)
        out.append(body[at:inner + size])
        at = inner + size
    return out


def hostile_csr(key: ec.EllipticCurvePrivateKey, name: str, old: bytes, new: bytes,
                extensions: tuple[x509.ExtensionType, ...] = ()) -> str:
    """A CSR for ``name`` whose signed part has ``old`` replaced by ``new``, signed again."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    signed, algorithm, _ = _children(der)
    assert signed.count(old) == 1 and len(old) == len(new)
    signed = signed.replace(old, new)
    signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, signed + algorithm + _tlv(0x03, b"\x00" + signature))
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def _cases() -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    twins = (x509.UnrecognizedExtension(ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
             x509.UnrecognizedExtension(ObjectIdentifier("1.2.3.5"), b"\x05\x00"))
    return {
        "subject not UTF-8": hostile_csr(key, "gw-sn-1", b"gw-sn-1", b"gw-sn-\xff"),
        "one extension twice": hostile_csr(key, "gw-sn-1", bytes.fromhex("06032a0305"),
                                           bytes.fromhex("06032a0304"), twins),
        "unsupported curve": hostile_csr(key, "gw-sn-1", P256_OID, UNKNOWN_CURVE_OID),
    }


CASES = _cases()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ProvisioningService]:
    pki_mod.init_pki(tmp_path / "pki", now=T0, force=True)
    settings = make_settings(tmp_path, "mqtt://127.0.0.1:1")  # handle() only: no broker
    registry = SqliteProvisioningRegistry(settings.db_path, synchronous="normal")
    svc = ProvisioningService(settings, registry, pki_mod.load_pki(tmp_path / "pki"),
                              device=DeviceConfig(broker_url="mqtts://hub:8883"),
                              clock=lambda: T0)
    now_ms = int(T0.timestamp() * 1000)
    registry.register(serial="SN-1", site="berlin", gateway_id="gw-sn-1",
                      token_hash=hash_token("tok"),
                      token_expires_ms=now_ms + int(timedelta(hours=1).total_seconds() * 1000),
                      replace=False, now_ms=now_ms)
    yield svc
    registry.close()


@pytest.mark.parametrize("token", ["tok", "a stranger's guess"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_csr_is_refused_as_a_bad_csr_not_answered_as_a_hub_bug(
        service: ProvisioningService, case: str, token: str,
        caplog: pytest.LogCaptureFixture) -> None:
    body = {"serial": "SN-1", "token": token, "request_id": "r1", "csr": CASES[case]}
    [(topic, payload)] = service.handle(request_topic("claim-x"), json.dumps(body).encode())
    answer = json.loads(payload)
    assert topic.endswith("/rejected")
    assert answer["code"] != "internal_error", answer
    if token == "tok":
        assert answer["code"].startswith("csr_"), answer
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged as a bug"
