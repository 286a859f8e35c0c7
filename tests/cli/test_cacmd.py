"""`careflow ca init/status/crl-refresh` as an operator runs them (real processes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from careflow.cli.cacmd import default_broker_user
from careflow.provisioning.pki import crl_next_update, load_pki, resign_crl
from tests.conftest import careflow_cmd


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")}
    return {**base, "CAREFLOW_PKI_DIR": str(tmp_path / "pki"), "COLUMNS": "200"}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_creates_the_pki_once_and_never_prints_keys(env: dict[str, str], tmp_path: Path) -> None:
    first = cli(env, "ca", "init", "--broker-host", "broker.example.org")
    assert first.returncode == 0, first.stderr
    assert "device-ca.crt" in first.stdout and "created" in first.stdout
    assert "mosquitto -c" in first.stdout and "CAREFLOW_BROKER_CERT" in first.stdout
    for output in (first.stdout, first.stderr):
        assert "PRIVATE KEY" not in output
    pki = tmp_path / "pki"
    for key in pki.glob("*.key"):
        # As root, Mosquitto drops to user mosquitto: its group may read the broker's key only.
        shared = key.name == "broker.key" and default_broker_user() is not None
        assert stat.S_IMODE(key.stat().st_mode) == (0o640 if shared else 0o600), key.name
    conf = (pki / "mosquitto-careflow.conf").read_text()
    assert f"crlfile {pki}/crl.pem" in conf and "@PKI_DIR@" not in conf
    before = (pki / "device-ca.crt").read_bytes()
    second = cli(env, "ca", "init")
    assert second.returncode == 0, second.stderr
    assert "nothing was overwritten" in second.stdout
    assert (pki / "device-ca.crt").read_bytes() == before
    again = cli(env, "ca", "init", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["dir"] == str(pki) and summary["broker_config"] == str(
        pki / "mosquitto-careflow.conf")
    assert {step["action"] for step in summary["steps"]} <= {"kept", "to do", "written", "granted"}
    assert "device-ca.crt" in {step["file"] for step in summary["steps"]}


def test_it_refuses_a_directory_inside_a_git_work_tree(env: dict[str, str]) -> None:
    inside = Path(__file__).resolve().parents[2] / "build" / "pki-test"
    done = cli(env, "ca", "init", "--dir", str(inside))
    assert done.returncode == 2
    assert "git work tree" in done.stderr and "--force" in done.stderr
    assert not inside.exists()


def test_it_warns_when_the_crl_is_about_to_expire_until_refreshed(env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    assert cli(env, "ca", "init").returncode == 0
    fresh = cli(env, "ca", "status", "--json")
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["warnings"] == []
    pki = load_pki(tmp_path / "pki")
    resign_crl(pki, now=datetime.now(UTC) - timedelta(days=25))  # nextUpdate in 5 days
    stale = cli(env, "ca", "status")
    assert stale.returncode == 1
    assert "crl-refresh" in stale.stderr
    refreshed = cli(env, "ca", "crl-refresh")
    assert refreshed.returncode == 0, refreshed.stderr
    assert "not reloaded" in refreshed.stdout
    assert crl_next_update(pki) > datetime.now(UTC) + timedelta(days=29)
    assert cli(env, "ca", "status").returncode == 0
    as_json = cli(env, "ca", "crl-refresh", "--days", "10", "--json")
    assert as_json.returncode == 0, as_json.stderr
    row = json.loads(as_json.stdout)
    assert row["reloaded"] is None and row["crl"] == str(pki.crl_path)
    assert datetime.fromisoformat(row["next_update"]) == crl_next_update(pki)


def test_it_says_what_to_run_when_there_is_no_pki(env: dict[str, str]) -> None:
    done = cli(env, "ca", "status")
    assert done.returncode == 2
    assert "careflow ca init" in done.stderr
