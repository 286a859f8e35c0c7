"""Settings from the environment: a careless value is refused at start, with its name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from careflow.core.config import MAX_CERT_DAYS, MAX_INT_SETTING, load_settings
from careflow.core.errors import ConfigError
from careflow.hub.ingest.decode import Rejected
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.provisioning.pki import CA_DAYS, init_pki, load_pki, make_csr, new_device_key
from careflow.provisioning.pki import sign_device_csr as sign

_INT_SETTINGS = ("CAREFLOW_MAX_MESSAGE_BYTES", "CAREFLOW_SELF_SILENCE_S",
                 "CAREFLOW_DEADMAN_INTERVAL_S", "CAREFLOW_MAX_DEVICES_PER_GATEWAY",
                 "CAREFLOW_DEAD_LETTER_MAX_ROWS", "CAREFLOW_DEAD_LETTER_MAX_MB")


@pytest.mark.parametrize("name", _INT_SETTINGS)
@pytest.mark.parametrize("text", ["100000000000000000000", str(MAX_INT_SETTING + 1)])
def test_it_refuses_a_number_too_large_to_mean_anything(tmp_path: Path, name: str,
                                                        text: str) -> None:
    """Such a value used to be taken, and then failed where it was used: a dead-letter bound
    beyond SQLite's 64-bit integers failed every commit that dead-lettered anything."""
    with pytest.raises(ConfigError, match=name):
        load_settings({name: text}, data_dir=tmp_path)


def test_the_largest_dead_letter_bounds_allowed_still_work(tmp_path: Path) -> None:
    settings = load_settings({"CAREFLOW_DEAD_LETTER_MAX_ROWS": str(MAX_INT_SETTING),
                              "CAREFLOW_DEAD_LETTER_MAX_MB": str(MAX_INT_SETTING)},
                             data_dir=tmp_path)
    store = SqliteStore(tmp_path / "careflow.db", synchronous="normal",
                        dead_letter_max_rows=settings.dead_letter_max_rows,
                        dead_letter_max_bytes=settings.dead_letter_max_bytes)
    try:
        result = store.append(IncomingBatch([], [(Rejected("t", "schema", "why", b"x"), 1)], []))
        assert result.dead_lettered == 1
        assert store.dead_letter_count() == 1
    finally:
        store.close()


@pytest.mark.parametrize("days", [MAX_CERT_DAYS + 1, 3_000_000])
def test_it_refuses_device_certificates_that_would_outlive_their_ca(tmp_path: Path,
                                                                    days: int) -> None:
    """Both used to be taken: the first signs certificates valid after their CA is not; with
    the second the end date is past the year 9999, so every claim and renewal failed."""
    with pytest.raises(ConfigError, match="CAREFLOW_CERT_DAYS"):
        load_settings({"CAREFLOW_CERT_DAYS": str(days)}, data_dir=tmp_path)


def test_the_longest_device_certificate_allowed_is_the_ca_s_own_lifetime(tmp_path: Path) -> None:
    assert MAX_CERT_DAYS == CA_DAYS
    days = load_settings({"CAREFLOW_CERT_DAYS": str(MAX_CERT_DAYS)}, data_dir=tmp_path).cert_days
    now = datetime(2026, 11, 30, tzinfo=UTC)
    init_pki(tmp_path / "ca", now=now, broker_hosts=["broker.example.org"])
    ca = load_pki(tmp_path / "ca").device_ca
    csr = make_csr(new_device_key(), gateway_id="gw-1")
    cert = sign(ca, csr, gateway_id="gw-1", serial="SN-1", now=now, days=days)
    assert cert.not_valid_after_utc == now + timedelta(days=MAX_CERT_DAYS)


def test_the_default_message_limit_is_the_contracts() -> None:
    """The core cannot import the contract (the contract imports the core's errors)."""
    from careflow.core.config import DEFAULT_MAX_MESSAGE_BYTES  # noqa: PLC0415
    from careflow.schemas.limits import MAX_MESSAGE_BYTES  # noqa: PLC0415

    assert DEFAULT_MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES
