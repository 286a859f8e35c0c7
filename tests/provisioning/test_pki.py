"""The PKI: CAs, device certificates from CSRs, the CRL, file modes. Pure tests, no broker."""

from __future__ import annotations

import base64
import os
import pwd
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from careflow.core.errors import CsrError, PkiError
from careflow.provisioning import pki as pki_module
from careflow.provisioning.pki import (
    BROKER_CONF_FILE,
    Pki,
    cert_not_after,
    crl_next_update,
    current_certificate,
    init_pki,
    is_revoked,
    load_pki,
    make_csr,
    new_device_key,
    record_issued,
    resign_crl,
    revoke,
    revoked_identities,
    sign_device_csr,
    write_device_acl,
)

NOW = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki") / "ca"
    init_pki(directory, now=NOW, broker_hosts=["broker.example.org", "10.0.0.5"])
    return load_pki(directory)


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str | None,
            sans: list[x509.GeneralName] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_it_issues_a_device_certificate_with_the_hubs_subject(pki: Pki) -> None:
    key = new_device_key()
    cert = sign_device_csr(pki.device_ca, make_csr(key, gateway_id="gw-0001"),
                           gateway_id="gw-0001", serial="SN-42", now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-0001"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-42"
    assert cert.issuer == pki.device_ca.cert.subject
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:careflow:gateway:gw-0001"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(pki.device_ca.cert)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert cert_not_after(pem) == NOW + timedelta(days=30)


def test_it_ignores_the_csrs_other_subject_fields_but_accepts_no_cn(pki: Pki) -> None:
    cert = sign_device_csr(pki.device_ca, csr_for(new_device_key(), None), gateway_id="gw-2",
                           serial="S", now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-2"


def test_it_gives_every_certificate_a_random_serial(pki: Pki) -> None:
    csr = make_csr(new_device_key(), gateway_id="gw-3")
    serials = {sign_device_csr(pki.device_ca, csr, gateway_id="gw-3", serial="S",
                               now=NOW).serial_number for _ in range(3)}
    assert len(serials) == 3


@pytest.mark.parametrize(("cn", "sans"), [
    ("gw-other", None),
    (None, [x509.UniformResourceIdentifier("urn:careflow:gateway:gw-other")]),
    ("gw-1", [x509.DNSName("gw-other")]),
    ("gw-1", [x509.RFC822Name("x@example.org")]),
    ("careflow-hub", None),
])
def test_it_refuses_a_csr_for_another_identity(pki: Pki, cn: str | None,
                                               sans: list[x509.GeneralName] | None) -> None:
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, csr_for(new_device_key(), cn, sans), gateway_id="gw-1",
                        serial="S", now=NOW)
    assert caught.value.code == "csr_identity_mismatch"


@pytest.mark.parametrize("gateway_id", ["careflow-hub", "careflow-claim", "gw/1", "gw+", "", "-x"])
def test_it_refuses_reserved_or_malformed_gateway_ids(pki: Pki, gateway_id: str) -> None:
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, make_csr(new_device_key(), gateway_id="gw-1"),
                        gateway_id=gateway_id, serial="S", now=NOW)
    assert caught.value.code == "gateway_id_invalid"


@pytest.mark.parametrize("key", [
    rsa.generate_private_key(public_exponent=65537, key_size=1024),
    ec.generate_private_key(ec.SECP224R1()),
], ids=["rsa-1024", "p-224"])
def test_it_refuses_weak_keys(pki: Pki, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, make_csr(key, gateway_id="gw-1"), gateway_id="gw-1",
                        serial="S", now=NOW)
    assert caught.value.code == "csr_weak_key"


def test_it_accepts_rsa_2048_and_p384(pki: Pki) -> None:
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP384R1())):
        sign_device_csr(pki.device_ca, make_csr(key, gateway_id="gw-1"), gateway_id="gw-1",
                        serial="S", now=NOW)


def test_it_refuses_a_csr_whose_signature_does_not_match(pki: Pki) -> None:
    pem = make_csr(new_device_key(), gateway_id="gw-1")
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, tampered.encode(), gateway_id="gw-1", serial="S", now=NOW)
    assert caught.value.code == "csr_bad_signature"


def test_it_refuses_garbage_as_csr_invalid(pki: Pki) -> None:
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, b"hello", gateway_id="gw-1", serial="S", now=NOW)
    assert caught.value.code == "csr_invalid"


