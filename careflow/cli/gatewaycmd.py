"""`careflow gateway cmd`: run an allowlisted command on a gateway and print its answer.

Commands run *on* a gateway (run the agent, claim its identity) are `careflow edge ...`, the same
as `careflow-edge ...` of the gateway install.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from careflow.cli.common import console, deprecated_alias, print_json_lines, settings_from
from careflow.core.errors import ConfigError
from careflow.edge import cli as edge_cli
from careflow.edge.commands import ALLOWED
from careflow.hub.ops.gateway import send_command

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
    reply = send_command(settings_from(broker=broker), gateway, name, args, timeout_s=timeout)
    if as_json:
        print_json_lines([reply])
    else:
        console.print_json(json.dumps(reply))
    raise typer.Exit(0 if reply.get("ok") else 1)


# Run on a gateway, so it lives with the gateway's commands (careflow-edge claim, careflow edge
# claim); the old spelling keeps working for scripts and images that have it.
gateway_app.command("claim", hidden=True)(
    deprecated_alias(edge_cli.claim, old="gateway claim", new="edge claim"))
