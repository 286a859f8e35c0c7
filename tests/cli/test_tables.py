"""Tables read whole in an 80-column terminal: fewer columns by default, `--wide` for the rest.
`devices list` printed `gate… devi… onli…` with its ten columns in 80."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import decode_message
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.provisioning.claims import hash_token
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.schemas import event_topic
from tests.conftest import careflow_cmd, store_event


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub store with names and values as long as a real fleet's, in every view."""
    data = tmp_path_factory.mktemp("tables") / "data"
    data.mkdir()
    now = clock.now_ms()
    store = SqliteStore(data / "careflow.db", synchronous="normal")
    for n in range(3):
        gateway = f"gw-berlin-{n:04d}"
        gw = Stamper(gateway=gateway, device=gateway, boot="boot-1")
        store_event(store, gw, "provision", {"action": "added", "kind": "gateway",
                                             "firmware": "2.14.3-rc1",
                                             "labels": {"site": "berlin-mitte-3"}}, now - 60_000)
        store_event(store, gw, "heartbeat", {"interval_s": 60}, now - 1000)
        sensor = Stamper(gateway=gateway, device="fall-sensor-12", boot="boot-1")
        store_event(store, sensor, "status", {"state": "degraded", "battery_pct": 12,
                                              "firmware": "1.0.7"}, now - 2000)
        decoded = decode_message(event_topic(gateway, "door-contact-hall", "status"),
                                 b'{"not": "an event"}', max_bytes=1 << 20)
        store.append(IncomingBatch(accepted=(), rejected=[(r, now) for r in decoded.rejected]))
        incident = store.open_incident(
            rule="battery-low", gateway=gateway, device="fall-sensor-12",
            severity="warning", summary="battery at 12% on fall-sensor-12", detail="",
            at_ms=now - 800, notify=[("ops", "careflow: battery low on fall-sensor-12",
                                      "body")])
        assert incident is not None
    store.add_silence(gateway="gw-berlin-0001", device="*", rule="battery-*",
                      starts_ms=now, ends_ms=now + 3_600_000, created_by="technician-ola",
                      comment="battery swap on the second floor")
    store.close()
    registry = SqliteProvisioningRegistry(data / "careflow.db", synchronous="normal")
    registry.register(serial="SN-2026-000042", site="berlin-mitte-3",
                      gateway_id="gw-sn-2026-000042", token_hash=hash_token("t"),
                      token_expires_ms=now + 60_000, replace=False, now_ms=now)
    registry.close()
    return data


def cli(data_dir: Path, *args: str, columns: int) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": str(columns)}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


TABLES = [("devices", "list"), ("events", "query"), ("deadletter", "list"),
          ("incidents", "list"), ("notify", "list"), ("silences", "list"), ("provision", "list"),
          ("provision", "refusals")]


@pytest.mark.parametrize("command", TABLES, ids=" ".join)
def test_every_table_reads_whole_at_80_columns(data_dir: Path, command: tuple[str, ...]) -> None:
    done = cli(data_dir, *command, columns=80)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout, done.stdout  # no heading or value cut short
    assert max(map(len, done.stdout.splitlines())) <= 80, done.stdout


def test_devices_list_shows_the_rest_with_wide(data_dir: Path) -> None:
    narrow = cli(data_dir, "devices", "list", columns=80).stdout
    header = narrow.splitlines()[0].split()
    assert header == ["gateway", "device", "state", "last", "seen", "battery", "gaps"]
    assert "2.14.3-rc1" not in narrow and "berlin-mitte-3" not in narrow
    wide = cli(data_dir, "devices", "list", "--wide", columns=200).stdout
    assert wide.splitlines()[0].split() == ["gateway", "device", "site", "state", "last", "seen",
                                            "last", "battery", "firmware", "events", "gaps"]
    assert "2.14.3-rc1" in wide and "berlin-mitte-3" in wide


@pytest.mark.parametrize(("command", "column"), [
    (("events", "query"), "seq"), (("deadletter", "list"), "payload"),
    (("incidents", "list"), "severity"), (("notify", "list"), "attempts"),
    (("silences", "list"), "by"), (("provision", "list"), "site"),
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else value)
def test_wide_adds_the_columns_left_out(data_dir: Path, command: tuple[str, ...],
                                        column: str) -> None:
    assert column not in cli(data_dir, *command, columns=200).stdout.splitlines()[0].split()
    assert column in cli(data_dir, *command, "--wide", columns=200).stdout.splitlines()[0].split()
