"""`careflow-edge run` (also `careflow edge run`): the agent on a gateway.

This is the gateway install's command: it imports only the agent, the contract and the MQTT
core, so a gateway needs neither the hub nor its dependencies.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from careflow.core.errors import CareflowError
from careflow.core.exits import EXIT_TEMPFAIL, exit_status
from careflow.core.log import setup_logging
from careflow.edge.agent import EdgeAgent, load_agent_config

# A remote command asked for a restart: "try again", and the supervisor starts the agent again
# (deploy/careflow-edge.service: RestartForceExitStatus).
EXIT_RESTART_REQUESTED = EXIT_TEMPFAIL

__all__ = ["EXIT_RESTART_REQUESTED", "edge_app", "main"]

edge_app = typer.Typer(help="The gateway agent: heartbeats, presence, store-and-forward.",
                       no_args_is_help=True)


@edge_app.callback()
def _gateway_commands() -> None:
    """The gateway agent: heartbeats, presence, store-and-forward.

    Example: `careflow-edge run --gateway gw-0001 --broker mqtt://hub.local:1883`.
    """


def main() -> None:
    """Entry point of `careflow-edge`: careflow's own errors become one clear line and the exit
    status of their meaning (careflow.core.exits: 1 refused, 2 configuration, 75 try again)."""
    try:
        edge_app(prog_name="careflow-edge")
    except CareflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exit_status(exc))


@edge_app.command("run")
def run(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="edge.yaml (see edge/edge.example.yaml).")] = None,
    gateway: Annotated[str | None, typer.Option("--gateway", help="This gateway's id.")] = None,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="mqtt://host:1883 or mqtts://host:8883.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Where the outbox lives (keep it on persistent storage).")] = None,
    spool_dir: Annotated[Path | None, typer.Option(
        "--spool-dir", help="Directory of *.jsonl readings from sensor bridges "
        "[default: DATA_DIR/spool].")] = None,
    heartbeat_interval: Annotated[int | None, typer.Option(
        "--heartbeat-interval", min=1, help="Seconds between heartbeats [default: 60].")] = None,
    keepalive: Annotated[int | None, typer.Option(
        "--keepalive", min=2, help="MQTT keepalive; the hub learns of a dead gateway within "
        "1.5x this [default: 30].")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="CA of the broker's certificate, for mqtts:// [default: system CAs].")
    ] = None,
    cert_file: Annotated[Path | None, typer.Option(
        "--cert-file", help="This gateway's client certificate (mutual TLS).")] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="The private key of --cert-file (keep it 0600).")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the agent: every event waits on disk until the hub confirms it stored it.

    Example: `careflow-edge run --gateway gw-0001 --broker mqtt://hub.local:1883 --data-dir
    /var/lib/careflow-edge`. Broker credentials come from CAREFLOW_EDGE_USERNAME and
    CAREFLOW_EDGE_PASSWORD (or CAREFLOW_EDGE_PASSWORD_FILE, a file holding it).
    """
    settings = load_agent_config(config, {
        "gateway": gateway, "broker": broker, "data_dir": data_dir, "spool_dir": spool_dir,
        "heartbeat_interval_s": heartbeat_interval, "keepalive_s": keepalive,
        "ca_file": ca_file, "cert_file": cert_file, "key_file": key_file})
    setup_logging(log_level)
    agent = EdgeAgent(settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: agent.stop())
    typer.echo(f"careflow edge: gateway {settings.gateway} → {settings.broker}, outbox in "
               f"{settings.data_dir}, spool {settings.spool}; Ctrl-C stops", err=True)
    agent.run()
    if agent.restart_requested:
        typer.echo("restart requested by a remote command; exiting "
                   f"{EXIT_RESTART_REQUESTED} for the supervisor", err=True)
        raise typer.Exit(EXIT_RESTART_REQUESTED)
