"""Certificate authorities for provisioning: a claim CA, a device CA, their certificates and a CRL.

Two CAs, so that the claim certificate baked into every gateway image can never pass as a
device: the broker's claim listener trusts only the claim CA, its device listener only the device
CA. Everything here is pure except the small file helpers, which write atomically (temporary file,
fsync, rename) and create private keys with mode 0600 from the start. ``now`` is always passed in.
Key material is never logged or printed.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from careflow.core.errors import CsrError, PkiError
from careflow.schemas.models import NAME_PATTERN

__all__ = [
    "BROKER_CONF_FILE",
    "CLAIM_IDENTITY",
    "HUB_IDENTITY",
    "BrokerAccount",
    "CertAuthority",
    "InitStep",
    "IssuedCert",
    "Pki",
    "PrivateKey",
    "broker_account",
    "cert_not_after",
    "crl_needs_refresh",
    "crl_next_update",
    "current_certificate",
    "default_pki_dir",
    "find_git_work_tree",
    "fsync_dir",
    "init_pki",
    "is_revoked",
    "issued_certificates",
    "load_pki",
    "make_csr",
    "new_device_key",
    "pki_status",
    "record_issued",
    "render_broker_config",
    "render_device_acl",
    "resign_crl",
    "revoke",
    "revoke_identity",
    "revoked_identities",
    "sign_device_csr",
    "write_atomic",
    "write_device_acl",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

HUB_IDENTITY = "careflow-hub"
CLAIM_IDENTITY = "careflow-claim"
# A gateway must never be issued a certificate whose CN is the hub's (it would get the hub's ACL).
_RESERVED = frozenset({HUB_IDENTITY, CLAIM_IDENTITY})
_GATEWAY_ID = re.compile(NAME_PATTERN.replace("$", r"\Z"))
_SAN_PREFIX = "urn:careflow:gateway:"
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048
_BACKDATE = timedelta(minutes=5)  # tolerate gateways whose clock is a little behind

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 30

CLAIM_CA = "claim-ca"
DEVICE_CA = "device-ca"
CLAIM_CERT = "claim"
HUB_CERT = "hub"
BROKER_CERT = "broker"
CRL_FILE = "crl.pem"
ISSUED_FILE = "issued.jsonl"
DEVICE_ACL_FILE = "device.acl"
CLAIM_ACL_FILE = "claim.acl"
BROKER_CONF_FILE = "mosquitto-careflow.conf"
# The shipped templates: package data of careflow.mosquitto (the mosquitto/ folder, next to its
# README), found the same way from a source checkout, a wheel or a zip.
TEMPLATE_PACKAGE = "careflow.mosquitto"


# --- file helpers -------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one.

    The temporary file is created with ``mode`` (0600 for keys) by ``os.open``, so a key is never
    readable by others even for a moment; it is fsynced, renamed over ``path``, and the directory
    is fsynced so the rename survives a power cut.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Fsync a directory, so that the renames and new entries in it survive a power cut."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(public: object) -> bytes:
    """A public key as DER SubjectPublicKeyInfo, to compare keys of any type."""
    return public.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        msg = f"{what} {path} does not exist. Run `careflow ca init --dir {path.parent}` first."
        raise PkiError(msg) from exc
    except OSError as exc:
        msg = f"cannot read {what} {path}: {exc.strerror or exc}"
        raise PkiError(msg) from exc


def _load_key(data: bytes, path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The message of the library never contains the key itself; ours names only the file.
        msg = f"{path} is not an unencrypted PEM private key"
        raise PkiError(msg) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        msg = f"{path} holds a {type(key).__name__}; careflow CAs use EC or RSA keys"
        raise PkiError(msg)
    return key


def _load_cert(data: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        msg = f"{path} is not a PEM certificate"
        raise PkiError(msg) from exc


# --- CAs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertAuthority:
    """A CA certificate and its private key (never printed: the dataclass repr hides it)."""

    cert: x509.Certificate
    key: PrivateKey

    def __repr__(self) -> str:
        return f"CertAuthority({self.cert.subject.rfc4514_string()})"

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path) -> CertAuthority:
        """Load a CA from PEM files and check that it is a CA and that the key matches.

        Raises:
            PkiError: a file is missing, unreadable, not a CA, or the key belongs to another cert.
        """
        cert = _load_cert(_read(cert_path, "CA certificate"), cert_path)
        key = _load_key(_read(key_path, "CA key"), key_path)
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = x509.BasicConstraints(ca=False, path_length=None)
        if not constraints.ca:
            msg = f"{cert_path} is not a CA certificate (BasicConstraints CA is not true)"
            raise PkiError(msg)
        if _spki(key.public_key()) != _spki(cert.public_key()):
            msg = f"the key {key_path} does not belong to the certificate {cert_path}"
            raise PkiError(msg)
        return cls(cert=cert, key=key)

    @classmethod
    def load(cls, directory: Path, name: str) -> CertAuthority:
        """Load ``{name}.crt`` and ``{name}.key`` from ``directory``."""
        return cls.from_files(directory / f"{name}.crt", directory / f"{name}.key")

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM."""
        return _cert_pem(self.cert)


