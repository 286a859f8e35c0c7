"""`careflow devices revoke` against a real Mosquitto: CRL, ACL, reload, live session ended."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.provisioning.pki import current_certificate, is_revoked
from tests.conftest import careflow_cmd, wait_until
from tests.provisioning.conftest import TlsBroker, mqtt_handshake

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("reload_how", ["pid", "pidfile", "command"])
def test_it_disconnects_a_connected_gateway_and_refuses_its_reconnect(
        tls_broker: TlsBroker, tmp_path: Path, reload_how: str) -> None:
    """With each way of reaching the broker: its pid, its pidfile, or a reload command (as
    `docker kill -s HUP mosquitto` would be in a container deployment)."""
    pid = tls_broker.proc.pid
    pidfile = tmp_path / "mosquitto.pid"
    pidfile.write_text(f"{pid}\n")
    reload_args = {"pid": ["--broker-pid", str(pid)],
                   "pidfile": ["--broker-pidfile", str(pidfile)],
                   "command": ["--reload-command", f"kill -HUP {pid}"]}[reload_how]
    tls = tls_broker.device_tls("gw-r", tmp_path)
    other = tls_broker.device_tls("gw-ok", tmp_path)
    agent = EdgeAgent(AgentConfig(
        gateway="gw-r", broker=parse_broker_url(f"mqtts://127.0.0.1:{tls_broker.device_port}"),
        data_dir=tmp_path / "edge", ca_file=tls.ca, cert_file=tls.cert, key_file=tls.key))
    agent.start()
    try:
        wait_until(lambda: agent.connected, timeout_s=10, what="the gateway to connect")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")}
        started = time.monotonic()
        result = subprocess.run(
            careflow_cmd("devices", "revoke", "gw-r", "--pki-dir", str(tls_broker.pki.dir),
                         *reload_args, "--broker", f"mqtts://127.0.0.1:{tls_broker.device_port}",
                         "--watch", "2.5", *(["--json"] if reload_how == "command" else [])),
            capture_output=True, text=True, env=env, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        if reload_how == "command":  # --json: one JSON object, no progress lines
            row = json.loads(result.stdout)
            assert row["gateway"] == "gw-r" and row["came_back"] is False and row["reloaded"]
            assert "offline" in row["presence_seen"]  # the agent's Will
        else:
            assert "did not reconnect" in result.stdout
            assert "offline" in result.stdout  # the agent's Will, sent when its session was taken
        assert time.monotonic() - started < 15
        assert "user gw-r\ntopic deny #" in tls_broker.pki.device_acl_path.read_text()
        assert not agent.connected  # paho keeps retrying every second; each TLS handshake fails
        issued = current_certificate(tls_broker.pki, "gw-r")
        assert issued is not None and is_revoked(tls_broker.pki, issued.serial)
        assert not mqtt_handshake(tls_broker.device_port, tls, "careflow-gw-gw-r")
        assert mqtt_handshake(tls_broker.device_port, other, "careflow-gw-gw-ok")
        assert "certificate revoked" in tls_broker.log.read_text() or \
            "certificate verify failed" in tls_broker.log.read_text()
    finally:
        agent.shutdown()


def test_it_says_how_to_reload_when_no_broker_option_is_given(tls_broker: TlsBroker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")}
    result = subprocess.run(
        careflow_cmd("device", "revoke", "gw-x", "--pki-dir", str(tls_broker.pki.dir),
                     "--broker", f"mqtts://127.0.0.1:{tls_broker.device_port}"),
        capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 2  # usage: the old spelling still works, and says the new one
    assert "--broker-pidfile" in result.stderr
    assert "use `careflow devices revoke`" in result.stderr
    assert not tls_broker.pki.issued_path.read_text()  # nothing was changed
