"""Presence end to end: real gateway agents → real Mosquitto → the hub."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.hub.store.records import EventFilter
from tests.conftest import Mosquitto, RunningHub, wait_until
from tests.hub.conftest import publish_raw

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def agent_factory(mosquitto: Mosquitto) -> Iterator[Callable[[Path], EdgeAgent]]:
    """Agents of gateway gw-re, each on the data directory it is given (a new one: reflashed)."""
    running: list[tuple[EdgeAgent, threading.Thread]] = []

    def start(data_dir: Path) -> EdgeAgent:
        agent = EdgeAgent(AgentConfig(gateway="gw-re", broker=parse_broker_url(mosquitto.url),
                                      data_dir=data_dir, heartbeat_interval_s=3600, keepalive_s=2,
                                      batch_linger_s=0.1))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        running.append((agent, thread))
        return agent

    yield start
    for agent, thread in running:
        agent.stop()
        thread.join(timeout=15)


def test_a_reflashed_gateway_comes_back_online_and_its_old_will_stays_stale(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    agent_factory: Callable[[Path], EdgeAgent], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)

    def presence() -> tuple[str, int, str] | None:
        record = hub.store.presence().get("gw-re")
        return (record.state, record.conn, record.boot) if record else None

    before = agent_factory(tmp_path / "before")
    for connection in (1, 2, 3):  # a few connections: the hub remembers counter 3
        wait_until(lambda c=connection: presence() == ("online", c, before.boot),
                   what=f"connection {connection} online")
        if connection < 3:
            before.cut_network()
            wait_until(lambda: (presence() or ("",))[0] == "offline", what="its Will")
            before.restore_network()
    before.cut_network()  # power cut, then the technician reflashes the gateway
    wait_until(lambda: presence() == ("offline", 3, before.boot), what="the last Will")
    old_will = json.dumps({"v": 1, "state": "offline", "conn": 3, "boot": before.boot,
                           "reason": "connection lost"}).encode()

    after = agent_factory(tmp_path / "reflashed")  # an empty outbox: counts from 1 again
    wait_until(lambda: presence() == ("online", 1, after.boot), what="the reflashed gateway "
               "online, though its counter restarted below the one the hub remembers")

    publish_raw(mosquitto, [("careflow/v1/gw-re/state", old_will)])  # the old Will, again
    marker = after.add("gw-re", "status", {"state": "ok"})
    wait_until(lambda: hub.store.count(EventFilter(type="status")) == 1, what="marker event")
    assert [e.id for e in hub.store.query(EventFilter(type="status"))] == [marker["id"]]
    assert presence() == ("online", 1, after.boot)