def _name(common_name: str, *extra: x509.NameAttribute[str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "careflow"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name), *extra])


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) and \
        isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()


def _new_ca(common_name: str, *, now: datetime) -> CertAuthority:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertAuthority(cert=cert, key=key)


def _leaf(ca: CertAuthority, subject: x509.Name, public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
          *, now: datetime, days: int, eku: ExtendedKeyUsageOID | x509.ObjectIdentifier,
          sans: Sequence[x509.GeneralName]) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=isinstance(public, rsa.RSAPublicKey),
                                     data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)  # type: ignore[list-item]
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, _hash_for(ca.key))


# --- the PKI directory --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A loaded PKI directory: both CAs and where every file lives."""

    dir: Path
    claim_ca: CertAuthority
    device_ca: CertAuthority

    def path(self, name: str) -> Path:
        """Any file in the PKI directory."""
        return self.dir / name

    @property
    def crl_path(self) -> Path:
        """The device CA's CRL (PEM), read by the broker's device listener."""
        return self.dir / CRL_FILE

    @property
    def issued_path(self) -> Path:
        """One JSON line per device certificate issued (gateway, serial, expiry)."""
        return self.dir / ISSUED_FILE

    @property
    def device_acl_path(self) -> Path:
        """The device listener's ACL, regenerated with a deny block per revoked gateway."""
        return self.dir / DEVICE_ACL_FILE

    @property
    def claim_acl_path(self) -> Path:
        """The claim listener's ACL."""
        return self.dir / CLAIM_ACL_FILE

    @property
    def broker_conf_path(self) -> Path:
        """The rendered, ready-to-run Mosquitto configuration."""
        return self.dir / BROKER_CONF_FILE

    @property
    def device_ca_path(self) -> Path:
        """The device CA certificate (the device listener's cafile; gateways trust it too)."""
        return self.dir / f"{DEVICE_CA}.crt"

    @property
    def ca_chain_pem(self) -> bytes:
        """What a provisioned gateway needs to trust besides the broker: the device CA, as PEM."""
        return self.device_ca.cert_pem

    def cert_path(self, name: str) -> Path:
        """``{name}.crt`` for ``claim``, ``hub``, ``broker``."""
        return self.dir / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        """``{name}.key`` (mode 0600) for ``claim``, ``hub``, ``broker``."""
        return self.dir / f"{name}.key"


