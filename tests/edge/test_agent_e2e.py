"""Agent → real Mosquitto → hub: confirmations, a broker crash, an agent restart, the Last Will."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from careflow.core import clock
from careflow.core.config import parse_broker_url
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.hub.store.records import EventFilter
from tests.conftest import Mosquitto, RunningHub, careflow_cmd, wait_until
from tests.edge.conftest import AgentThread, spool

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def agents(mosquitto: Mosquitto, tmp_path: Path,
           run_agent: Callable[[AgentConfig], AgentThread]) -> Callable[..., AgentThread]:
    def start(gateway: str = "gw-e2e", **kw: object) -> AgentThread:
        return run_agent(AgentConfig(gateway=gateway, broker=parse_broker_url(mosquitto.url),
                                     data_dir=tmp_path / gateway, heartbeat_interval_s=3600,
                                     keepalive_s=5, batch_linger_s=0.1, resend_after_s=3, **kw))

    return start


def readings(count: int, start: int = 0) -> list[dict[str, object]]:
    return [{"device": f"sensor-{i % 5}", "type": "status",
             "data": {"state": "ok", "battery_pct": 90, "n": start + i}} for i in range(count)]


def test_it_forwards_spooled_events_and_lets_them_go_once_confirmed(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    agents: Callable[..., AgentThread], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)
    agent = agents()
    spool(tmp_path / "gw-e2e", "first", readings(200))
    spool(tmp_path / "gw-e2e", "alarm", [{"device": "fall-1", "type": "alert",
                                          "data": {"kind": "fall", "state": "raised"}}])
    wait_until(lambda: hub.store.count(EventFilter(type="status")) == 200, what="200 stored")
    wait_until(lambda: hub.store.count(EventFilter(type="alert")) == 1, what="care alarm")
    wait_until(lambda: agent.agent.outbox.size() == 0, what="outbox drained by confirmations")
    assert hub.store.total_gaps() == 0
    presence = hub.store.presence()["gw-e2e"]
    assert presence.state == "online"


def test_it_loses_nothing_when_the_broker_crashes_and_the_agent_restarts(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    agents: Callable[..., AgentThread], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)
    agent = agents()
    spool(tmp_path / "gw-e2e", "a", readings(300))
    wait_until(lambda: hub.store.count(EventFilter()) > 0, what="ingest under way")
    mosquitto.stop(signal.SIGKILL)  # the broker forgets its sessions and queues
    spool(tmp_path / "gw-e2e", "b", readings(300, start=300))  # written while the broker is dead
    time.sleep(1.0)
    agent.stop()  # and the agent restarts mid-outage
    spool(tmp_path / "gw-e2e", "c", readings(100, start=600))
    agent = agents()
    time.sleep(1.0)
    mosquitto.start()
    wait_until(lambda: hub.store.count(EventFilter(type="status")) == 700, timeout_s=60,
               what="all 700 readings after the outage")
    wait_until(lambda: agent.agent.outbox.size() == 0, timeout_s=30, what="outbox drained")
    assert hub.store.total_gaps() == 0
    assert hub.store.dead_letter_count() == 0
    numbers = sorted(ev.data["n"] for ev in hub.store.query(EventFilter(type="status"),
                                                              limit=1000))
    assert numbers == list(range(700))


def test_it_marks_a_killed_gateway_offline_within_one_and_a_half_keepalives(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)
    keepalive = 2
    agent = subprocess.Popen(
        careflow_cmd("edge", "run", "--gateway", "gw-lwt", "--broker", mosquitto.url,
                     "--data-dir", str(tmp_path / "gw-lwt"), "--keepalive", str(keepalive)),
        env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (p := hub.store.presence().get("gw-lwt")) is not None
                   and p.state == "online", what="gateway online")
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=5)
        killed = time.monotonic()
        wait_until(lambda: hub.store.presence()["gw-lwt"].state == "offline",
                   timeout_s=keepalive * 3, what="Last Will delivered")
        assert time.monotonic() - killed <= keepalive * 1.5 + 0.5  # + the hub's commit cycle
        assert hub.store.presence()["gw-lwt"].reason == "connection lost"
    finally:
        if agent.poll() is None:
            agent.kill()


def test_it_answers_allowlisted_commands_and_refuses_others(
    mosquitto: Mosquitto, agents: Callable[..., AgentThread],
) -> None:
    agent = agents(gateway="gw-cmd")
    wait_until(agent.agent._connected.is_set, what="agent connected")
    env = {**os.environ, "CAREFLOW_BROKER_URL": mosquitto.url}
    ping = subprocess.run(careflow_cmd("gateway", "cmd", "gw-cmd", "ping", "--timeout", "5"),
                          env=env, capture_output=True, text=True, timeout=30, check=False)
    assert ping.returncode == 0, ping.stderr
    answer = json.loads(ping.stdout)
    assert answer["ok"] is True and answer["result"]["boot"] == agent.agent.boot
    refused = subprocess.run(careflow_cmd("gateway", "cmd", "gw-cmd", "rm-rf", "--timeout", "5"),
                             env=env, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 1
    answer = json.loads(refused.stdout)
    assert answer["ok"] is False and "not allowed" in answer["error"]
    assert "ping" in answer["error"]
    silent = subprocess.run(careflow_cmd("gateway", "cmd", "gw-nobody", "ping", "--timeout", "1"),
                            env=env, capture_output=True, text=True, timeout=30, check=False)
    assert silent.returncode == 75 and "no reply from gw-nobody" in silent.stderr  # try again


def test_it_keeps_a_reconnected_gateway_online_when_a_stale_will_arrives_late(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    agents: Callable[..., AgentThread],
) -> None:
    hub = hub_factory(mosquitto.url)
    agent = agents(gateway="gw-flap")
    wait_until(lambda: (p := hub.store.presence().get("gw-flap")) is not None
               and p.state == "online", what="online")
    first_conn = hub.store.presence()["gw-flap"].conn
    agent.agent.cut_network()
    wait_until(lambda: hub.store.presence()["gw-flap"].state == "offline", what="will")
    agent.agent.restore_network()
    wait_until(lambda: hub.store.presence()["gw-flap"].state == "online"
               and hub.store.presence()["gw-flap"].conn > first_conn, what="back online")
    # The Will of the first connection, delivered late (as after a broker-side takeover):
    stale = json.dumps({"v": 1, "state": "offline", "conn": first_conn, "boot": agent.agent.boot,
                        "reason": "connection lost"}).encode()
    from tests.hub.conftest import publish_raw  # noqa: PLC0415

    publish_raw(mosquitto, [("careflow/v1/gw-flap/state", stale)])
    publish_raw(mosquitto, [("careflow/v1/gw-flap/gw-flap/status",
                             json.dumps(agent.agent.outbox.add("gw-flap", "status",
                                                               {"state": "ok"})).encode())])
    wait_until(lambda: hub.store.count(EventFilter(type="status")) == 1, what="marker event")
    assert hub.store.presence()["gw-flap"].state == "online"


def test_it_reports_outbox_overflow_as_an_error_event(tmp_path: Path) -> None:
    agent = EdgeAgent(AgentConfig(gateway="gw-full", broker=parse_broker_url("mqtt://127.0.0.1:9"),
                                  data_dir=tmp_path, max_events=3))
    for _ in range(5):
        agent.add("gw-full", "heartbeat", {"interval_s": 60})
    agent.add("gw-full", "alert", {"kind": "sos", "state": "raised"})
    agent._report_drops()
    kept = [json.loads(p.body) for p in agent.outbox.due(now_ms=0, resend_after_ms=0, limit=10)]
    errors = [e for e in kept if e["type"] == "error"]
    assert [e["data"]["code"] for e in errors] == ["E_OUTBOX_OVERFLOW"]
    assert "heartbeat" in errors[0]["data"]["message"]
    assert any(e["type"] == "alert" for e in kept)
    agent.outbox.close()


def test_it_asks_the_gateway_to_resend_what_never_arrived(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)
    config = AgentConfig(gateway="gw-gap", broker=parse_broker_url(mosquitto.url),
                         data_dir=tmp_path / "gw-gap", heartbeat_interval_s=3600,
                         batch_linger_s=0.1, resend_after_s=3600)  # no timed resend in this test
    agent = EdgeAgent(config)
    agent.start()
    try:
        wait_until(lambda: agent.connected, what="agent connected")
        events = [agent.add("door-1", "status", {"state": "ok", "n": n}) for n in range(5)]
        lost = [p for p in agent.outbox.due(now_ms=0, resend_after_ms=0, limit=10)
                if json.loads(p.body)["seq"] == 3]
        agent.outbox.mark_sent(lost, now_ms=clock.now_ms())  # "sent", never arrived
        agent.tick()
        deadline = time.monotonic() + 20
        while hub.store.count(EventFilter(device="door-1")) < 5 and time.monotonic() < deadline:
            agent.tick()  # the hub's resend request arrives as a remote command
            time.sleep(0.2)
        assert hub.store.count(EventFilter(device="door-1")) == 5
        assert hub.service.counters.resend_requests >= 1
        assert hub.store.total_gaps() == 0
        assert {ev.id for ev in hub.store.query(EventFilter(device="door-1"))} == {
            e["id"] for e in events}
    finally:
        agent.shutdown()
