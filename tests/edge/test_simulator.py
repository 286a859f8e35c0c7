"""The fleet simulator runs real agents: an injected outage is seen by the hub and heals."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from careflow.core.config import parse_broker_url
from careflow.core.errors import ConfigError
from careflow.edge.simulator import Fault, FleetSimulator, parse_fault
from careflow.hub.store.records import EventFilter
from tests.conftest import Mosquitto, RunningHub, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_it_parses_fault_specs() -> None:
    assert parse_fault("outage:3@20+30") == Fault("outage", 3, 20.0, 30.0)
    assert parse_fault("alarm") == Fault("alarm", 1, 10.0, 30.0)
    with pytest.raises(ConfigError, match="KIND"):
        parse_fault("meteor:1")


def test_it_shows_an_outage_to_the_hub_and_delivers_everything_after_it(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]
) -> None:
    hub = hub_factory(mosquitto.url)
    simulator = FleetSimulator(
        broker=parse_broker_url(mosquitto.url), gateways=3, devices_per_gateway=2, interval_s=2,
        keepalive_s=2, faults=(Fault("outage", 1, 1.0, 6.0), Fault("alarm", 1, 2.0)))
    runner = threading.Thread(target=simulator.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: any(p.state == "offline" for p in hub.store.presence().values()),
                   timeout_s=15, what="the cut gateway's Last Will")
        wait_until(lambda: len(hub.store.presence()) == 3 and all(
            p.state == "online" for p in hub.store.presence().values()), timeout_s=30,
            what="the gateway back online")
        wait_until(lambda: hub.store.count(EventFilter(type="alert")) == 1, what="care alarm")
        wait_until(lambda: simulator.summary()["waiting"] == 0 and
                   simulator.summary()["confirmed"] >= 20, timeout_s=30,
                   what="every simulated event confirmed")
    finally:
        simulator.stop()
        runner.join(timeout=20)
    assert hub.store.total_gaps() == 0
    assert hub.store.dead_letter_count() == 0