def default_pki_dir(environ: dict[str, str] | None = None) -> Path:
    """``$CAREFLOW_PKI_DIR`` or ``~/.config/careflow/pki``: outside any repository."""
    env = os.environ if environ is None else environ
    configured = env.get("CAREFLOW_PKI_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path("~/.config/careflow/pki").expanduser()


def load_pki(directory: Path) -> Pki:
    """Load both CAs from a directory made by ``careflow ca init``.

    Raises:
        PkiError: the directory or a CA file is missing or unusable (the message says what to run).
    """
    if not directory.is_dir():
        msg = (f"no PKI directory at {directory}. Run `careflow ca init --dir {directory}` (or set "
               "CAREFLOW_PKI_DIR to where it lives).")
        raise PkiError(msg)
    return Pki(dir=directory, claim_ca=CertAuthority.load(directory, CLAIM_CA),
               device_ca=CertAuthority.load(directory, DEVICE_CA))


def find_git_work_tree(path: Path) -> Path | None:
    """The root of the git work tree that contains ``path`` (existing or not), or None."""
    probe = path.expanduser().absolute()
    for candidate in (probe, *probe.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class InitStep:
    """One file ``init_pki`` looked at: ``created`` or ``kept`` (existed already)."""

    path: Path
    action: str
    what: str


def _ensure_ca(directory: Path, name: str, common_name: str, *, now: datetime,
               steps: list[InitStep], what: str, key_note: str,
               imported: tuple[Path, Path] | None = None) -> CertAuthority:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        ca = CertAuthority.from_files(cert_path, key_path)
        if imported is not None:
            existing = CertAuthority.from_files(*imported)
            if existing.cert != ca.cert:
                msg = (f"{cert_path} already holds a different {what}; refusing to replace a CA "
                       "that has issued certificates. Use a new --dir to import this one.")
                raise PkiError(msg)
        steps.append(InitStep(cert_path, "kept", what))
        return ca
    ca = CertAuthority.from_files(*imported) if imported else _new_ca(common_name, now=now)
    write_atomic(key_path, _key_pem(ca.key), mode=0o600)
    write_atomic(cert_path, ca.cert_pem)
    steps.append(InitStep(cert_path, "imported" if imported else "created", what))
    steps.append(InitStep(key_path, "imported" if imported else "created",
                          f"{what} private key (0600; {key_note})"))
    return ca


def _ensure_leaf(directory: Path, name: str, ca: CertAuthority, subject: x509.Name, *,
                 now: datetime, eku: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName],
                 steps: list[InitStep], what: str) -> None:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        steps.append(InitStep(cert_path, "kept", what))
        return
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca, subject, key.public_key(), now=now, days=LEAF_DAYS, eku=eku, sans=sans)
    write_atomic(key_path, _key_pem(key), mode=0o600)
    write_atomic(cert_path, _cert_pem(cert))
    steps.append(InitStep(cert_path, "created", what))
    steps.append(InitStep(key_path, "created", "its private key (0600)"))


def _broker_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in ("localhost", "127.0.0.1", *hosts):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in sans:
            sans.append(entry)
    return sans


@dataclass(frozen=True, slots=True)
class BrokerAccount:
    """The user Mosquitto drops to when started as root (``user`` in its config), and its group."""

    name: str
    uid: int
    gid: int
    group: str


def broker_account(name: str) -> BrokerAccount:
    """The account ``name`` on this machine, or a PkiError that says what to do."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        msg = (f"there is no user {name!r} on this machine for the broker: install Mosquitto "
               "(Debian's package creates user mosquitto) or name another --broker-user")
        raise PkiError(msg) from exc
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return BrokerAccount(name, entry.pw_uid, entry.pw_gid, group)


def init_pki(directory: Path, *, now: datetime, broker_hosts: Sequence[str] = (),
             import_device_ca: tuple[Path, Path] | None = None, force: bool = False,
             device_port: int = 8883, claim_port: int = 8884, bind: str = "0.0.0.0",  # noqa: S104
             persistence_dir: Path | None = None, broker_user: str | None = None,
             ) -> list[InitStep]:
    """Create (or complete) a PKI directory; never overwrite a CA or certificate that exists.

    All or nothing: a new directory is built as a hidden sibling and renamed into place at the
    end; in an existing one, what this run added is removed again if a step fails. A failure
    never leaves CAs that no certificate, CRL or broker configuration goes with.

    Args:
        directory: where to write; refused inside a git work tree unless ``force``.
        now: the issue time.
        broker_hosts: extra DNS names / IPs for the broker's certificate.
        import_device_ca: (certificate, key) of an existing device CA to use instead of a new one.
        force: allow a directory inside a git work tree.
        device_port, claim_port, bind, persistence_dir: for the rendered broker configuration.
        broker_user: the user Mosquitto runs as (it drops to it when started as root): written
            into the configuration; the directory and ``broker.key`` become readable by its
            group and the persistence folder its own (when this process may chown; otherwise a
            ``to do`` step says what to run). The CA, hub and claim keys stay 0600.

    Returns:
        What was created, imported, kept or is left to do, in order.

    Raises:
        PkiError: inside a git work tree, an unusable file exists, an import conflicts, or the
            broker user does not exist.
    """
    tree = find_git_work_tree(directory)
    if tree is not None and not force:
        msg = (f"{directory} is inside the git work tree {tree}: private keys must never be "
               "committed. Use the default (~/.config/careflow/pki), --dir outside the repository, "
               "or --force if you really mean it.")
        raise PkiError(msg)
    account = broker_account(broker_user) if broker_user else None
    broker = _BrokerFiles(device_port=device_port, claim_port=claim_port, bind=bind,
                          persistence_dir=persistence_dir, account=account)
    if directory.is_dir():
        return _init_in_place(directory, now=now, broker_hosts=broker_hosts,
                              import_device_ca=import_device_ca, broker=broker)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = directory.with_name(f".{directory.name}.init-{secrets.token_hex(4)}")
    work.mkdir(mode=0o700)
    try:
        steps = _fill_pki(work, directory, now=now, broker_hosts=broker_hosts,
                          import_device_ca=import_device_ca, broker=broker)
        work.rename(directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return [InitStep(directory / step.path.relative_to(work), step.action, step.what)
            if step.path.is_relative_to(work) else step for step in steps]


@dataclass(frozen=True, slots=True)
class _BrokerFiles:
    """What ``init_pki`` renders the broker's configuration with."""

    device_port: int
    claim_port: int
    bind: str
    persistence_dir: Path | None
    account: BrokerAccount | None


