"""`careflow simulate` (a fleet against any broker) and `careflow demo` (everything, zero setup)."""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from typing import Annotated, Any, Protocol

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from careflow.cli.common import (
    RulesDirOption,
    console,
    err_console,
    format_age,
    settings_from,
    styled,
    use_rules_dir,
)
from careflow.core import clock
from careflow.core.log import setup_logging
from careflow.edge.simulator import (
    FAULT_KINDS,
    GATEWAYS_PER_PROCESS,
    Fault,
    FleetSimulator,
    parse_fault,
    run_fleet_process,
)
from careflow.hub.app import build_hub
from careflow.hub.fleet.presence import device_state
from careflow.hub.store.adapters import open_store
from careflow.hub.store.interface import EventLog, Fleet, Health
from careflow.hub.store.records import EventFilter

__all__ = ["demo", "simulate"]

FaultOption = Annotated[list[str] | None, typer.Option(
    "--fault", help=f"KIND[:COUNT][@AT_S][+DURATION_S], KIND one of {', '.join(FAULT_KINDS)}; "
    "repeatable. Example: --fault outage:3@20+30 --fault alarm@15.")]


def _run_in_thread(simulator: FleetSimulator, duration: float | None) -> threading.Thread:
    runner = threading.Thread(target=simulator.run, name="simulator", daemon=True)
    runner.start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: simulator.stop())
    if duration is not None:
        threading.Timer(duration, simulator.stop).start()
    return runner


def simulate(
    gateways: Annotated[int, typer.Option("--gateways", min=1)] = 10,
    devices_per_gateway: Annotated[int, typer.Option("--devices-per-gateway", min=0)] = 5,
    interval: Annotated[int, typer.Option("--interval", min=1,
                                          help="Heartbeat interval, seconds.")] = 60,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="mqtt://host:port [default: the configured broker or embedded "
        "listen address].")] = None,
    fault: FaultOption = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="Stop after this many seconds [default: until Ctrl-C].")] = None,
    keepalive: Annotated[int, typer.Option("--keepalive", min=2)] = 30,
) -> None:
    """Run a simulated fleet: real agent code per gateway, made-up sensors, injected faults.

    Large fleets run in several processes of up to 100 gateways each; faults hit the first one.

    Example: `careflow simulate --gateways 50 --devices-per-gateway 10 --fault outage:3@20+30`.
    """
    settings = settings_from(broker=broker)
    setup_logging("warning")
    faults = tuple(parse_fault(f) for f in fault or [])
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    reports: Any = context.Queue()
    children = []
    for first in range(0, gateways, GATEWAYS_PER_PROCESS):
        kwargs = {"broker": settings.effective_broker_url, "interval_s": interval,
                  "gateways": min(GATEWAYS_PER_PROCESS, gateways - first),
                  "devices_per_gateway": devices_per_gateway, "keepalive_s": keepalive,
                  "faults": faults if first == 0 else (), "first_index": first, "seed": first + 1}
        child = context.Process(target=run_fleet_process, args=(kwargs, stop, reports),
                                name=f"simulator-{first}", daemon=True)
        child.start()
        children.append(child)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    err_console.print(f"simulating {gateways} gateways x {devices_per_gateway} devices in "
                      f"{len(children)} process(es) against {settings.effective_broker_url}; "
                      "Ctrl-C stops", highlight=False)
    deadline = None if duration is None else time.monotonic() + duration
    latest: dict[int, dict[str, int]] = {}
    next_print = time.monotonic() + 10
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            stop.set()
            break
        try:
            first, summary = reports.get(timeout=1)
            if summary:
                latest[first] = summary
        except queue.Empty:
            pass
        if time.monotonic() >= next_print and latest:
            next_print = time.monotonic() + 10
            total = {k: sum(s[k] for s in latest.values()) for k in next(iter(latest.values()))}
            console.print(f"{total['connected']}/{gateways} gateways connected, "
                          f"{total['devices']} devices, {total['confirmed']} events confirmed, "
                          f"{total['waiting']} waiting", highlight=False)
    for child in children:
        child.join(timeout=90)


class _ViewStore(EventLog, Fleet, Health, Protocol):
    """What the live view reads."""


