"""`careflow provision refusals` and `watch` as an operator runs them (real processes, real
SQLite written by the provisioning service's own registry)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from careflow.core import clock
from careflow.provisioning.claims import Refusal, hash_token
from careflow.provisioning.registry import SqliteProvisioningRegistry
from tests.conftest import careflow_cmd

HOSTILE = "[bold red]x[/]"


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_lists_refusals_newest_first_and_watch_names_them(tmp_path: Path) -> None:
    now_ms = clock.now_ms()
    registry = SqliteProvisioningRegistry(tmp_path / "careflow.db", synchronous="normal")
    try:
        registry.register(serial="SN-1", site="lab", gateway_id="gw-sn-1",
                          token_hash=hash_token("t"), token_expires_ms=now_ms + 60_000,
                          replace=False, now_ms=now_ms)
        registry.record_refusals([
            Refusal(source="claim-SN-1", serial="SN-1", code="token_invalid",
                    first_ms=now_ms - 5000, last_ms=now_ms - 1000, count=7),
            Refusal(source=HOSTILE, serial="", code="bad_request", first_ms=now_ms,
                    last_ms=now_ms, count=1)], max_rows=100)
    finally:
        registry.close()

    done = cli(tmp_path, "provision", "refusals")
    assert done.returncode == 0, done.stderr
    assert HOSTILE in done.stdout
    assert done.stdout.index("bad_request") < done.stdout.index("token_invalid")  # newest first
    done = cli(tmp_path, "provision", "refusals", "--serial", "SN-1", "--json")
    [row] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (row["source"], row["code"], row["count"]) == ("claim-SN-1", "token_invalid", 7)

    done = cli(tmp_path, "provision", "watch", "SN-1", "--timeout", "0.2")
    assert done.returncode == 1
    assert "token_invalid x7 from claim-SN-1" in done.stderr
