"""The registry's gateway actions against a real Mosquitto, a real hub and a real
`careflow edge run` agent: ping, diagnostics, resend and restart-agent, and their verifications
(which fail by their deadline when the cause is kept in place)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from careflow.core.clock import now_ms
from careflow.core.errors import BrokerError, RefusedError
from careflow.hub.ops.actions import ActionContext, execute, verify
from careflow.hub.ops.gateway import MqttGatewayCommands
from tests.conftest import Mosquitto, RunningHub, careflow_cmd, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Supervised:
    """`careflow edge run` as systemd runs it: restarted when it exits 75 (a remote
    restart-agent), unless ``supervise`` is off (the cause kept in place)."""

    def __init__(self, args: list[str], *, supervise: bool = True) -> None:
        self.args = args
        self.supervise = supervise
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = subprocess.Popen(self.args, env=os.environ, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self.starts += 1
            code = self.proc.wait()
            if code != 75 or not self.supervise:
                return

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._thread.join(timeout=10)


@pytest.fixture
def gateway(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(name: str = "gw-act", *, supervise: bool = True) -> Supervised:
        agent = Supervised(careflow_cmd("edge", "run", "--gateway", name, "--broker",
                                        mosquitto.url, "--data-dir", str(tmp_path / name),
                                        "--keepalive", "2", "--heartbeat-interval", "3600"),
                           supervise=supervise)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def ctx(mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub]) -> ActionContext:
    hub = hub_factory(mosquitto.url)
    return ActionContext(store=hub.store, settings=hub.settings,
                         gateway=MqttGatewayCommands(hub.settings), clock=now_ms,
                         gateway_timeout_s=5)


def online(ctx: ActionContext, name: str) -> str:
    """Wait until the hub sees the gateway online; its boot."""
    wait_until(lambda: (p := ctx.store.presence().get(name)) is not None and p.state == "online",
               what=f"{name} online")
    return ctx.store.presence()[name].boot


def test_it_pings_and_diagnoses_a_live_gateway(ctx: ActionContext,
                                               gateway: Callable[..., Supervised]) -> None:
    gateway()
    boot = online(ctx, "gw-act")
    ping = execute(ctx, "gateway.ping", {"gateway": "gw-act"})
    assert ping["result"]["pong"] is True and ping["result"]["boot"] == boot
    assert ping["elapsed_ms"] < 5000
    diagnostics = execute(ctx, "gateway.diagnostics", {"gateway": "gw-act"})
    assert diagnostics["result"]["boot"] == boot and "outbox_waiting" in diagnostics["result"]
    wait_until(lambda: execute(ctx, "hub.status", {})["healthy"] is True, what="hub healthy")
    shown = execute(ctx, "device.show", {"gateway": "gw-act"})
    assert shown["presence"]["state"] == "online" and shown["presence"]["boot"] == boot


def test_a_gateway_that_does_not_answer_is_a_broker_error_and_an_unknown_one_is_refused(
        ctx: ActionContext) -> None:
    with pytest.raises(BrokerError, match="no reply from gw-nobody"):
        execute(ctx, "gateway.ping", {"gateway": "gw-nobody"})
    with pytest.raises(RefusedError, match="gateway gw-nobody is not known"):
        execute(ctx, "gateway.resend", {"gateway": "gw-nobody"})


def test_it_asks_for_a_resend_and_verifies_the_outbox_drained(
        ctx: ActionContext, gateway: Callable[..., Supervised]) -> None:
    gateway()
    online(ctx, "gw-act")
    started = now_ms()
    done = execute(ctx, "gateway.resend", {"gateway": "gw-act", "device": "gw-act"})
    assert done["command"] == "resend" and isinstance(done["result"]["resending"], int)
    check = verify(ctx, "gateway.resend", {"gateway": "gw-act", "device": "gw-act"},
                   started_ms=started, poll_s=0.2)
    assert check.ok, check.detail
    assert check.evidence == {"outbox_waiting": 0}


def test_it_restarts_the_agent_and_sees_it_back_with_a_new_boot(
        ctx: ActionContext, gateway: Callable[..., Supervised]) -> None:
    agent = gateway()
    before = online(ctx, "gw-act")
    started = now_ms()
    done = execute(ctx, "gateway.restart-agent", {"gateway": "gw-act"})
    assert done["result"] == {"restarting": True} and done["boot_before"] == before
    check = verify(ctx, "gateway.restart-agent", {"gateway": "gw-act"}, started_ms=started,
                   deadline_s=30, poll_s=0.2)
    assert check.ok, check.detail
    assert check.evidence["boot"] != before and agent.starts == 2


def test_a_restart_nobody_brings_back_fails_its_verification_by_the_deadline(
        ctx: ActionContext, gateway: Callable[..., Supervised]) -> None:
    gateway(supervise=False)  # the cause kept in place: no supervisor restarts it
    online(ctx, "gw-act")
    started = now_ms()
    execute(ctx, "gateway.restart-agent", {"gateway": "gw-act"})
    began = time.monotonic()
    check = verify(ctx, "gateway.restart-agent", {"gateway": "gw-act"}, started_ms=started,
                   deadline_s=4, poll_s=0.2)
    assert check.ok is False and "not back online" in check.detail
    assert 4 <= time.monotonic() - began < 10
