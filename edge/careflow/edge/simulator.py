"""A fleet in one process: every simulated gateway runs the real agent code (outbox, batching,
confirmations, Last Will); only its sensors are made up.

Faults are injected on a schedule so operators and tests can watch the system react:
``outage`` (gateways lose their link; the broker publishes their Last Will), ``battery`` (devices
drain to a low battery), ``errors`` (an error burst: fifty at once, then more for its
duration), ``alarm`` (a care alarm), ``skew`` (a gateway's clock runs ten minutes fast),
``duplicates`` (gateways resend everything repeatedly), ``silent`` (one device behind a live
gateway stops sending, for its duration). :meth:`FleetSimulator.fix` ends every fault in force
at once (a technician came: links back, batteries replaced, devices speaking, errors stopped).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from careflow.core.config import BrokerUrl
from careflow.core.errors import ConfigError
from careflow.edge.agent import AgentConfig, EdgeAgent

__all__ = ["FAULT_KINDS", "GATEWAYS_PER_PROCESS", "Fault", "FleetSimulator", "parse_fault",
           "run_fleet_process"]

# paho's network loop uses select(), which cannot watch file descriptors above 1023; each agent
# holds about six (socket, wake-up pair, outbox database and journal), so a large fleet is split
# into processes of this many gateways.
GATEWAYS_PER_PROCESS = 100

log = logging.getLogger(__name__)

FAULT_KINDS = ("outage", "battery", "errors", "alarm", "skew", "duplicates", "silent")
_FAULT = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<count>\d+))?(?:@(?P<at>\d+(?:\.\d+)?))?"
                    r"(?:\+(?P<duration>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True, slots=True)
class Fault:
    """``kind[:count][@at_seconds][+duration_seconds]``, e.g. ``outage:3@20+30``."""

    kind: str
    count: int = 1
    at_s: float = 10.0
    duration_s: float = 30.0


def parse_fault(text: str) -> Fault:
    """Parse a --fault value; ConfigError explains the syntax."""
    match = _FAULT.match(text.strip())
    if match is None or match["kind"] not in FAULT_KINDS:
        msg = (f"--fault {text!r}: use KIND[:COUNT][@AT_SECONDS][+DURATION_SECONDS] with KIND one "
               f"of {', '.join(FAULT_KINDS)}, e.g. outage:3@20+30")
        raise ConfigError(msg)
    return Fault(match["kind"], int(match["count"] or 1), float(match["at"] or 10.0),
                 float(match["duration"] or 30.0))


@dataclass(slots=True)
class _Device:
    name: str
    battery: float
    next_heartbeat: float
    silent_until: float | None = None


@dataclass(slots=True)
class _Gateway:
    agent: EdgeAgent
    devices: list[_Device]
    cut_until: float | None = None
    storm_until: float | None = None
    errors_until: float | None = None
    errors_device: str = ""


class FleetSimulator:
    """Runs ``gateways`` x ``devices_per_gateway`` simulated sources until stopped."""

    def __init__(self, *, broker: BrokerUrl, gateways: int, devices_per_gateway: int,
                 interval_s: int = 60, faults: tuple[Fault, ...] = (), keepalive_s: int = 30,
                 data_dir: Path | None = None, seed: int = 1, prefix: str = "sim",
                 first_index: int = 0) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="careflow-sim-"))
        self.interval_s = interval_s
        self.faults = list(faults)
        self._random = random.Random(seed)  # noqa: S311 - made-up sensor values, not secrets
        self._stop = threading.Event()
        self._fix = threading.Event()
        self.started = time.monotonic()
        self.gateways: list[_Gateway] = []
        for g in range(first_index, first_index + gateways):
            name = f"{prefix}-gw-{g:04d}"
            config = AgentConfig(gateway=name, broker=broker, data_dir=self.data_dir / name,
                                 heartbeat_interval_s=interval_s, keepalive_s=keepalive_s,
                                 batch_linger_s=1.0, resend_after_s=30, outbox_sync="normal")
            devices = [_Device(f"{name}-dev-{d:02d}", self._random.uniform(60, 100),
                               self.started + self._random.uniform(0, interval_s))
                       for d in range(devices_per_gateway)]
            self.gateways.append(_Gateway(EdgeAgent(config), devices))

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish."""
        self._stop.set()

    def fix(self) -> None:
        """End every fault in force on the next pass (outages, silent devices, low batteries,
        error bursts): the cause of their incidents is gone."""
        self._fix.set()

    def run(self) -> None:
        """Start every agent, then drive sensors, faults and agents from one thread."""
        for gateway in self.gateways:
            gateway.agent.start()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._fix.is_set():
                    self._fix.clear()
                    self._repair(now)
                self._apply_faults(now)
                for gateway in self.gateways:
                    self._sense(gateway, now)
                    if gateway.cut_until is None:
                        gateway.agent.tick(with_host_health=False)
                self._stop.wait(0.5)
        finally:
            for gateway in self.gateways:
                gateway.agent.shutdown()
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- made-up sensors ----------------------------------------------------------------------

    def _sense(self, gateway: _Gateway, now: float) -> None:
        for device in gateway.devices:
            if device.silent_until is not None:
                if now < device.silent_until:
                    continue
                device.silent_until = None
            if now < device.next_heartbeat:
                continue
            device.next_heartbeat = now + self.interval_s * self._random.uniform(0.95, 1.05)
            device.battery = max(0.0, device.battery - self._random.uniform(0, 0.05))
            gateway.agent.add(device.name, "heartbeat", {
                "interval_s": self.interval_s, "battery_pct": round(device.battery, 1)})
        if gateway.errors_until is not None:
            if now < gateway.errors_until:
                for _ in range(3):  # six a second: a burst rule stays firing
                    gateway.agent.add(gateway.errors_device, "error", {
                        "code": "E_SENSOR_TIMEOUT", "severity": "warning",
                        "message": "sensor did not answer (still)"})
            else:
                gateway.errors_until = None
        if gateway.storm_until is not None:
            if now < gateway.storm_until:
                gateway.agent.outbox.resend_all()
            else:
                gateway.storm_until = None
        if gateway.cut_until is not None and now >= gateway.cut_until:
            gateway.cut_until = None
            gateway.agent.restore_network()
            log.info("simulated outage over", extra={"gateway": gateway.agent.config.gateway})

    # -- faults -------------------------------------------------------------------------------

    def _apply_faults(self, now: float) -> None:
        due = [f for f in self.faults if now - self.started >= f.at_s]
        for fault in due:
            self.faults.remove(fault)
            victims = self._random.sample(self.gateways, min(fault.count, len(self.gateways)))
            log.warning("injecting fault", extra={"fault": fault.kind, "gateways": [
                v.agent.config.gateway for v in victims]})
            for gateway in victims:
                self._inject(fault, gateway, now)

    def _inject(self, fault: Fault, gateway: _Gateway, now: float) -> None:
        agent = gateway.agent
        device = self._random.choice(gateway.devices) if gateway.devices else None
        target = device.name if device else agent.config.gateway
        if fault.kind == "outage":
            gateway.cut_until = now + fault.duration_s
            agent.cut_network()
        elif fault.kind == "battery" and device is not None:
            device.battery = 8.0
            agent.add(target, "status", {"state": "degraded", "battery_pct": 8.0,
                                         "message": "battery low"})
        elif fault.kind == "errors":
            gateway.errors_until, gateway.errors_device = now + fault.duration_s, target
            for n in range(50):
                agent.add(target, "error", {"code": "E_SENSOR_TIMEOUT", "severity": "warning",
                                            "message": f"sensor did not answer (#{n + 1})"})
        elif fault.kind == "alarm":
            agent.add(target, "alert", {"kind": "fall", "state": "raised",
                                        "message": "simulated fall"})
        elif fault.kind == "skew":
            skewed_ms = int((time.time() + 600) * 1000)  # the gateway's clock runs 10 min fast
            agent.outbox.add(target, "status", {"state": "ok", "message": "clock 10 min fast"},
                             at_ms=skewed_ms)
        elif fault.kind == "duplicates":
            gateway.storm_until = now + fault.duration_s
        elif fault.kind == "silent" and device is not None:
            device.silent_until = now + fault.duration_s

    def _repair(self, now: float) -> None:
        """Every fault in force ends (see :meth:`fix`)."""
        for gateway in self.gateways:
            if gateway.cut_until is not None:
                gateway.cut_until = now  # restored by the next _sense
            gateway.errors_until = gateway.storm_until = None
            for device in gateway.devices:
                device.silent_until = None
                device.next_heartbeat = now
                if device.battery < 20:
                    device.battery = 95.0
                    gateway.agent.add(device.name, "status", {
                        "state": "ok", "battery_pct": 95.0, "message": "battery replaced"})
        log.warning("faults fixed")

    # -- figures ------------------------------------------------------------------------------

    def summary(self) -> dict[str, int]:
        """Totals across the fleet (empty once the fleet is shutting down)."""
        if self._stop.is_set():
            return {}
        return {
            "gateways": len(self.gateways),
            "connected": sum(g.agent.connected for g in self.gateways),
            "devices": sum(len(g.devices) for g in self.gateways),
            "waiting": sum(g.agent.outbox.size() for g in self.gateways),
            "confirmed": sum(g.agent.confirmed for g in self.gateways),
        }


def run_fleet_process(kwargs: dict[str, object], stop: object, reports: object) -> None:
    """Body of one simulator process: run a slice of the fleet, report its summary every 5 s.

    ``stop`` is a multiprocessing Event and ``reports`` a multiprocessing Queue (typed loosely
    because they come from a multiprocessing context).
    """
    import signal  # noqa: PLC0415

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    parent = os.getppid()
    simulator = FleetSimulator(**kwargs)  # type: ignore[arg-type]
    runner = threading.Thread(target=simulator.run, daemon=True)
    runner.start()
    while not stop.wait(5) and os.getppid() == parent:  # type: ignore[attr-defined]
        reports.put((kwargs["first_index"], simulator.summary()))  # type: ignore[attr-defined]
    simulator.stop()
    runner.join(timeout=60)