def _init_in_place(directory: Path, *, now: datetime, broker_hosts: Sequence[str],
                   import_device_ca: tuple[Path, Path] | None,
                   broker: _BrokerFiles) -> list[InitStep]:
    """Complete an existing directory; on failure remove what this run added to it."""
    before = set(directory.iterdir())
    try:
        return _fill_pki(directory, directory, now=now, broker_hosts=broker_hosts,
                         import_device_ca=import_device_ca, broker=broker)
    except BaseException:
        for added in set(directory.iterdir()) - before:
            if added.is_dir() and not added.is_symlink():
                shutil.rmtree(added, ignore_errors=True)
            else:
                added.unlink(missing_ok=True)
        raise


def _fill_pki(work: Path, final: Path, *, now: datetime, broker_hosts: Sequence[str],
              import_device_ca: tuple[Path, Path] | None,
              broker: _BrokerFiles) -> list[InitStep]:
    """Make what is missing in ``work``; the configuration names ``final``, where it will live."""
    steps: list[InitStep] = []
    claim_ca = _ensure_ca(work, CLAIM_CA, "careflow claim CA", now=now, steps=steps,
                          what="claim CA", key_note="back it up, then keep it offline")
    device_ca = _ensure_ca(work, DEVICE_CA, "careflow device CA", now=now, steps=steps,
                           what="device CA", key_note="the hub signs devices with it; back it up",
                           imported=import_device_ca)
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    _ensure_leaf(work, CLAIM_CERT, claim_ca, _name(CLAIM_IDENTITY), now=now, eku=client,
                 sans=[], steps=steps, what="claim certificate (bake into gateway images)")
    _ensure_leaf(work, HUB_CERT, device_ca, _name(HUB_IDENTITY), now=now, eku=client,
                 sans=[], steps=steps, what="hub client certificate")
    _ensure_leaf(work, BROKER_CERT, device_ca, _name("careflow-broker"), now=now,
                 eku=ExtendedKeyUsageOID.SERVER_AUTH, sans=_broker_sans(broker_hosts),
                 steps=steps, what="broker server certificate")
    pki = Pki(dir=work, claim_ca=claim_ca, device_ca=device_ca)
    if pki.crl_path.exists():
        steps.append(InitStep(pki.crl_path, "kept", "certificate revocation list"))
    else:
        resign_crl(pki, now=now)
        steps.append(InitStep(pki.crl_path, "created", "certificate revocation list (empty)"))
    if not pki.issued_path.exists():
        write_atomic(pki.issued_path, b"")
    persistence = broker.persistence_dir or final / "mosquitto-data"
    persistence_here = broker.persistence_dir or work / "mosquitto-data"
    persistence_here.mkdir(parents=True, exist_ok=True, mode=0o700)  # Mosquitto does not create it
    account = broker.account
    for path, text, what in (
        (pki.claim_acl_path, _template("claim.acl"), "claim listener ACL"),
        (pki.device_acl_path, render_device_acl(pki), "device listener ACL (+ revoked gateways)"),
        (pki.broker_conf_path, render_broker_config(
            Pki(dir=final, claim_ca=claim_ca, device_ca=device_ca),
            device_port=broker.device_port, claim_port=broker.claim_port, bind=broker.bind,
            persistence_dir=persistence, broker_user=account.name if account else None),
         "Mosquitto configuration"),
    ):
        action = "kept" if path.exists() and path.read_text() == text else "written"
        if action == "written":
            write_atomic(path, text.encode())
        steps.append(InitStep(path, action, what))
    if account is not None:
        steps += _let_broker_read(work, final, persistence_here, persistence, account)
    return steps


