"""`careflow gateway cmd`: run an allowlisted command on a gateway and print its answer.

Commands run *on* a gateway (run the agent, claim its identity) are `careflow edge ...`, the same
as `careflow-edge ...` of the gateway install.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Annotated, Any

import paho.mqtt.client as paho
import typer

from careflow.cli.common import console, deprecated_alias, print_json_lines, settings_from
from careflow.core.errors import BrokerError, ConfigError
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge import cli as edge_cli
from careflow.edge.commands import ALLOWED
from careflow.edge.stamper import new_event_id
from careflow.schemas import command_topic, reply_topic

__all__ = ["gateway_app"]

gateway_app = typer.Typer(help="Talk to a gateway's agent from the hub side.",
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
    as_json: Annotated[bool, typer.Option(
        "--json", help="The reply as one line of JSON, for scripts and agents.")] = False,
) -> None:
    """Send a command and print the gateway's reply as JSON; exit 1 if it refused or failed,
    75 if it did not reply (offline? try again).

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
    if as_json:
        print_json_lines([reply])
    else:
        console.print_json(json.dumps(reply))
    raise typer.Exit(0 if reply.get("ok") else 1)


# Run on a gateway, so it lives with the gateway's commands (careflow-edge claim, careflow edge
# claim); the old spelling keeps working for scripts and images that have it.
gateway_app.command("claim", hidden=True)(
    deprecated_alias(edge_cli.claim, old="gateway claim", new="edge claim"))
