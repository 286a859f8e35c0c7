"""The files a claim leaves on the gateway: its keys private, none written through a link."""

from __future__ import annotations

import stat
from pathlib import Path

from careflow.edge.claim import write_edge_config
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


def test_edge_yaml_is_written_through_a_new_file_never_through_a_planted_link(
    tmp_path: Path,
) -> None:
    """A link planted where the temporary file goes must not redirect the write (the claim
    often runs as root)."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    out = tmp_path / "gw"
    out.mkdir()
    (out / ".edge.yaml.tmp").symlink_to(victim)

    path = write_edge_config(out, gateway_id="gw-1", broker_url="mqtt://127.0.0.1:1884",
                             heartbeat_interval_s=30)

    assert victim.read_text() == "untouched\n"
    assert "gateway: gw-1\n" in path.read_text()