def _let_broker_read(work: Path, final: Path, persistence_here: Path, persistence: Path,
                     account: BrokerAccount) -> list[InitStep]:
    """Give the broker's user what Mosquitto reads after dropping to it: the directory and
    ``broker.key`` by group (0750, 0640), its persistence folder as owner. Only root may chown
    to another user; otherwise the step that is left says which command does it. The modes
    open up only once the group is the broker's: 0640 under the invoker's own group (often a
    shared one) would hand the broker's private key to that group instead."""
    steps: list[InitStep] = []
    key = work / f"{BROKER_CERT}.key"
    try:
        for path, uid in ((work, -1), (key, -1), (persistence_here, account.uid)):
            info = path.stat()
            if info.st_gid != account.gid or uid not in (-1, info.st_uid):
                os.chown(path, uid, account.gid)
    except PermissionError:
        steps.append(InitStep(final, "to do", f"only root can give user {account.name} the "
                              f"broker's files: sudo chgrp {account.group} {final} "
                              f"{final}/{BROKER_CERT}.key && sudo chmod 0750 {final} && sudo "
                              f"chmod 0640 {final}/{BROKER_CERT}.key && sudo chown "
                              f"{account.name}:{account.group} {persistence}"))
    else:
        work.chmod(0o750)
        key.chmod(0o640)
        steps.append(InitStep(final, "granted", f"readable by group {account.group} "
                              f"(directory 0750, broker.key 0640) for user {account.name}"))
    for parent in final.absolute().parents:
        if not _can_enter(parent, account):
            steps.append(InitStep(parent, "to do", f"user {account.name} cannot enter {parent} "
                                  f"(mode {stat.S_IMODE(parent.stat().st_mode):o}), so Mosquitto "
                                  "cannot read its files: use a --dir it can reach (e.g. "
                                  f"/etc/careflow/pki) or chmod o+x {parent}"))
    return steps


def _can_enter(folder: Path, account: BrokerAccount) -> bool:
    info = folder.stat()
    if account.uid == 0 or info.st_mode & stat.S_IXOTH:
        return True
    if info.st_uid == account.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    return info.st_gid == account.gid and bool(info.st_mode & stat.S_IXGRP)


def _template(name: str) -> str:
    try:
        return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError) as exc:
        msg = (f"the broker template {name} is not in this careflow installation "
               f"({TEMPLATE_PACKAGE}): reinstall careflow (pip install careflow)")
        raise PkiError(msg) from exc


def render_broker_config(pki: Pki, *, device_port: int = 8883, claim_port: int = 8884,
                         bind: str = "0.0.0.0", persistence_dir: Path,  # noqa: S104
                         broker_user: str | None = None) -> str:
    """The shipped ``mosquitto/careflow-tls.conf`` with this PKI directory's absolute paths
    (and, with ``broker_user``, the user Mosquitto drops to when started as root)."""
    template = _template("careflow-tls.conf")
    if broker_user is not None:
        header, _, rest = template.partition("\n\n")
        template = (f"{header}\n\n# Started as root, Mosquitto drops to this user, who can read "
                    f"the files below (careflow ca init --broker-user).\nuser {broker_user}\n\n"
                    f"{rest}")
    persistence = str(persistence_dir.absolute()).rstrip("/") + "/"
    for placeholder, value in (("@PKI_DIR@", str(pki.dir.absolute())),
                               ("@PERSISTENCE_DIR@", persistence),
                               ("@DEVICE_PORT@", str(device_port)),
                               ("@CLAIM_PORT@", str(claim_port)),
                               ("@BIND@", bind)):
        template = template.replace(placeholder, value)
    return template


def render_device_acl(pki: Pki) -> str:
    """The shipped ``mosquitto/device.acl`` plus a deny-everything block per revoked gateway."""
    text = _template("device.acl")
    revoked = sorted(revoked_identities(pki))
    if not revoked:
        return text
    lines = [text.rstrip("\n"), "",
             "# --- revoked by `careflow devices revoke` (generated; the CRL refuses them too) ---"]
    for gateway_id in revoked:
        lines += [f"user {gateway_id}", "topic deny #"]
    return "\n".join(lines) + "\n"


