"""The claim flow end to end on the embedded amqtt broker: register → claim → certificate →
the agent reconnects under its own identity → first heartbeat → active; renewal without a gap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from careflow.core.config import Settings, parse_broker_url
from careflow.core.errors import ClaimError
from careflow.edge.claim import claim_identity
from careflow.edge.identity import CERT_FILE, KEY_FILE
from careflow.hub.app import AUTO
from careflow.hub.store.records import EventFilter
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import Reject, hash_token
from careflow.provisioning.service import Provisioning
from tests.conftest import RunningHub, careflow_cmd, free_port, make_settings, wait_until
from tests.provisioning.conftest import RenewalClock, run_agent


@dataclass
class Flow:
    settings: Settings
    hub: RunningHub
    provisioning: Provisioning
    env: dict[str, str]

    @property
    def broker(self) -> str:
        return str(self.settings.effective_broker_url)

    def register(self, serial: str, *, ttl: str = "1h", replace: bool = False) -> dict[str, str]:
        args = ["provision", "register", "--serial", serial, "--site", "berlin-3", "--ttl", ttl,
                "--json", *(["--replace"] if replace else [])]
        done = subprocess.run(careflow_cmd(*args), env=self.env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        row: dict[str, str] = json.loads(done.stdout)
        return row


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Flow]:
    port = free_port()
    pki_dir = tmp_path / "pki"
    pki_mod.init_pki(pki_dir, now=datetime.now(UTC), force=True)
    env = {"CAREFLOW_LISTEN": f"127.0.0.1:{port}", "CAREFLOW_PKI_DIR": str(pki_dir)}
    settings = make_settings(tmp_path / "data", None, **env)
    # the embedded broker, then the claim service of CAREFLOW_PKI_DIR, then ingest
    hub = RunningHub(settings, provisioning=AUTO, embedded_broker=True).start()
    assert hub.provisioning is not None
    yield Flow(settings, hub, hub.provisioning,
               {**os.environ, **env, "CAREFLOW_DATA_DIR": str(settings.data_dir),
                "CAREFLOW_SQLITE_SYNC": "normal"})
    hub.stop()


def test_it_onboards_a_gateway_from_registration_to_active(flow: Flow, tmp_path: Path) -> None:
    row = flow.register("SN-0042")
    assert row["gateway_id"] == "gw-sn-0042"
    stored = flow.provisioning.registry.get("SN-0042")
    assert stored is not None and stored.token_hash == hash_token(row["token"])
    assert row["token"] not in flow.settings.db_path.read_bytes().decode(errors="replace")

    result = claim_identity(serial="SN-0042", token=row["token"],
                            broker=parse_broker_url(flow.broker), out=tmp_path / "gw",
                            timeout_s=10)
    assert result.gateway_id == "gw-sn-0042"
    key_file = tmp_path / "gw" / "identity" / "current" / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(
        (tmp_path / "gw" / "identity" / "current" / CERT_FILE).read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["gw-sn-0042"]

    agent, thread = run_agent(result.edge_config)
    try:
        wait_until(lambda: (r := flow.provisioning.registry.get("SN-0042")) is not None
                   and r.state == "active", timeout_s=15, what="active")
        # a sensor behind the gateway is onboarded by the gateway's provision event
        agent.add("fall-1", "provision", {"action": "added", "kind": "fall-sensor",
                                          "serial": "FS-77", "labels": {"room": "12"}})
        wait_until(lambda: flow.hub.store.device("gw-sn-0042", "fall-1") is not None,
                   what="child device in the registry")
    finally:
        agent.stop()
        thread.join(10)
    record = flow.provisioning.registry.get("SN-0042")
    assert record is not None and record.connected_ms and record.active_ms
    assert record.registered_ms <= record.claimed_ms <= record.issued_ms <= record.active_ms  # type: ignore[operator]
    watch = subprocess.run(careflow_cmd("provision", "watch", "SN-0042", "--timeout", "2",
                                        "--json"), env=flow.env, capture_output=True, text=True,
                           timeout=30, check=False)
    assert watch.returncode == 0, watch.stderr
    assert json.loads(watch.stdout)["state"] == "active"
    devices = subprocess.run(careflow_cmd("devices", "list", "--json"), env=flow.env,
                             capture_output=True, text=True, timeout=30, check=True)
    child = next(json.loads(line) for line in devices.stdout.splitlines()
                 if json.loads(line)["device"] == "fall-1")
    assert (child["site"], child["labels"], child["serial"], child["membership"]) == (
        "berlin-3", {"room": "12"}, "FS-77", "added")

    # the same serial cannot silently get a second identity
    again = flow.provisioning.registry.register(
        serial="SN-0042", site="x", gateway_id="gw-sn-0042", token_hash="h",
        token_expires_ms=2**40, replace=False, now_ms=0)
    assert isinstance(again, Reject) and "--replace" in again.message
    replaced = flow.register("SN-0042", replace=True)
    assert "revoked" in replaced["revocation"]
    assert pki_mod.is_revoked(pki_mod.load_pki(flow.provisioning.pki.dir), cert.serial_number)


def test_it_refuses_a_reused_token_over_mqtt(flow: Flow, tmp_path: Path) -> None:
    row = flow.register("SN-7")
    url = parse_broker_url(flow.broker)
    claim_identity(serial="SN-7", token=row["token"], broker=url, out=tmp_path / "a",
                   timeout_s=10)
    with pytest.raises(ClaimError) as refused:
        claim_identity(serial="SN-7", token=row["token"], broker=url, out=tmp_path / "b",
                       timeout_s=10)
    assert refused.value.code == "token_used"


def test_it_says_what_is_missing_when_watch_times_out(flow: Flow) -> None:
    flow.provisioning.registry.register(serial="SN-9", site="x", gateway_id="gw-sn-9",
                                        token_hash="h", token_expires_ms=2**42, replace=False,
                                        now_ms=0)
    watch = subprocess.run(careflow_cmd("provision", "watch", "SN-9", "--timeout", "0.5"),
                           env=flow.env, capture_output=True, text=True, timeout=30, check=False)
    assert watch.returncode == 1
    assert "waiting for: claimed" in watch.stderr and "careflow-edge claim" in watch.stderr


def test_it_renews_the_certificate_with_no_gap_in_events(flow: Flow, tmp_path: Path) -> None:
    row = flow.register("SN-R")
    result = claim_identity(serial="SN-R", token=row["token"],
                            broker=parse_broker_url(flow.broker), out=tmp_path / "gw",
                            timeout_s=10)
    first = flow.provisioning.registry.get("SN-R")
    assert first is not None
    clock = RenewalClock()
    agent, thread = run_agent(result.edge_config, clock)
    try:
        wait_until(lambda: (r := flow.provisioning.registry.get("SN-R")) is not None
                   and r.state == "active", timeout_s=15, what="active")
        for i in range(20):
            agent.add("door-1", "status", {"state": "ok", "n": i})
        clock.agent, clock.ahead = agent, True
        n = 20
        deadline = time.monotonic() + 15
        while agent.renewer is not None and agent.renewer.state.renewals == 0:  # events flow on
            assert time.monotonic() < deadline, "no renewal within 15 s"
            agent.add("door-1", "status", {"state": "ok", "n": n})
            n += 1
            time.sleep(0.05)
        for i in range(n, n + 20):
            agent.add("door-1", "status", {"state": "ok", "n": i})
        wait_until(lambda: flow.hub.store.count(EventFilter(gateway="gw-sn-r",
                                                            device="door-1")) == n + 20,
                   timeout_s=15, what="every event, before, during and after the swap")
        wait_until(lambda: agent.connected, what="agent reconnected under the new identity")
    finally:
        agent.stop()
        thread.join(10)
    renewed = flow.provisioning.registry.get("SN-R")
    assert renewed is not None and renewed.renewed_ms is not None
    assert renewed.cert_serial != first.cert_serial
    current = (tmp_path / "gw" / "identity" / "current").resolve().name
    assert current == "gen-0002"
    assert not (tmp_path / "gw" / "identity" / "gen-0001").exists()  # pruned once connected
    assert flow.hub.store.total_gaps() == 0


def test_the_technicians_one_liner_passes_once_the_gateway_is_active(flow: Flow,
                                                                     tmp_path: Path) -> None:
    """scripts/provision-device.sh: register, print the claim command, watch until active."""
    script = Path(__file__).parents[2] / "scripts" / "provision-device.sh"
    careflow = Path(sys.executable).parent / "careflow"
    proc = subprocess.Popen(["bash", str(script), "SN-TECH", "berlin-3", "--timeout", "30"],
                            env={**flow.env, "CAREFLOW": str(careflow)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    token = None
    for text in proc.stdout:  # read until the claim command with the one-time token is shown
        lines.append(text)
        if "--token" in text:
            token = text.split("--token", 1)[1].split()[0]
            break
    assert token, "".join(lines)
    result = claim_identity(serial="SN-TECH", token=token, broker=parse_broker_url(flow.broker),
                            out=tmp_path / "gw", timeout_s=10)
    agent, thread = run_agent(result.edge_config)
    try:
        rest, _ = proc.communicate(timeout=40)
    finally:
        agent.stop()
        thread.join(10)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "PASS: gw-sn-tech is active at berlin-3" in output
