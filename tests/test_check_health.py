"""scripts/check-health.sh against a real `careflow hub` process: healthy passes, faults are named;
and `careflow-check.sh --live` (which runs it first) against the same hub, which it must not page.

The script is read-only and reads the configured installation through the CLI, so the test
configures one (data directory, embedded broker and web on free ports) and runs the real script.
One hub serves both scripts: starting one is most of each run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import JsonReceiver, careflow_cmd, free_port, wait_until
from tests.test_careflow_check import stages

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
CAREFLOW = str(Path(sys.executable).parent / "careflow")


@pytest.fixture
def receiver() -> Iterator[JsonReceiver]:
    server = JsonReceiver()
    yield server
    server.close()


@pytest.fixture
def installation(tmp_path: Path, receiver: JsonReceiver) -> Iterator[dict[str, str]]:
    """A running `careflow hub` with its settings, as an operator's shell would have them: its
    channels are oncall and ops only (no CAREFLOW_CHANNEL_CHECK), both to ``receiver``."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "CAREFLOW": CAREFLOW, "XDG_DATA_HOME": str(tmp_path / "xdg"),  # the data directory
           "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}",
           "CAREFLOW_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
           "CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall"),
           "CAREFLOW_CHANNEL_OPS": receiver.url("/ops")}
    with (tmp_path / "hub.log").open("ab") as log:
        hub = subprocess.Popen(careflow_cmd("hub"), env=env, stdout=log, stderr=log)
    env["HUB_PID"] = str(hub.pid)
    wait_until(lambda: subprocess.run([CAREFLOW, "status"], env=env, capture_output=True,
                                      check=False).returncode == 0, timeout_s=60, what="the hub")
    yield env
    if hub.poll() is None:
        hub.terminate()
        hub.wait(timeout=20)


def check_health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "check-health.sh")], env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Check name → its verdict word."""
    return {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in {"PASS", "FAIL", "SKIP"}}


def test_it_passes_a_healthy_hub_checks_it_live_then_names_an_offline_gateway_and_a_stopped_hub(
        installation: dict[str, str], receiver: JsonReceiver) -> None:
    pki = Path(installation["HOME"]) / "pki"
    subprocess.run([CAREFLOW, "ca", "init", "--dir", str(pki), "--broker-host", "localhost"],
                   env=installation, check=True, capture_output=True)
    healthy = check_health({**installation, "CAREFLOW_PKI_DIR": str(pki)})
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    verdicts = lines(healthy)
    assert set(verdicts) == {"hub", "broker", "web", "queue", "lag", "store", "disk", "influxdb",
                             "notifications", "self-alerts", "gateways", "clock", "ca"}
    assert set(verdicts.values()) == {"PASS", "SKIP"}
    assert verdicts["hub"] == verdicts["web"] == verdicts["ca"] == "PASS"
    assert verdicts["influxdb"] == "SKIP"  # not configured here
    assert healthy.stdout.splitlines()[-1] == "PASS: every check"
    assert f"({Path(installation['HOME']) / 'xdg' / 'careflow'})" in healthy.stdout  # disk: the CLI's

    # careflow-check.sh --live: its synthetic check-* gateway's care alarm is recorded and
    # reaches neither oncall nor ops
    live = subprocess.run(["bash", str(ROOT / "careflow-check.sh"), "--live"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**installation, "CAREFLOW_BIN": CAREFLOW})
    assert live.returncode == 0, (live.stdout + live.stderr
                                  + (Path(installation["HOME"]) / "hub.log").read_text())
    assert stages(live.stdout) == {"health (read-only)": "PASS",
                                   "synthetic gateway check-*": "PASS"}, live.stdout
    incidents = subprocess.run([CAREFLOW, "incidents", "list", "--state", "resolved", "--json"],
                               env=installation, capture_output=True, text=True, check=True).stdout
    assert "care-alarm" in incidents and '"check-' in incidents
    assert receiver.requests == [], receiver.requests

    # a gateway whose heartbeat (1 s interval) stopped is late, then offline; check-* is ignored
    for gateway in ("gw-0001", "check-gw"):
        subprocess.run([CAREFLOW, "events", "publish", "--gateway", gateway, "--type", "heartbeat",
                        "--data", '{"interval_s": 1}'], env=installation, check=True,
                       capture_output=True)
    wait_until(lambda: '"state":"online"' not in subprocess.run(
        [CAREFLOW, "devices", "show", "gw-0001", "--json"], env=installation, capture_output=True,
        text=True, check=False).stdout, timeout_s=30, what="gw-0001 to be overdue")
    late = check_health(installation)
    assert late.returncode == 1
    assert lines(late)["gateways"] == "FAIL"
    assert "gw-0001" in late.stdout and "check-gw" not in late.stdout
    assert late.stdout.splitlines()[-1].startswith("FAIL: gateways: 1 of 1 gateways not online")

    os.kill(int(installation["HUB_PID"]), signal.SIGKILL)
    # `careflow status` calls a hub down once its last health report is 5 s old
    wait_until(lambda: subprocess.run([CAREFLOW, "status"], env=installation, capture_output=True,
                                      check=False).returncode == 1, timeout_s=30, what="stale health")
    stopped = check_health(installation)
    assert stopped.returncode == 1
    assert lines(stopped)["hub"] == lines(stopped)["web"] == "FAIL"
    assert stopped.stdout.splitlines()[-1].startswith("FAIL: hub: not running")