# --- device certificates ------------------------------------------------------------------------


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for a gateway (made on the gateway; it never leaves it)."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, *, gateway_id: str) -> bytes:
    """A PEM certificate signing request for ``gateway_id``, signed with ``key`` (edge side)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{_SAN_PREFIX}{gateway_id}")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _check_gateway_id(gateway_id: str) -> None:
    if not _GATEWAY_ID.match(gateway_id) or gateway_id in _RESERVED:
        msg = (f"gateway id {gateway_id!r} is not allowed: 1-64 characters of A-Z a-z 0-9 _ . - "
               f"starting with a letter or digit, and not one of {sorted(_RESERVED)}")
        raise CsrError("gateway_id_invalid", msg)


def _check_key(public: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(public, ec.EllipticCurvePublicKey):
        if isinstance(public.curve, _ALLOWED_CURVES):
            return public
        msg = f"EC curve {public.curve.name} is not accepted; use P-256 or P-384"
        raise CsrError("csr_weak_key", msg)
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size >= _MIN_RSA_BITS:
            return public
        msg = f"RSA-{public.key_size} is too weak; use EC P-256 (or RSA of at least 2048 bits)"
        raise CsrError("csr_weak_key", msg)
    msg = f"{type(public).__name__} keys are not accepted; use EC P-256, P-384 or RSA >= 2048"
    raise CsrError("csr_weak_key", msg)


def _check_identity(csr: x509.CertificateSigningRequest, gateway_id: str) -> None:
    try:  # parsed lazily: a subject that is not UTF-8 raises only here
        named: list[str] = [str(a.value)
                            for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError as exc:
        raise CsrError("csr_invalid", f"the CSR's subject cannot be read: {exc}") from exc
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrError("csr_invalid", f"the CSR's extensions cannot be read: {exc}") from exc
    for entry in san:
        value = entry.value
        if isinstance(entry, x509.UniformResourceIdentifier) and str(value).startswith(_SAN_PREFIX):
            named.append(str(value).removeprefix(_SAN_PREFIX))
        elif isinstance(entry, x509.DNSName):
            named.append(str(value))
        else:  # an e-mail, an IP, another URI: not an identity a gateway may ask for
            named.append(f"{type(entry).__name__}:{value}")
    others = sorted({name for name in named if name != gateway_id})
    if others:
        msg = (f"the CSR asks for {', '.join(others)} but this gateway is {gateway_id!r}; "
               "a gateway may only request its own identity")
        raise CsrError("csr_identity_mismatch", msg)


def sign_device_csr(ca: CertAuthority, csr_pem: bytes, *, gateway_id: str, serial: str,
                    now: datetime, days: int = 30) -> x509.Certificate:
    """Check a gateway's CSR and issue its device certificate.

    The subject is set here (CN = ``gateway_id``, serialNumber = ``serial``), never copied from
    the CSR; a CSR that names a different identity is refused rather than silently rewritten.

    Args:
        ca: the device CA.
        csr_pem: the PEM CSR the gateway sent.
        gateway_id: the identity the hub decided this gateway has.
        serial: the hardware serial number, recorded in the subject.
        now: issue time (not_before is 5 minutes earlier for slow clocks).
        days: validity.

    Returns:
        The certificate (clientAuth, SAN ``urn:careflow:gateway:{gateway_id}``, CA=false).

    Raises:
        CsrError: ``gateway_id_invalid``, ``csr_invalid``, ``csr_bad_signature``,
            ``csr_weak_key`` or ``csr_identity_mismatch``.
    """
    _check_gateway_id(gateway_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrError("csr_invalid", "the request is not a PEM certificate signing request") from exc
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, InvalidSignature, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrError("csr_bad_signature", "the CSR's signature cannot be checked") from exc
    if not signature_ok:
        msg = "the CSR's signature does not match its public key (corrupted or tampered with)"
        raise CsrError("csr_bad_signature", msg)
    try:
        public = _check_key(csr.public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # unsupported key algorithm
        raise CsrError("csr_weak_key", f"the CSR's key type is not supported: {exc}") from exc
    _check_identity(csr, gateway_id)
    subject = _name(gateway_id, x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return _leaf(ca, subject, public, now=now, days=days, eku=ExtendedKeyUsageOID.CLIENT_AUTH,
                 sans=[x509.UniformResourceIdentifier(f"{_SAN_PREFIX}{gateway_id}")])


def cert_not_after(pem: bytes) -> datetime:
    """When a PEM certificate expires (UTC)."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


# --- issued certificates --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """One line of ``issued.jsonl``."""

    gateway_id: str
    serial: int
    not_after: datetime
    issued_at: datetime


