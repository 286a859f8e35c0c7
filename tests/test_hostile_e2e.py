"""The worst input we know, thrown at a running hub and a running gateway agent at once.

Real processes (`careflow hub`, `careflow edge run`), a real Mosquitto, a real HTTP receiver for
the on-call channel. An attacker publishes straight to the broker; bad luck fills the agent's
spool with entries it cannot read. Afterwards both processes must still be running, the hostile
messages must be dead letters with their reasons, and an honest care alarm — from the broker and
from the spool — must still be stored and reach the on-call channel. Then a restarted hub must
not crash on anything the broker redelivers or keeps retained.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.store.records import EventFilter
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver, Mosquitto, careflow_cmd, wait_until
from tests.hub.conftest import publish, publish_raw

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEPTH = 1_000  # beyond what Python's recursion limit lets json, pickle or pydantic walk


def nested(depth: int) -> str:
    """JSON text of an object ``depth`` levels deep (json.dumps itself cannot go this deep)."""
    return '{"n": ' * (depth - 1) + '{"leaf": 1}' + "}" * (depth - 1)


def with_deep_extra(event: dict[str, Any], depth: int = DEPTH) -> bytes:
    """``event`` with a ``depth``-deep object spliced into its data as ``extra``."""
    text = json.dumps(event)
    head, tail = text.rsplit("}", 2)[0], "}}"
    return f'{head}, "extra": {nested(depth)}{tail}'.encode()


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile_messages() -> list[tuple[str, bytes]]:
    """(topic, payload) an attacker with broker access sends: every one must be refused."""
    spy = Stamper(gateway="gw-evil", device="dev-1")
    deep_json = with_deep_extra(spy.stamp("heartbeat", {"interval_s": 60}))
    nan_event = spy.stamp("heartbeat", {"interval_s": 60})
    nan_json = json.dumps(nan_event).replace('"interval_s": 60', '"interval_s": NaN').encode()
    spoofed = Stamper(gateway="gw-victim", device="sos-9").stamp(
        "alert", {"kind": "sos", "state": "raised"})
    return [
        ("careflow/v1/gw-evil/dev-1/heartbeat", deep_json),
        ("careflow/v1/gw-evil/dev-1/heartbeat", deep_json),  # a resend, as a gateway does
        ("careflow/v1/gw-evil/batch", b"[" + deep_json + b"]"),
        ("careflow/v1/gw-evil/batch", deep_array(50_000)),
        ("careflow/v1/gw-evil/dev-1/heartbeat", b"\xff\xfe\x00not utf-8 \xc3\x28"),
        ("careflow/v1/gw-evil/dev-1/heartbeat", nan_json),
        ("careflow/v1/gw-evil/dev-1/heartbeat", b"{" * 300_000),  # over the message limit
        ("careflow/v1/gw-evil/sos-9/alert", json.dumps(spoofed).encode()),  # speaks for another
    ]


def spool_line(reading: dict[str, Any]) -> str:
    return json.dumps(reading) + "\n"


def fill_the_spool_with_bad_luck(spool: Path) -> None:
    """Entries the agent cannot read, sorted before a valid care alarm."""
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "a-directory.jsonl").mkdir()
    (spool / "b-dangling.jsonl").symlink_to(spool / "nowhere")
    with (spool / "c-garbage.tmp").open("wb") as f:
        f.write(b"\xff\xfe not utf-8\n")
        f.write(spool_line({"device": "sensor-1", "type": "status",
                            "data": {"state": "ok", "blob": "x" * 400_000}}).encode())
        f.write(('{"device": "sensor-1", "type": "status", "data": {"state": "ok", "deep": '
                 + nested(DEPTH) + "}}\n").encode())
        f.write(spool_line({"device": "sos 1", "type": "alert",
                            "data": {"kind": "SOS", "state": "raised"}}).encode())
    (spool / "c-garbage.tmp").rename(spool / "c-garbage.jsonl")
    (spool / "d-alarm.tmp").write_text(spool_line(
        {"device": "sos-1", "type": "alert", "data": {"kind": "sos", "state": "raised"}}))
    (spool / "d-alarm.tmp").rename(spool / "d-alarm.jsonl")


class Processes:
    """The hub and the agent as real processes, their output in files for the failure message."""

    def __init__(self, tmp_path: Path, mosquitto: Mosquitto, receiver: HttpReceiver) -> None:
        self.tmp = tmp_path
        self.data_dir = tmp_path / "hub"
        self.env = {**os.environ, "CAREFLOW_DATA_DIR": str(self.data_dir),
                    "CAREFLOW_BROKER_URL": mosquitto.url, "CAREFLOW_SQLITE_SYNC": "normal",
                    "CAREFLOW_CHANNEL_ONCALL": f"json://127.0.0.1:{receiver.port}/oncall",
                    "CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{receiver.port}/ops"}
        self.broker = mosquitto.url
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as sink:
            process = subprocess.Popen(careflow_cmd(*args), env=self.env, stdout=sink,
                                       stderr=sink)
        self.running.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture
def processes(tmp_path: Path, mosquitto: Mosquitto,
              http_receiver: HttpReceiver) -> Iterator[Processes]:
    running = Processes(tmp_path, mosquitto, http_receiver)
    yield running
    running.stop_all()


def to_oncall(receiver: HttpReceiver) -> str:
    return "\n".join(json.dumps(body) for _, path, body, _ in receiver.requests
                     if path == "/oncall" and body is not None)


def test_hub_and_agent_survive_the_worst_input_and_a_care_alarm_still_gets_through(
    processes: Processes, mosquitto: Mosquitto, http_receiver: HttpReceiver, tmp_path: Path,
) -> None:
    hub = processes.start("hub", "hub")
    wait_until((processes.data_dir / "careflow.db").exists, what="the hub's store")
    store = SqliteStore(processes.data_dir / "careflow.db")
    wait_until(lambda: (store.read_health() or (0, {}))[1].get("connected") is True,
               what="the hub connected")

    agent_dir = tmp_path / "gw-home"
    fill_the_spool_with_bad_luck(agent_dir / "spool")
    agent = processes.start("agent", "edge", "run", "--gateway", "gw-home", "--broker",
                            processes.broker, "--data-dir", str(agent_dir),
                            "--heartbeat-interval", "1", "--keepalive", "5")

    publish_raw(mosquitto, hostile_messages())
    honest = Stamper(gateway="gw-honest", device="fall-1")
    publish(mosquitto, [Stamper(gateway="gw-honest").stamp("heartbeat", {"interval_s": 60}),
                        honest.stamp("alert", {"kind": "fall", "state": "raised"})])

    def stored(gateway: str, type_: str) -> int:
        return store.count(EventFilter(gateway=gateway, type=type_))

    wait_until(lambda: stored("gw-honest", "alert") == 1 or hub.poll() is not None,
               what="the honest care alarm stored")
    wait_until(lambda: stored("gw-home", "alert") >= 1 or agent.poll() is not None
               or hub.poll() is not None, timeout_s=30,
               what="the spooled care alarm forwarded past the bad entries")
    assert hub.poll() is None, processes.log("hub")
    assert agent.poll() is None, processes.log("agent")
    assert stored("gw-honest", "alert") == 1 and stored("gw-home", "alert") == 1
    wait_until(lambda: stored("gw-home", "heartbeat") >= 2, what="the agent's heartbeats")

    wait_until(lambda: "fall-1" in to_oncall(http_receiver) and "sos-1" in to_oncall(
        http_receiver), timeout_s=30, what="both care alarms at the on-call channel")

    # every attacker message is a dead letter with a reason; nothing of gw-evil was stored
    assert store.count(EventFilter(gateway="gw-evil")) == 0
    letters = store.dead_letters(limit=1000)
    evil = [d for d in letters if "gw-evil" in d.topic]
    assert sorted(d.code for d in evil) == sorted(
        ["too_deep", "too_deep", "too_deep", "too_deep", "not_utf8", "not_json", "oversized",
         "topic_mismatch"]), [(d.topic, d.code, d.reason) for d in letters]
    assert all(d.reason for d in evil)
    # the hub heard about what the gateway had to refuse (reported as error events)
    wait_until(lambda: stored("gw-home", "error") >= 1, what="the agent reports refused lines")

    # a restart meets whatever the broker redelivers or keeps retained: no crash loop
    hub.send_signal(signal.SIGTERM)
    assert hub.wait(timeout=30) == 0, processes.log("hub")
    publish(mosquitto, [Stamper(gateway="gw-honest").stamp("heartbeat", {"interval_s": 60})])
    again = processes.start("hub-again", "hub")
    wait_until(lambda: stored("gw-honest", "heartbeat") == 2 or again.poll() is not None,
               what="the restarted hub storing again")
    assert again.poll() is None, processes.log("hub-again")
    store.close()
