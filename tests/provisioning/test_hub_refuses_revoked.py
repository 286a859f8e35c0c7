"""The hub's own line of defence: whatever a revoked gateway still gets through (queued before the
revocation, or a broker without the CRL) is dead-lettered with code ``revoked``, not stored."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.store.records import EventFilter
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.service import Activation
from tests.conftest import Mosquitto, RunningHub, heartbeat, make_settings, wait_until
from tests.hub.conftest import publish

pytestmark = pytest.mark.broker


def issue(pki: pki_mod.Pki, gateway_id: str, now: datetime) -> int:
    cert = pki_mod.sign_device_csr(
        pki.device_ca, pki_mod.make_csr(pki_mod.new_device_key(), gateway_id=gateway_id),
        gateway_id=gateway_id, serial=f"SN-{gateway_id}", now=now)
    pki_mod.record_issued(pki, gateway_id, cert, now=now)
    return int(cert.serial_number)


def test_events_of_a_revoked_gateway_are_dead_lettered(mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki_mod.init_pki(tmp_path / "pki", now=now, force=True)
    pki = pki_mod.load_pki(tmp_path / "pki")
    bad = issue(pki, "gw-stolen", now)
    issue(pki, "gw-good", now)
    replaced_old = issue(pki, "gw-replaced", now)
    pki_mod.revoke(pki, bad, now=now)
    pki_mod.revoke(pki, replaced_old, now=now)
    issue(pki, "gw-replaced", now)  # a new certificate for the same id: it is trusted again

    settings = make_settings(tmp_path / "data", mosquitto.url)
    registry = SqliteProvisioningRegistry(settings.db_path, synchronous="normal")
    hub = RunningHub(settings, provisioning=Activation(registry, warn_within_ms=86_400_000,
                                                       pki=pki)).start()
    try:
        events = [heartbeat(Stamper(gateway=gw, device=gw, boot="b1"))
                  for gw in ("gw-stolen", "gw-good", "gw-replaced")]
        publish(mosquitto, events)
        wait_until(lambda: hub.store.count(EventFilter()) == 2
                   and hub.store.dead_letter_count() == 1, what="two stored, one refused")
        (letter,) = hub.store.dead_letters()
        assert letter.code == "revoked" and "gw-stolen" in letter.reason
        assert {e.gateway for e in hub.store.query(EventFilter())} == {"gw-good", "gw-replaced"}
    finally:
        hub.stop()
        registry.close()


def test_an_unreadable_certificate_record_costs_no_event(mosquitto: Mosquitto,
                                                          tmp_path: Path) -> None:
    """The finding: reading the record of issued certificates failed with an error other than
    PkiError (here bytes that are not UTF-8, as a torn write or a bad disk leaves them), and the
    hub blamed each message in turn: every event became an ``internal_error`` dead letter,
    acknowledged, until the file was fixed. The last known revoked set is kept instead."""
    now = datetime.now(UTC)
    pki_mod.init_pki(tmp_path / "pki", now=now, force=True)
    pki = pki_mod.load_pki(tmp_path / "pki")
    issue(pki, "gw-good", now)
    with pki.issued_path.open("ab") as record:
        record.write(b'{"gateway": "gw-\xff\xfe"}\n')

    settings = make_settings(tmp_path / "data", mosquitto.url)
    registry = SqliteProvisioningRegistry(settings.db_path, synchronous="normal")
    hub = RunningHub(settings, provisioning=Activation(registry, warn_within_ms=86_400_000,
                                                       pki=pki)).start()
    try:
        publish(mosquitto, [heartbeat(Stamper(gateway="gw-good", device="gw-good", boot="b1"))])
        wait_until(lambda: hub.store.count(EventFilter()) + hub.store.dead_letter_count() == 1,
                   what="the heartbeat stored or refused")
        assert hub.store.dead_letters() == []
        assert hub.store.count(EventFilter()) == 1
    finally:
        hub.stop()
        registry.close()