def _view(store: _ViewStore, simulator: FleetSimulator) -> Group:
    now_ms = clock.now_ms()
    presence = store.presence()
    devices = store.devices()
    health = (store.read_health() or (0, {}))[1]
    states: dict[str, int] = {}
    problems: list[tuple[str, str, str]] = []
    for record in devices:
        state, why = device_state(now_ms=now_ms, last_seen_ms=record.last_seen_ms,
                                  interval_s=record.facts.get("interval_s"),
                                  presence=presence.get(record.gateway))
        states[state] = states.get(state, 0) + 1
        battery = record.facts.get("battery_pct")
        if state != "online":
            problems.append((record.gateway, record.device, f"{state}: {why}"))
        elif battery is not None and battery < 20:
            problems.append((record.gateway, record.device, f"battery {battery:g}%"))
    for alert in store.query(EventFilter(type="alert"), limit=5):
        problems.insert(0, (alert.gateway, alert.device,
                            f"CARE ALARM {alert.data.get('kind')} {format_age(alert.received_ms)} ago"))
    summary = Table.grid(padding=(0, 3))
    summary.add_row(
        styled(("gateways online", "bold"),
               f" {sum(p.state == 'online' for p in presence.values())}"
               f"/{len(simulator.gateways)}"),
        styled(("sources", "bold"), " " + " ".join(f"{k} {v}" for k, v in sorted(states.items()))),
        styled(("events/s", "bold"), f" {health.get('events_per_s', 0)}"),
        styled(("stored", "bold"), f" {health.get('events_stored', 0)}"),
        styled(("dead letters", "bold"), f" {health.get('dead_lettered', 0)}"),
    )
    table = Table("gateway", "device", "problem", title="recent problems", expand=True)
    for row in problems[:12]:
        table.add_row(*row)
    elapsed = time.monotonic() - simulator.started
    return Group(Panel(summary, title=f"careflow demo — {elapsed:.0f}s — Ctrl-C stops"), table)


def demo(
    gateways: Annotated[int, typer.Option("--gateways", min=1)] = 6,
    devices_per_gateway: Annotated[int, typer.Option("--devices-per-gateway", min=0)] = 4,
    interval: Annotated[int, typer.Option("--interval", min=2)] = 10,
    duration: Annotated[float | None, typer.Option("--duration")] = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="Embedded broker address [env: CAREFLOW_LISTEN].")] = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """The zero-setup showcase: embedded broker, hub and a simulated fleet, live in the terminal.

    After a few seconds a care alarm is raised, a device runs low on battery, and one gateway
    loses its link (its Last Will marks it offline) and comes back 30 s later.

    Example: `careflow demo` or `careflow demo --listen 127.0.0.1:1884 --duration 60`.
    """
    settings = settings_from(listen=listen)
    use_rules_dir(rules_dir)
    setup_logging("error")
    # amqtt reports each simulated link cut (a socket closed without DISCONNECT) as an asyncio
    # error; in the demo that is the point, not a fault.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # the demo's hub: its embedded broker even when a broker is configured, open to anyone,
    # no notifications, decoding in this process, no dead man's switch; the claim flow works
    # (provisioning), and InfluxDB is fed when CAREFLOW_INFLUX_URL is set
    with build_hub(settings, lock="careflow demo", embedded_broker=True, broker_credentials=None,
                   channels={}, decode_worker=False, deadman=False) as hub:
        hub.run_in_thread()
        faults = (Fault("alarm", 1, 8.0), Fault("battery", 1, 12.0),
                  Fault("outage", 1, 15.0, 30.0))
        simulator = FleetSimulator(broker=settings.effective_broker_url, gateways=gateways,
                                   devices_per_gateway=devices_per_gateway, interval_s=interval,
                                   faults=faults, keepalive_s=5, prefix="demo")
        runner = _run_in_thread(simulator, duration)
        if hub.web is not None:
            console.print(f"web console: {hub.web.url} (add a login: careflow users add NAME "
                          "--role operator)", highlight=False)
        viewer = open_store(settings)  # the live view reads on a connection of its own
        try:
            with Live(_view(viewer, simulator), console=console, refresh_per_second=2) as live:
                while runner.is_alive():
                    runner.join(timeout=0.5)
                    live.update(_view(viewer, simulator))
        finally:
            simulator.stop()
            runner.join(timeout=15)
            viewer.close()
    counters = hub.service.counters
    summary: dict[str, Any] = {"events_stored": counters.events_stored,
                               "duplicates": counters.duplicates,
                               "data": str(settings.data_dir)}
    console.print(f"demo stopped: {summary}", highlight=False)
