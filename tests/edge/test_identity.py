"""The gateway's identity store: its private keys are never readable by others."""

from __future__ import annotations

import stat
from pathlib import Path

from careflow.edge.identity import IdentityStore
from careflow.provisioning.pki import new_device_key


def test_a_claims_key_is_private_even_over_a_leftover_temporary_file(tmp_path: Path) -> None:
    """A temporary file left by a crash (or planted) with a loose mode must not lend the key
    its mode: the key is written to a new file created 0600."""
    store = IdentityStore(tmp_path / "identity")
    store.root.mkdir(mode=0o700)
    leftover = store.root / "pending.key.tmp"
    leftover.write_bytes(b"half a key")
    leftover.chmod(0o644)
    key = new_device_key()

    store.keep_pending_key(key)

    assert stat.S_IMODE((store.root / "pending.key").stat().st_mode) == 0o600
    kept = store.pending_key()
    assert kept is not None and kept.private_numbers() == key.private_numbers()