def test_it_writes_private_keys_with_mode_0600(pki: Pki) -> None:
    keys = sorted(pki.dir.glob("*.key"))
    assert {k.name for k in keys} == {"claim-ca.key", "device-ca.key", "claim.key", "hub.key",
                                      "broker.key"}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700


def test_it_makes_separate_claim_and_device_cas(pki: Pki) -> None:
    assert pki.claim_ca.cert.subject != pki.device_ca.cert.subject
    claim = x509.load_pem_x509_certificate(pki.cert_path("claim").read_bytes())
    claim.verify_directly_issued_by(pki.claim_ca.cert)
    hub = x509.load_pem_x509_certificate(pki.cert_path("hub").read_bytes())
    hub.verify_directly_issued_by(pki.device_ca.cert)
    assert hub.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "careflow-hub"
    broker = x509.load_pem_x509_certificate(pki.cert_path("broker").read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert pki.ca_chain_pem == pki.device_ca_path.read_bytes()


def test_it_never_overwrites_an_existing_ca(tmp_path: Path) -> None:
    first = init_pki(tmp_path / "pki", now=NOW)
    before = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir() if p.is_file()}
    second = init_pki(tmp_path / "pki", now=NOW + timedelta(days=1))
    after = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir() if p.is_file()}
    assert before == after
    assert {s.action for s in first} >= {"created"}
    assert {s.action for s in second} == {"kept"}