def record_issued(pki: Pki, gateway_id: str, cert: x509.Certificate, *,
                  now: datetime | None = None) -> None:
    """Append a device certificate to the index ``careflow devices revoke`` looks it up in.

    Call it right after ``sign_device_csr`` and before handing the certificate out. If the gateway
    had been revoked, its deny block is dropped from the device ACL (the broker needs a SIGHUP to
    see that; until then the new certificate connects but is denied every topic).
    """
    now = datetime.now(UTC) if now is None else now
    was_revoked = gateway_id in revoked_identities(pki)
    line = json.dumps({"gateway": gateway_id, "serial": format(cert.serial_number, "x"),
                       "not_after": cert.not_valid_after_utc.isoformat(),
                       "issued_at": now.astimezone(UTC).isoformat()}) + "\n"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = os.open(pki.issued_path, flags, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if was_revoked:
        write_device_acl(pki)


def issued_certificates(pki: Pki) -> Iterator[IssuedCert]:
    """Every recorded device certificate, oldest first."""
    if not pki.issued_path.exists():
        return
    try:
        text = _read(pki.issued_path, "the record of issued certificates").decode("utf-8")
    except UnicodeDecodeError as exc:  # a torn write or a bad disk: say so, as for a bad line
        msg = f"{pki.issued_path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise PkiError(msg) from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            yield IssuedCert(gateway_id=row["gateway"], serial=int(row["serial"], 16),
                             not_after=datetime.fromisoformat(row["not_after"]),
                             issued_at=datetime.fromisoformat(row["issued_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"{pki.issued_path} line {number} is not a careflow issued-certificate record"
            raise PkiError(msg) from exc


def current_certificate(pki: Pki, gateway_id: str) -> IssuedCert | None:
    """The gateway's most recently issued certificate, or None if it never had one."""
    latest: IssuedCert | None = None
    for issued in issued_certificates(pki):
        if issued.gateway_id == gateway_id:
            latest = issued
    return latest


def revoked_identities(pki: Pki) -> set[str]:
    """Gateways whose current certificate is on the CRL (their ACL block denies everything)."""
    if not pki.crl_path.exists():
        return set()
    crl = _load_crl(pki)
    latest: dict[str, int] = {}
    for issued in issued_certificates(pki):
        latest[issued.gateway_id] = issued.serial
    return {gw for gw, serial in latest.items()
            if crl.get_revoked_certificate_by_serial_number(serial) is not None}


# --- CRL --------------------------------------------------------------------------------------------


def _load_crl(pki: Pki) -> x509.CertificateRevocationList:
    data = _read(pki.crl_path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        msg = f"{pki.crl_path} is not a PEM CRL"
        raise PkiError(msg) from exc
    if not crl.is_signature_valid(pki.device_ca.key.public_key()):
        msg = f"{pki.crl_path} is not signed by this device CA"
        raise PkiError(msg)
    return crl


def _write_crl(pki: Pki, revoked: Sequence[x509.RevokedCertificate], *, now: datetime,
               days: int) -> None:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.device_ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + timedelta(days=days))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(pki.device_ca.key, _hash_for(pki.device_ca.key))
    write_atomic(pki.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def resign_crl(pki: Pki, *, now: datetime, days: int = CRL_DAYS) -> None:
    """Sign the CRL again with a fresh nextUpdate, keeping its entries (an empty one if none).

    OpenSSL (and so Mosquitto) refuses every device once the CRL's nextUpdate has passed, so the
    hub calls this daily and ``careflow ca status`` warns a week ahead.
    """
    revoked = list(_load_crl(pki)) if pki.crl_path.exists() else []
    _write_crl(pki, revoked, now=now, days=days)


def crl_next_update(pki: Pki) -> datetime:
    """When the CRL stops being valid unless re-signed."""
    next_update = _load_crl(pki).next_update_utc
    if next_update is None:  # we always set it; a foreign CRL might not
        msg = f"{pki.crl_path} has no nextUpdate; run `careflow ca crl-refresh`"
        raise PkiError(msg)
    return next_update


def crl_needs_refresh(pki: Pki, *, now: datetime, within: timedelta = timedelta(days=7)) -> bool:
    """True when the CRL's nextUpdate is less than ``within`` away (or passed): re-sign it."""
    return crl_next_update(pki) - now < within


# what `careflow ca status` (and the operations agent's ca.status) warn about, this far ahead
CERT_WARN_BEFORE = timedelta(days=30)
CRL_WARN_BEFORE = timedelta(days=7)
_STATUS_CERTIFICATES = ("claim-ca", "device-ca", "claim", "hub", "broker")


def pki_status(pki: Pki, *, now: datetime) -> dict[str, Any]:
    """When the CAs, certificates and the CRL expire, how many device certificates were issued,
    which gateways are revoked, and what needs action (``warnings``), as JSON-able values: one
    reading for `careflow ca status` and the operations agent's ``ca.status`` alike."""
    files: list[dict[str, Any]] = []
    warnings: list[str] = []

    def row(name: str, expires: datetime) -> dict[str, Any]:
        return {"file": name, "expires": expires.isoformat(),
                "days_left": round((expires - now).total_seconds() / 86400, 1)}

    for name in _STATUS_CERTIFICATES:
        path = pki.dir / f"{name}.crt"
        if not path.exists():
            warnings.append(f"{path} is missing: re-run `careflow ca init --dir {pki.dir}`")
            continue
        not_after = cert_not_after(path.read_bytes())
        files.append(row(path.name, not_after))
        if not_after - now < CERT_WARN_BEFORE:
            warnings.append(f"{path.name} expires {not_after:%Y-%m-%d}: renew it")
    next_update = crl_next_update(pki)
    files.append(row(pki.crl_path.name, next_update))
    if crl_needs_refresh(pki, now=now, within=CRL_WARN_BEFORE):
        warnings.append(f"the CRL's nextUpdate is {next_update:%Y-%m-%d %H:%M} UTC: run "
                        "`careflow ca crl-refresh` and reload Mosquitto, or every device will be "
                        "refused once it passes")
    return {"files": files, "issued": len(list(issued_certificates(pki))),
            "revoked": sorted(revoked_identities(pki)), "warnings": warnings}


def is_revoked(pki: Pki, serial: int) -> bool:
    """Whether a certificate serial is on the CRL."""
    return _load_crl(pki).get_revoked_certificate_by_serial_number(serial) is not None


def revoke(pki: Pki, cert_serial: int, *, now: datetime,
           reason: x509.ReasonFlags = x509.ReasonFlags.cessation_of_operation,
           days: int = CRL_DAYS) -> None:
    """Add a serial to the CRL (idempotent) and re-sign it; the file is replaced atomically.

    The device ACL is regenerated separately (``write_device_acl``): ``careflow devices revoke``
    first reloads the CRL alone and ends the live session, so that the gateway's Will (its
    retained ``offline``) is still allowed out, and only then denies the identity in the ACL.
    """
    _revoke_serials(pki, [cert_serial], now=now, reason=reason, days=days)


def _revoke_serials(pki: Pki, serials: Sequence[int], *, now: datetime,
                    reason: x509.ReasonFlags = x509.ReasonFlags.cessation_of_operation,
                    days: int = CRL_DAYS) -> None:
    revoked = list(_load_crl(pki)) if pki.crl_path.exists() else []
    known = {entry.serial_number for entry in revoked}
    for serial in serials:
        if serial not in known:
            known.add(serial)
            revoked.append(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                .add_extension(x509.CRLReason(reason), critical=False).build())
    _write_crl(pki, revoked, now=now, days=days)


def revoke_identity(pki: Pki, gateway_id: str, *, now: datetime,
                    up_to_serial: int | None = None) -> list[int]:
    """Put every still-valid certificate recorded for a gateway on the CRL, in one re-signing.

    ``up_to_serial``: only that certificate and those issued before it (a replaced device's
    identity, when its successor may already hold a newer certificate for the same id).
    Returns the serials revoked.
    """
    issued = [cert for cert in issued_certificates(pki) if cert.gateway_id == gateway_id]
    if up_to_serial is not None:
        cutoff = next((cert.issued_at for cert in issued if cert.serial == up_to_serial), None)
        issued = [cert for cert in issued if cutoff is not None and cert.issued_at <= cutoff]
    serials = {cert.serial for cert in issued if cert.not_after > now}
    if up_to_serial is not None:
        serials.add(up_to_serial)  # named explicitly: revoked even if the index lacks it
    if serials:
        _revoke_serials(pki, sorted(serials), now=now)
    return sorted(serials)


def write_device_acl(pki: Pki) -> bool:
    """Regenerate the device ACL (a deny block per revoked gateway); True if it changed."""
    text = render_device_acl(pki)
    if pki.device_acl_path.exists() and pki.device_acl_path.read_text() == text:
        return False
    write_atomic(pki.device_acl_path, text.encode())
    return True
