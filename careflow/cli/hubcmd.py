"""`careflow hub`: run ingest, with an embedded broker when none is configured."""

from __future__ import annotations

import os
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
from careflow.core.errors import ConfigError
from careflow.core.log import setup_logging
from careflow.hub.alerting.incidents import AlertStage, default_rules
from careflow.hub.alerting.notify import NotificationSender, load_channels
from careflow.hub.alerting.selfwatch import STALL_LIMIT_MS, DeadMansSwitch
from careflow.hub.app import HubService, tune_gc_for_ingest
from careflow.hub.datadir_lock import DataDirLock
from careflow.hub.ingest.embedded_broker import (
    GENERATED_USERNAME,
    BrokerCredentials,
    EmbeddedBroker,
    exposed_without_credentials,
    generate_password_file,
    is_loopback,
)
from careflow.hub.sinks.influx.sink import InfluxSink, sink_for
from careflow.hub.store.adapters import open_store
from careflow.provisioning.service import Provisioning, provisioning_for

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
    credentials = embedded_credentials(settings) if settings.embedded else None
    lock = DataDirLock(settings.data_dir)  # one hub per data directory; says who runs there
    lock.acquire()
    store = open_store(settings)
    embedded = EmbeddedBroker(settings.listen.host, settings.listen.port,
                              credentials=credentials) if settings.embedded else None
    sender: NotificationSender | None = None
    deadman: DeadMansSwitch | None = None
    sink: InfluxSink | None = None
    provisioning: Provisioning | None = None
    try:
        if embedded is not None:
            embedded.start()
        channels = load_channels()
        alerts = AlertStage(store, default_rules(), channels, runbook_url=settings.runbook_url)
        sink = build_sink(settings)
        provisioning = provisioning_for(settings)
        if provisioning is not None:
            provisioning.start()
        # Decoding runs in a second process when there is a second core to run it on.
        service = HubService(settings, store, alerts=alerts, sink=sink,
                             provisioning=provisioning.activation if provisioning else None,
                             decode_worker=(os.cpu_count() or 1) > 1)
        if channels:
            sender = NotificationSender(open_store(settings), channels)  # its own connection
            sender.start()
            alerts.on_queued = sender.wake
        else:
            err_console.print("notifications are off: set CAREFLOW_CHANNEL_ONCALL and "
                              "CAREFLOW_CHANNEL_OPS to Apprise URLs to turn them on",
                              highlight=False)
        if settings.deadman_url:
            # a writer loop that stopped ticking cannot raise alerts about itself: stop the
            # pings too, so the outside service notices
            deadman = DeadMansSwitch(settings.deadman_url, settings.deadman_interval_s,
                                     healthy=lambda: alerts.stalled_ms() < STALL_LIMIT_MS)
            deadman.start()
        tune_gc_for_ingest()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: service.stop())
        say_where(settings, embedded=embedded is not None)
        service.run()
    finally:
        if sink is not None:
            sink.store.close()
        if provisioning is not None:
            provisioning.stop()
        if deadman is not None:
            deadman.stop()
        if sender is not None:
            sender.stop()
        if embedded is not None:
            embedded.stop()
        store.close()
        lock.release()


def build_sink(settings: Settings) -> InfluxSink | None:
    """The InfluxDB sink, or None (and say so once) when it is off."""
    sink = sink_for(settings)
    if sink is None:
        err_console.print("time series are off: set CAREFLOW_INFLUX_URL (and CAREFLOW_INFLUX_DB, "
                          "or CAREFLOW_INFLUX_ORG/BUCKET/TOKEN) to write them to InfluxDB",
                          highlight=False)
    return sink


def embedded_credentials(settings: Settings) -> BrokerCredentials | None:
    """The user the embedded broker demands (CAREFLOW_BROKER_USERNAME and
    CAREFLOW_BROKER_PASSWORD[_FILE]), or None: anyone, which only loopback allows.

    An address off this machine without them is refused, with a password made for it in the
    data directory (0600) and the lines that use it.
    """
    if settings.broker_username and settings.broker_password:
        return BrokerCredentials(settings.broker_username, settings.broker_password)
    if not exposed_without_credentials(settings.listen.host, None):
        return None
    path = generate_password_file(settings.data_dir)
    msg = (f"refusing to run the embedded broker on {settings.listen} without credentials: "
           "anyone who reaches it could publish as any gateway, fake the hub's confirmations "
           "(gateways would delete events no hub stored) and read claim answers. A password "
           f"for it is in {path} (0600). Start the hub with\n"
           f"  CAREFLOW_BROKER_USERNAME={GENERATED_USERNAME} CAREFLOW_BROKER_PASSWORD_FILE={path} "
           f"careflow hub --listen {settings.listen}\n"
           "and give every client the same: CAREFLOW_BROKER_USERNAME and "
           "CAREFLOW_BROKER_PASSWORD_FILE for careflow commands, CAREFLOW_EDGE_USERNAME and "
           "CAREFLOW_EDGE_PASSWORD_FILE for gateways (a copy of the file, kept 0600). Or keep "
           "the default address 127.0.0.1.")
    raise ConfigError(msg)


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
