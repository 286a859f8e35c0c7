"""`careflow hub`: run ingest, with an embedded broker when none is configured."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from careflow.cli.common import (
    DataDirOption,
    RulesDirOption,
    err_console,
    settings_from,
    use_rules_dir,
)
from careflow.core.config import Settings
from careflow.core.log import setup_logging
from careflow.hub.app import build_hub, tune_gc_for_ingest
from careflow.hub.ingest.embedded_broker import is_loopback

__all__ = ["hub"]


def hub(
    broker: Annotated[str | None, typer.Option(
        "--broker", help="Use this broker, e.g. mqtt://mosquitto:1883 [env: CAREFLOW_BROKER_URL]. "
        "Without it the hub runs an embedded broker.", show_default=False)] = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="Address of the embedded broker [env: CAREFLOW_LISTEN; "
        "default: 127.0.0.1:1883]. An address off this machine needs credentials "
        "(CAREFLOW_BROKER_USERNAME, CAREFLOW_BROKER_PASSWORD_FILE).", show_default=False)] = None,
    data_dir: DataDirOption = None,
    rules_dir: RulesDirOption = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")] = "info",
) -> None:
    """Run the hub: validate, deduplicate and store every event, exactly once.

    Messages are acknowledged to the broker only after they are committed to disk, so a crash
    loses nothing. Stop with Ctrl-C (or SIGTERM): the hub finishes what it holds first.

    Examples: `careflow hub` (embedded broker on 127.0.0.1:1883), `careflow hub --broker
    mqtts://broker.example.org:8883` (Mosquitto; TLS files from CAREFLOW_BROKER_CA/CERT/KEY).
    """
    settings = settings_from(data_dir=data_dir, broker=broker, listen=listen)
    use_rules_dir(rules_dir)
    setup_logging(log_level)
    with build_hub(settings) as running:
        if running.sink is None:
            err_console.print("time series are off: set CAREFLOW_INFLUX_URL (and "
                              "CAREFLOW_INFLUX_DB, or CAREFLOW_INFLUX_ORG/BUCKET/TOKEN) to write "
                              "them to InfluxDB", highlight=False)
        if running.sender is None:
            err_console.print("notifications are off: set CAREFLOW_CHANNEL_ONCALL and "
                              "CAREFLOW_CHANNEL_OPS to Apprise URLs to turn them on",
                              highlight=False)
        tune_gc_for_ingest()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: running.stop())
        say_where(settings, embedded=running.broker is not None)
        if running.web is not None:
            err_console.print(f"web console: {running.web.url} (Prometheus: "
                              f"{running.web.url}/metrics)", highlight=False)
            links = running.sender.links if running.sender is not None else None
            if links is not None and not links.reachable:
                err_console.print(
                    f"the one-tap links in messages point at {running.web.url}, which phones "
                    "cannot open: set CAREFLOW_PUBLIC_URL to the address people reach through "
                    "your reverse proxy (docs/oncall-web.md); until then messages also say how "
                    "to acknowledge on the hub", highlight=False)
        running.run()


def say_where(settings: Settings, *, embedded: bool) -> None:
    """The start-up line; a warning when the embedded broker is reachable from the network."""
    where = (f"embedded broker on {settings.listen}" if embedded
             else f"broker {settings.broker_url}")
    if embedded and not is_loopback(settings.listen.host):
        err_console.print(
            f"the embedded broker is reachable from the network on {settings.listen} and "
            f"lets in only user {settings.broker_username!r} with its password; passwords "
            "cross the network in clear: for a fleet, run Mosquitto with TLS (mosquitto/)",
            highlight=False)
    err_console.print(f"careflow hub: {where}, data in {settings.data_dir}; Ctrl-C stops",
                      highlight=False)
