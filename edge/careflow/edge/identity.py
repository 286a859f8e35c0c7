"""A gateway's own identity on disk, swapped atomically: certificate, key, CA chain, config.

Layout under ``identity/``::

    gen-0001/  device.key (0600)  device.crt  ca.crt  config.json
    gen-0002/  …                                   (a renewal, until it has connected)
    current -> gen-0001                            (a symlink, replaced with one rename)
    pending.key (0600)                             (a claim's key, kept across retries)

A generation is written into a temporary directory, each file fsynced, the directory renamed
into place and fsynced; ``current`` then moves with ``os.replace`` of a fresh symlink. A crash at
any point leaves either the old identity or the new one, never half of each. The private key is
made on the gateway and never leaves it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from careflow.provisioning.pki import fsync_dir, write_atomic

__all__ = ["CA_FILE", "CERT_FILE", "CONFIG_FILE", "KEY_FILE", "IdentityStore", "key_pem"]

KEY_FILE = "device.key"
CERT_FILE = "device.crt"
CA_FILE = "ca.crt"
CONFIG_FILE = "config.json"


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM of a private key (unencrypted: the file is 0600 on the gateway's own disk)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class IdentityStore:
    """The generations of one gateway's identity under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def current(self) -> Path:
        """The directory of the identity in use (through the ``current`` symlink)."""
        return self.root / "current"

    def exists(self) -> bool:
        """Whether an identity is installed."""
        return (self.current / CERT_FILE).is_file()

    def pending_key(self) -> ec.EllipticCurvePrivateKey | None:
        """The key of an unfinished claim, so that a retry asks with the same key."""
        path = self.root / "pending.key"
        if not path.is_file():
            return None
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return key if isinstance(key, ec.EllipticCurvePrivateKey) else None

    def keep_pending_key(self, key: ec.EllipticCurvePrivateKey) -> None:
        """Write a claim's key (0600) before its CSR leaves the gateway."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.root / "pending.key", key_pem(key), mode=0o600)

    def drop_pending_key(self) -> None:
        """The claim is installed; its pending key is now the identity's key."""
        (self.root / "pending.key").unlink(missing_ok=True)

    def write_generation(self, *, key: ec.EllipticCurvePrivateKey, certificate: str,
                         ca_chain: str, config: dict[str, Any]) -> Path:
        """Write a complete identity as a new generation (not yet in use); return its path."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        numbers = [int(p.name[4:]) for p in self.root.glob("gen-*") if p.name[4:].isdigit()]
        target = self.root / f"gen-{max(numbers, default=0) + 1:04d}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        _write(staging / KEY_FILE, key_pem(key), 0o600)
        _write(staging / CERT_FILE, certificate.encode(), 0o644)
        _write(staging / CA_FILE, ca_chain.encode(), 0o644)
        _write(staging / CONFIG_FILE, json.dumps(config, indent=2).encode(), 0o644)
        fsync_dir(staging)
        staging.rename(target)
        fsync_dir(self.root)
        return target

    def promote(self, generation: Path) -> None:
        """Make ``generation`` the identity in use, in one atomic rename."""
        link = self.root / ".current.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(generation.name)
        link.replace(self.current)
        fsync_dir(self.root)

    def prune(self, *, keep: int = 2) -> None:
        """Delete old generations, always keeping the current one and ``keep`` in all."""
        in_use = self.current.resolve().name if self.current.exists() else None
        generations = sorted(p for p in self.root.glob("gen-*") if p.is_dir())
        for old in generations[:-keep] if keep else generations:
            if old.name == in_use:
                continue
            for child in old.iterdir():
                child.unlink()
            old.rmdir()

    def config(self) -> dict[str, Any]:
        """The configuration the hub sent with the identity in use."""
        loaded: dict[str, Any] = json.loads((self.current / CONFIG_FILE).read_text())
        return loaded
