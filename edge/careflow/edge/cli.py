"""`careflow-edge run|claim` (also `careflow edge run|claim`): the commands run on a gateway.

This is the gateway install's command: it imports only the agent, the contract and the MQTT
core (and, for `claim`, the provisioning protocol), so a gateway needs neither the hub nor its
dependencies.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from careflow.core.config import TlsFiles, parse_broker_url, tls_files
from careflow.core.errors import CareflowError, ClaimError
from careflow.core.exits import EXIT_TEMPFAIL, exit_status
from careflow.core.log import setup_logging
from careflow.edge.agent import AgentConfig, EdgeAgent, load_agent_config

# A remote command asked for a restart: "try again", and the supervisor starts the agent again
# (deploy/careflow-edge.service: RestartForceExitStatus).
EXIT_RESTART_REQUESTED = EXIT_TEMPFAIL

__all__ = ["EXIT_RESTART_REQUESTED", "claim", "edge_app", "main", "run"]

edge_app = typer.Typer(help="On a gateway: run the agent (heartbeats, presence, "
                       "store-and-forward); claim the gateway's identity.",
                       no_args_is_help=True, rich_markup_mode="markdown")


@edge_app.callback()
def _gateway_commands() -> None:
    """On a gateway: run the agent (heartbeats, presence, store-and-forward); claim the
    gateway's identity.

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
    _run_agent(settings)


def _run_agent(settings: AgentConfig) -> None:
    """Run the agent until Ctrl-C or SIGTERM; exit 75 when a remote command asked for a
    restart."""
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


@edge_app.command("claim")
def claim(
    serial: Annotated[str, typer.Option("--serial", help="This gateway's hardware serial.")],
    token: Annotated[str, typer.Option(
        "--token", envvar="CAREFLOW_CLAIM_TOKEN",
        help="The one-time claim token [env: CAREFLOW_CLAIM_TOKEN, kept out of `ps`].")],
    broker: Annotated[str, typer.Option(
        "--broker", help="The claim listener, e.g. mqtts://hub.example:8884 (mqtt:// on the "
        "embedded broker).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Where the identity and edge.yaml go (persistent storage).")],
    claim_cert: Annotated[Path | None, typer.Option(
        "--claim-cert", help="The shared claim certificate baked into the image.")] = None,
    claim_key: Annotated[Path | None, typer.Option("--claim-key", help="Its key.")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", help="CA of the broker's certificate [default: system CAs].")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait.")] = 30.0,
    run_agent: Annotated[bool, typer.Option(
        "--run", help="Then run the agent under the new identity (as `careflow-edge run`).")]
        = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print what was installed as one JSON object.")] = False,
) -> None:
    """Claim this gateway's own identity: a key made here (never sent), a certificate from the hub.

    Example: `careflow-edge claim --serial SN-0042 --token ... --claim-cert claim.crt
    --claim-key claim.key --ca-file device-ca.crt --broker mqtts://hub:8884 --out
    /var/lib/careflow-edge --run` (`careflow edge claim` on a full install). Exit 0: installed;
    1: refused (the code says why); 75: no broker, no answer or rate limited (safe to run
    again: the key is reused, so the token is not lost).
    """
    from careflow.edge.claim import claim_identity  # noqa: PLC0415 - only claims need crypto

    url = parse_broker_url(broker)
    tls: TlsFiles | None = tls_files(ca_file, claim_cert, claim_key) if url.tls else None
    try:
        result = claim_identity(serial=serial, token=token, broker=url, out=out, tls=tls,
                                timeout_s=timeout)
    except ClaimError as exc:
        wait = f" (retry after {exc.retry_after_s}s)" if exc.retry_after_s else ""
        typer.secho(f"claim refused: {exc}{wait}", fg="red", err=True)
        raise typer.Exit(exit_status(exc)) from exc
    if as_json:
        typer.echo(json.dumps({"gateway_id": result.gateway_id,
                               "identity_dir": str(result.identity_dir),
                               "edge_config": str(result.edge_config),
                               "broker_url": result.broker_url,
                               "elapsed_ms": round(result.elapsed_ms, 1)}))
    else:
        typer.echo(f"claimed: gateway {result.gateway_id} in {result.elapsed_ms:.0f} ms; "
                   f"identity in {result.identity_dir}; agent config {result.edge_config}")
    if not run_agent:
        if not as_json:
            typer.echo(f"next: careflow-edge run --config {result.edge_config}")
        return
    _run_agent(load_agent_config(result.edge_config))