def test_it_refuses_a_directory_inside_a_git_work_tree(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(PkiError, match="git work tree"):
        init_pki(tmp_path / "repo" / "secrets" / "pki", now=NOW)
    assert not (tmp_path / "repo" / "secrets").exists()
    init_pki(tmp_path / "repo" / "pki", now=NOW, force=True)


def test_it_imports_an_existing_device_ca(tmp_path: Path, pki: Pki) -> None:
    steps = init_pki(tmp_path / "new", now=NOW,
                     import_device_ca=(pki.device_ca_path, pki.dir / "device-ca.key"))
    imported = load_pki(tmp_path / "new")
    assert imported.device_ca.cert == pki.device_ca.cert
    assert imported.claim_ca.cert != pki.claim_ca.cert
    assert any(s.action == "imported" for s in steps)
    with pytest.raises(PkiError, match="not a CA"):
        init_pki(tmp_path / "other", now=NOW,
                 import_device_ca=(pki.cert_path("hub"), pki.key_path("hub")))


def test_it_starts_with_an_empty_crl_valid_for_30_days(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki", now=NOW)
    pki = load_pki(tmp_path / "pki")
    assert crl_next_update(pki) == NOW + timedelta(days=30)
    assert not is_revoked(pki, 1234)


def test_it_resigns_the_crl_keeping_its_entries(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki", now=NOW)
    pki = load_pki(tmp_path / "pki")
    revoke(pki, 0xABC, now=NOW)
    later = NOW + timedelta(days=20)
    resign_crl(pki, now=later)
    assert crl_next_update(pki) == later + timedelta(days=30)
    assert is_revoked(pki, 0xABC)
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(pki.device_ca.key.public_key())
    assert len(list(crl)) == 1


def test_it_revokes_idempotently_and_denies_the_identity_in_the_acl(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki", now=NOW)
    pki = load_pki(tmp_path / "pki")
    cert = sign_device_csr(pki.device_ca, make_csr(new_device_key(), gateway_id="gw-9"),
                           gateway_id="gw-9", serial="S", now=NOW)
    record_issued(pki, "gw-9", cert, now=NOW)
    current = current_certificate(pki, "gw-9")
    assert current is not None and current.serial == cert.serial_number
    assert current_certificate(pki, "gw-unknown") is None
    revoke(pki, cert.serial_number, now=NOW)
    revoke(pki, cert.serial_number, now=NOW)
    assert len(list(x509.load_pem_x509_crl(pki.crl_path.read_bytes()))) == 1
    assert revoked_identities(pki) == {"gw-9"}
    assert "user gw-9" not in pki.device_acl_path.read_text()  # the ACL is a separate step
    assert write_device_acl(pki)
    assert not write_device_acl(pki)
    assert "user gw-9\ntopic deny #" in pki.device_acl_path.read_text()
    # A new certificate for the same gateway lifts the deny block.
    fresh = sign_device_csr(pki.device_ca, make_csr(new_device_key(), gateway_id="gw-9"),
                            gateway_id="gw-9", serial="S", now=NOW)
    record_issued(pki, "gw-9", fresh, now=NOW)
    assert revoked_identities(pki) == set()
    assert "user gw-9" not in pki.device_acl_path.read_text()


def test_it_says_what_to_run_when_the_pki_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="careflow ca init"):
        load_pki(tmp_path / "nowhere")


def test_it_refuses_key_types_other_than_ec_and_rsa(pki: Pki) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]))
           .sign(key, None).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CsrError) as caught:
        sign_device_csr(pki.device_ca, csr, gateway_id="gw-1", serial="S", now=NOW)
    assert caught.value.code == "csr_weak_key"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_it_leaves_no_half_pki_when_init_fails_midway(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the CAs were made (here: signing the CRL) leaves no directory at all, so
    a re-run starts clean instead of keeping CAs no certificate was issued from."""
    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pki_module, "resign_crl", broken)
    with pytest.raises(OSError, match="No space left"):
        init_pki(tmp_path / "ca", now=NOW)
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    init_pki(tmp_path / "ca", now=NOW)
    assert load_pki(tmp_path / "ca").crl_path.exists()


def test_it_removes_what_it_added_to_an_existing_directory_when_init_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ca"
    target.mkdir()
    (target / "notes.txt").write_text("the operator's own file")
    monkeypatch.setattr(pki_module, "_broker_sans", lambda _hosts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        init_pki(target, now=NOW)
    assert _leftovers(target) == ["notes.txt"] and _leftovers(tmp_path) == ["ca"]


def test_it_leaves_no_half_pki_when_the_directory_is_not_writable(tmp_path: Path) -> None:
    target = tmp_path / "ca"
    target.mkdir()
    (target / "mosquitto-data").write_text("")  # a file where the broker's folder goes, made last
    with pytest.raises(FileExistsError):
        init_pki(target, now=NOW)
    assert _leftovers(target) == ["mosquitto-data"]


def test_it_renders_the_broker_user_into_the_config_and_lets_its_group_read_the_broker_files(
        tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    target = tmp_path / "ca"
    steps = init_pki(target, now=NOW, broker_user=me)
    conf = (target / BROKER_CONF_FILE).read_text()
    assert f"\nuser {me}\n" in conf
    group = pwd.getpwnam(me).pw_gid
    for path in (target, target / "broker.key", target / "mosquitto-data"):
        assert path.stat().st_gid == group, path
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "broker.key").stat().st_mode) == 0o640
    for key in ("claim-ca.key", "device-ca.key", "hub.key", "claim.key"):
        assert stat.S_IMODE((target / key).stat().st_mode) == 0o600, key
    assert all(target in (step.path.parent, step.path) for step in steps)


def test_it_refuses_a_broker_user_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no-such-user-here"):
        init_pki(tmp_path / "ca", now=NOW, broker_user="no-such-user-here")
    assert _leftovers(tmp_path) == []


def _other_account() -> pwd.struct_passwd | None:
    """An account this process is not, whose primary group it may not chgrp to."""
    for name in ("mosquitto", "daemon", "bin"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    return None


@pytest.fixture
def unprivileged_dir() -> Iterator[Path]:
    """A folder user nobody can reach and write (pytest's tmp_path is root's alone)."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    folder = Path(tempfile.mkdtemp(prefix="careflow-nobody-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or _other_account() is None,
                    reason="needs root to start a real unprivileged process")
def test_run_unprivileged_the_broker_key_stays_private_until_its_group_is_granted(
        unprivileged_dir: Path) -> None:
    """Not root, init cannot chgrp to the broker's group: making broker.key 0640 anyway would
    let the invoking user's own group (often a shared 'users') read the broker's private key."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    broker_user = _other_account()
    assert broker_user is not None
    target = unprivileged_dir / "ca"
    code = ("import sys; from datetime import datetime, UTC; from pathlib import Path; "
            "from careflow.provisioning.pki import init_pki; "
            "steps = init_pki(Path(sys.argv[1]), now=datetime.now(UTC), force=True, "
            "broker_user=sys.argv[2]); "
            "print('\\n'.join(f'{s.action}: {s.what}' for s in steps))")
    done = subprocess.run(  # a real non-root process (nobody), not a mocked chown
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code, str(target), broker_user.pw_name],
        capture_output=True, text=True, timeout=120, check=False, cwd=unprivileged_dir)
    assert done.returncode == 0, done.stderr
    assert "to do: only root can give" in done.stdout
    assert stat.S_IMODE((target / "broker.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert "chmod" in done.stdout  # the step left to do says the modes too
