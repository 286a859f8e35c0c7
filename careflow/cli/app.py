"""The full ``careflow`` command tree (typer)."""

from __future__ import annotations

import typer

from careflow.cli import (
    agentcmd,
    cacmd,
    devicecmd,
    gatewaycmd,
    hubcmd,
    incidentscmd,
    mcpcmd,
    notifycmd,
    ops,
    provisioncmd,
    reportcmd,
    rulescmd,
    runbookscmd,
    schemascmd,
    silencescmd,
    simcmd,
    userscmd,
)
from careflow.edge.cli import edge_app

__all__ = ["app"]

app = typer.Typer(
    name="careflow",
    help="Watch, alert on and provision a fleet of care devices over MQTT.\n\n"
    "Start with `careflow hub` (runs an embedded broker when CAREFLOW_BROKER_URL is unset), "
    "then `careflow events publish` and `careflow events query` to see events flow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.command("hub")(hubcmd.hub)
app.command("status")(ops.status)
app.command("replay")(ops.replay_command)
app.command("simulate")(simcmd.simulate)
app.command("demo")(simcmd.demo)
app.command("report")(reportcmd.report)
app.command("mcp")(mcpcmd.mcp)
app.add_typer(ops.events_app, name="events")
app.add_typer(ops.devices_app, name="devices")
app.add_typer(ops.deadletter_app, name="deadletter")
app.add_typer(schemascmd.schemas_app, name="schemas")
app.add_typer(edge_app, name="edge")
app.add_typer(gatewaycmd.gateway_app, name="gateway")
app.add_typer(rulescmd.rules_app, name="rules")
app.add_typer(runbookscmd.runbooks_app, name="runbooks")
app.add_typer(incidentscmd.incidents_app, name="incidents")
app.add_typer(notifycmd.notify_app, name="notify")
app.add_typer(silencescmd.silences_app, name="silences")
app.add_typer(provisioncmd.provision_app, name="provision")
app.add_typer(cacmd.ca_app, name="ca")
app.add_typer(userscmd.users_app, name="users")
app.add_typer(agentcmd.agent_app, name="agent")
app.add_typer(devicecmd.device_app, name="device", hidden=True)  # old: devices revoke
