"""The README's path on the embedded default: `careflow hub`, publish, query — as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.core.errors import BrokerError
from careflow.hub.ingest.embedded_broker import EmbeddedBroker
from tests.conftest import careflow_cmd, free_port, wait_until


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CAREFLOW_DATA_DIR": str(tmp_path / "data"),
            "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}"}


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"careflow {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


@pytest.fixture
def hub(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with (tmp_path / "hub.log").open("wb") as log:
        proc = subprocess.Popen(careflow_cmd("hub"), env=env, stdout=log, stderr=log)
    wait_until(lambda: cli(env, "status", check=False).returncode == 0 or proc.poll() is not None,
               what="hub healthy")
    assert proc.poll() is None, (tmp_path / "hub.log").read_text()
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, (tmp_path / "hub.log").read_text()


def test_it_ingests_published_events_and_shows_them(env: dict[str, str],
                                                    hub: subprocess.Popen[bytes]) -> None:
    published = json.loads(cli(env, "events", "publish", "--gateway", "gw-7", "--count", "5",
                               "--json").stdout)
    assert (published["published"], published["first_seq"], published["last_seq"]) == (5, 1, 5)
    assert len(set(published["ids"])) == 5
    cli(env, "events", "publish", "--gateway", "gw-7", "--device", "door-1", "--type", "status",
        "--data", '{"state": "degraded", "battery_pct": 12}', "--batch")
    wait_until(lambda: cli(env, "events", "count").stdout.strip() == "6", what="6 events")
    rows = [json.loads(line) for line in cli(env, "events", "query", "--json").stdout.splitlines()]
    assert len(rows) == 6
    assert {(r["gateway"], r["device"], r["type"]) for r in rows} == {
        ("gw-7", "gw-7", "heartbeat"), ("gw-7", "door-1", "status")}
    assert sorted(r["seq"] for r in rows if r["device"] == "gw-7") == [1, 2, 3, 4, 5]
    assert all(r["boot"] and r["id"] for r in rows)
    devices = [json.loads(line) for line in
               cli(env, "devices", "list", "--json").stdout.splitlines()]
    door = next(d for d in devices if d["device"] == "door-1")
    assert door["battery_pct"] == 12 and door["condition"] == "degraded" and door["gaps"] == 0
    assert door["state"] == "online"  # the registry's word; "condition" is the device's own
    gateway = next(d for d in devices if d["device"] == "gw-7")
    assert gateway["state"] == "online" and gateway["interval_s"] == 60
    paused_row = json.loads(cli(env, "devices", "pause", "gw-7", "--for", "30m", "--reason",
                                "battery swap", "--json").stdout)
    assert paused_row["paused"] and paused_row["reason"] == "battery swap"
    paused = {d["device"]: d for d in map(json.loads, cli(env, "devices", "list", "--json")
                                          .stdout.splitlines())}
    assert paused["door-1"]["state"] == "paused" and paused["gw-7"]["state"] == "paused"
    assert "battery swap" in paused["door-1"]["state_reason"]
    assert json.loads(cli(env, "devices", "resume", "gw-7", "--json").stdout) == {
        "gateway": "gw-7", "device": None, "paused": False}
    again = json.loads(cli(env, "devices", "show", "gw-7", "door-1", "--json").stdout)
    assert again["state"] == "online"
    assert cli(env, "devices", "resume", "gw-7", check=False).returncode == 1  # refused
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["connected"] and status["embedded_broker"] and status["events_kept"] == 6
    replayed = cli(env, "replay", "--target", "registry")
    assert "replayed 6 event(s)" in replayed.stdout
    replayed_json = json.loads(cli(env, "replay", "--target", "registry", "--json").stdout)
    assert replayed_json["events"] == 6 and replayed_json["stages"] == ["registry"]


def test_it_refuses_a_publish_that_breaks_the_contract(env: dict[str, str],
                                                       hub: subprocess.Popen[bytes]) -> None:
    done = cli(env, "events", "publish", "--type", "status", "--data", '{"state": "great"}',
               check=False)
    assert done.returncode == 2
    assert "data.state" in done.stderr


def test_it_says_when_the_hub_is_not_running(env: dict[str, str]) -> None:
    done = cli(env, "events", "count", check=False)
    assert done.returncode == 2 and "careflow hub" in done.stderr


def test_it_names_the_fix_when_the_listen_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker("127.0.0.1", port)
        with pytest.raises(BrokerError, match="--listen") as info:
            broker.start()
    assert f"--broker mqtt://127.0.0.1:{port}" in str(info.value)


def test_it_explains_a_dead_broker(env: dict[str, str]) -> None:
    done = cli(env, "events", "publish", "--broker", f"mqtt://127.0.0.1:{free_port()}",
               check=False)
    assert done.returncode == 75 and "cannot reach the MQTT broker" in done.stderr  # try again


def test_it_runs_the_demo_and_stops_cleanly(env: dict[str, str]) -> None:
    done = subprocess.run(careflow_cmd("demo", "--duration", "12", "--gateways", "2",
                                       "--devices-per-gateway", "2", "--interval", "2"),
                          env=env, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo stopped" in done.stdout
    assert "CARE ALARM" in done.stdout  # the scripted alarm at 8 s reached the live view
    count = cli(env, "events", "count", "--type", "alert")
    assert count.stdout.strip() == "1"
