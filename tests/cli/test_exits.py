"""Exit statuses mean one thing each, for every command (careflow.core.exits): 0 done, 1 failed or
refused, 2 usage or configuration, 75 try again (and 3 only for a hub that yielded its session)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from careflow.core.errors import (
    BrokerError,
    CareflowError,
    ClaimError,
    ConfigError,
    ContractError,
    CsrError,
    HubRunningError,
    InfluxError,
    PkiError,
    RefusedError,
    SessionTakenError,
    StoreError,
    TransportError,
)
from careflow.core.exits import (
    EXIT_FAILED,
    EXIT_SESSION_TAKEN,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    exit_status,
)
from tests.conftest import careflow_cmd, free_port


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("error", "status"), [
    (ConfigError("x"), EXIT_USAGE),
    (PkiError("x"), EXIT_USAGE),
    (HubRunningError("x"), EXIT_USAGE),
    (ContractError("schema", "x"), EXIT_USAGE),
    (BrokerError("credentials refused", retry=False), EXIT_USAGE),
    (TransportError("401", permanent=True), EXIT_USAGE),
    (RefusedError("x"), EXIT_FAILED),
    (CsrError("csr_invalid", "x"), EXIT_FAILED),
    (ClaimError("token_invalid", "x"), EXIT_FAILED),
    (StoreError("x"), EXIT_FAILED),
    (InfluxError("x", retry=False), EXIT_FAILED),
    (CareflowError("x"), EXIT_FAILED),
    (BrokerError("unreachable"), EXIT_TEMPFAIL),
    (ClaimError("rate_limited", "x", retry_after_s=30), EXIT_TEMPFAIL),
    (TransportError("timeout", permanent=False), EXIT_TEMPFAIL),
    (InfluxError("x", retry=True), EXIT_TEMPFAIL),
    (SessionTakenError("x"), EXIT_SESSION_TAKEN),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value))
def test_it_ends_each_error_with_the_status_of_its_meaning(error: CareflowError,
                                                           status: int) -> None:
    assert exit_status(error) == status


def test_it_exits_2_for_usage_and_configuration(tmp_path: Path) -> None:
    assert cli(tmp_path, "devices", "list", "--no-such-flag").returncode == EXIT_USAGE
    no_store = cli(tmp_path, "events", "count")
    assert no_store.returncode == EXIT_USAGE and "careflow hub" in no_store.stderr
    bad_time = cli(tmp_path, "events", "publish", "--type", "nonsense")
    assert bad_time.returncode == EXIT_USAGE and "unknown event type" in bad_time.stderr


def test_it_exits_75_when_the_broker_is_away(tmp_path: Path) -> None:
    away = cli(tmp_path, "events", "publish", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert away.returncode == EXIT_TEMPFAIL, away.stderr
    assert "cannot reach the MQTT broker" in away.stderr
    claim = cli(tmp_path, "edge", "claim", "--serial", "SN-1", "--token", "t", "--broker",
                f"mqtt://127.0.0.1:{free_port()}", "--out", str(tmp_path / "gw"))
    assert claim.returncode == EXIT_TEMPFAIL, claim.stderr
    # A gateway has no `careflow hub` to start: the hint says what to check there.
    assert "careflow hub" not in claim.stderr and "--broker" in claim.stderr, claim.stderr
