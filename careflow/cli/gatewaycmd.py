"""`careflow gateway cmd`: run an allowlisted command on a gateway and print its answer."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import paho.mqtt.client as paho
import typer

from careflow.cli.common import console, err_console, settings_from, styled
from careflow.core.config import TlsFiles, parse_broker_url, tls_files
from careflow.core.errors import BrokerError, ConfigError
from careflow.core.exits import exit_status
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.commands import ALLOWED
from careflow.edge.stamper import new_event_id
from careflow.schemas import command_topic, reply_topic

__all__ = ["gateway_app"]

gateway_app = typer.Typer(help="Talk to a gateway's agent; claim a gateway's identity.",
                          no_args_is_help=True)


@gateway_app.command("cmd")
def cmd(
    gateway: Annotated[str, typer.Argument(help="Gateway id.")],
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(ALLOWED)}.")],
    arg: Annotated[list[str] | None, typer.Option(
        "--arg", help="KEY=VALUE passed to the command (repeatable).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait.")] = 10.0,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="mqtt://host:port [env: CAREFLOW_BROKER_URL].")] = None,
) -> None:
    """Send a command and print the gateway's reply as JSON; exit 1 if it refused or failed.

    Example: `careflow gateway cmd gw-0001 ping` or `careflow gateway cmd gw-0001 diagnostics`.
    """
    args: dict[str, Any] = {}
    for item in arg or []:
        key, sep, value = item.partition("=")
        if not sep:
            msg = f"--arg {item!r} must look like KEY=VALUE"
            raise ConfigError(msg)
        args[key] = value
    settings = settings_from(broker=broker)
    url = settings.effective_broker_url
    correlation = new_event_id()
    answered = threading.Event()
    reply: dict[str, Any] = {}

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("id") == correlation:
            reply.update(body)
            answered.set()

    subscribed = threading.Event()
    client = make_client(client_id=f"careflow-cmd-{correlation}", clean_session=True, url=url,
                         username=settings.broker_username, password=settings.broker_password,
                         tls=settings.broker_tls)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    def subscribe(connected: paho.Client) -> None:
        connected.subscribe(reply_topic(gateway), qos=1)

    connect_blocking(client, url, on_connected=subscribe)
    try:
        subscribed.wait(5)  # subscribe before asking, so the answer cannot be missed
        started = time.monotonic()
        client.publish(command_topic(gateway),
                       json.dumps({"id": correlation, "name": name, "args": args}), qos=1)
        if not answered.wait(timeout):
            msg = (f"no reply from {gateway} within {timeout:g}s. Is it online? "
                   f"`careflow devices show {gateway}` shows its state.")
            raise BrokerError(msg)
        reply["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    finally:
        client.disconnect()
        client.loop_stop()
    console.print_json(json.dumps(reply))
    raise typer.Exit(0 if reply.get("ok") else 1)


@gateway_app.command("claim")
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
    run: Annotated[bool, typer.Option(
        "--run", help="Then run the agent under the new identity (as `careflow edge run`).")]
        = False,
) -> None:
    """Claim this gateway's own identity: a key made here (never sent), a certificate from the hub.

    Example: `careflow gateway claim --serial SN-0042 --token ... --claim-cert claim.crt
    --claim-key claim.key --ca-file device-ca.crt --broker mqtts://hub:8884 --out
    /var/lib/careflow-edge --run`. Exit 0: installed; 1: refused (the code says why); 75: no
    broker, no answer or rate limited (safe to run again: the key is reused, so the token is not
    lost).
    """
    from careflow.core.errors import ClaimError  # noqa: PLC0415
    from careflow.edge.agent import EdgeAgent, load_agent_config  # noqa: PLC0415
    from careflow.edge.claim import claim_identity  # noqa: PLC0415

    url = parse_broker_url(broker)
    tls: TlsFiles | None = tls_files(ca_file, claim_cert, claim_key) if url.tls else None
    try:
        result = claim_identity(serial=serial, token=token, broker=url, out=out, tls=tls,
                                timeout_s=timeout)
    except ClaimError as exc:
        wait = f" (retry after {exc.retry_after_s}s)" if exc.retry_after_s else ""
        err_console.print(styled(("claim refused", "red"), f": {exc}{wait}"), highlight=False)
        raise typer.Exit(exit_status(exc)) from exc
    console.print(styled("claimed: gateway ", (result.gateway_id, "bold"),
                         f" in {result.elapsed_ms:.0f} ms; identity in {result.identity_dir}; "
                         f"agent config {result.edge_config}"), highlight=False)
    if not run:
        console.print(f"next: careflow edge run --config {result.edge_config}", highlight=False)
        return
    agent = EdgeAgent(load_agent_config(result.edge_config))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: agent.stop())
    console.print(f"running the agent as {result.gateway_id} → {result.broker_url}; Ctrl-C stops",
                  highlight=False)
    agent.run()
