"""`careflow devices revoke`: lock a gateway out for good, including its live connection.

`careflow device revoke`, the old spelling, still works (hidden, with a note on stderr).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from careflow.cli.cacmd import (
    BrokerPidFileOption,
    BrokerPidOption,
    PkiDirOption,
    ReloadCommandOption,
    resolve_pki_dir,
)
from careflow.cli.common import (
    JsonOption,
    console,
    deprecated_alias,
    err_console,
    print_json_lines,
    settings_from,
    styled,
)
from careflow.cli.ops import devices_app
from careflow.core import clock
from careflow.core.config import TlsFiles
from careflow.core.errors import ConfigError
from careflow.provisioning.pki import crl_next_update, load_pki, write_device_acl
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.revocation import (
    agent_client_id,
    reload_from_options,
    revoke_gateway,
    watch_presence,
)

__all__ = ["device_app"]

# The old spelling's group: `careflow device revoke`, hidden (registered in careflow.cli.app).
device_app = typer.Typer(help="Old spelling of `careflow devices revoke`.", no_args_is_help=True)

_RELOAD_SETTLE_S = 0.5  # Mosquitto handles SIGHUP in its main loop, within a few ms


@devices_app.command("revoke")
def revoke(
    gateway: Annotated[str, typer.Argument(help="Gateway id (its certificate's CN).")],
    pki_dir: PkiDirOption = None,
    broker_pid: BrokerPidOption = None,
    broker_pidfile: BrokerPidFileOption = None,
    reload_command: ReloadCommandOption = None,
    no_reload: Annotated[bool, typer.Option(
        "--no-reload", help="Only update the CRL and ACL files (the broker is not running).")
    ] = False,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="mqtts://host:port of the device listener, to end the gateway's live "
        "session [env: CAREFLOW_BROKER_URL].")] = None,
    client_id: Annotated[str | None, typer.Option(
        "--client-id", help="The gateway's MQTT client id [default: careflow-gw-GATEWAY, as the "
        "agent uses].")] = None,
    watch: Annotated[float, typer.Option(
        "--watch", min=0.5, help="Seconds to watch that the gateway does not come back.")] = 3.0,
    as_json: JsonOption = False,
) -> None:
    """Revoke a gateway's current certificate and disconnect it now.

    Steps: put the certificate on the CRL and deny the gateway in the device ACL; SIGHUP
    Mosquitto (it re-reads both); take over the gateway's MQTT session with the hub's certificate,
    which makes Mosquitto close the gateway's connection (a reload alone would leave it
    connected); then watch its presence topic to prove it cannot get back in. Exit 1 if it did.

    The hub's certificate comes from CAREFLOW_BROKER_CERT/_KEY/_CA, or else hub.crt, hub.key and
    device-ca.crt in the PKI directory.

    Examples:

    `careflow devices revoke gw-0042 --broker-pidfile /run/mosquitto/mosquitto.pid --broker mqtts://broker:8883`

    `careflow devices revoke gw-0042 --reload-command 'docker kill -s HUP mosquitto'`

    `careflow devices revoke gw-0042 --no-reload` (files only; the broker reads them at its start)
    """
    settings = settings_from(broker=broker)
    url = settings.broker_url
    if not no_reload:
        if url is None or not url.tls:
            msg = ("to end the gateway's live session, give the broker's device listener: "
                   "--broker mqtts://HOST:8883 (or CAREFLOW_BROKER_URL); or --no-reload")
            raise ConfigError(msg)
        if broker_pid is None and broker_pidfile is None and not reload_command:
            msg = ("say how to reload Mosquitto so it re-reads the CRL and ACL: --broker-pid PID, "
                   "--broker-pidfile FILE or --reload-command 'docker kill -s HUP mosquitto' "
                   "(or --no-reload to only update the files)")
            raise ConfigError(msg)
    say = _quiet if as_json else console.print
    pki = load_pki(resolve_pki_dir(pki_dir))
    issued = revoke_gateway(pki, gateway, now=datetime.now(UTC))
    say(f"Revoked {gateway}: certificate serial {issued.serial:x} and any older "
        f"still-valid ones are on the CRL ({pki.crl_path}, next update "
        f"{crl_next_update(pki):%Y-%m-%d} UTC).")
    result: dict[str, Any] = {
        "gateway": gateway, "serial": f"{issued.serial:x}", "crl": str(pki.crl_path),
        "acl": str(pki.device_acl_path), "registry": _withdraw_in_registry(settings.db_path,
                                                                           gateway, say),
        "reloaded": None, "session": None, "presence_seen": [], "came_back": False}
    if no_reload or url is None:
        write_device_acl(pki)
        say(styled(f"Denied in {pki.device_acl_path}. ",
                   ("The broker was not reloaded", "yellow"),
                   ": until it is (SIGHUP), it still uses the old CRL and ACL, and a "
                   "connected gateway stays connected."))
        _print_result(result, as_json=as_json)
        return
    # Phase 1: the CRL alone, then end the session. The ACL deny waits, because it would also
    # block the gateway's Will, and the hub should see the retained `offline` now.
    how = reload_from_options(pid=broker_pid, pidfile=broker_pidfile, command=reload_command)
    say(f"Mosquitto reloaded ({how}).")
    time.sleep(_RELOAD_SETTLE_S)
    tls = settings.broker_tls if settings.broker_tls.cert else TlsFiles(
        ca=pki.device_ca_path, cert=pki.cert_path("hub"), key=pki.key_path("hub"))
    session = client_id or agent_client_id(gateway)
    states, came_back = watch_presence(url, tls, gateway, client_id=session, watch_s=watch)
    # Phase 2: deny the identity in the ACL too (belt and braces, should the CRL ever be
    # missing from the broker's configuration).
    write_device_acl(pki)
    reload_from_options(pid=broker_pid, pidfile=broker_pidfile, command=reload_command)
    say(f"Denied in {pki.device_acl_path}; Mosquitto reloaded again.")
    result.update(reloaded=how, session=session, presence_seen=list(states),
                  came_back=came_back)
    _print_result(result, as_json=as_json)
    seen = ", ".join(states) or "nothing"
    if came_back:
        err_console.print(
            styled((f"{gateway} reconnected", "red"), f" after its session was ended (presence: "
                   f"{seen}). Check that the broker's crlfile is {pki.crl_path} and that the "
                   "reload reached the broker that gateway uses."))
        raise typer.Exit(1)
    say(f"Session {session} ended; {gateway} did not reconnect within {watch:g}s "
        f"(presence seen: {seen}).")


def _quiet(*_args: object, **_kwargs: object) -> None:
    """Progress lines are left out with --json: stdout is the one JSON object."""


def _print_result(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print_json_lines([result])


device_app.command("revoke", hidden=True)(
    deprecated_alias(revoke, old="device revoke", new="devices revoke"))


def _withdraw_in_registry(db_path: Path, gateway: str, say: Callable[..., None]) -> str:
    """Mark the identity revoked in the hub's provisioning registry, when it is on this machine
    (the CRL is what keeps the gateway out; the registry is what operators read). Returns what
    happened: ``marked``, ``unknown`` (not in the registry) or ``not here``."""
    if not db_path.exists():
        say(styled((f"The hub's database ({db_path}) is not here", "yellow"),
                   ": `careflow provision list` will show the gateway as revoked once "
                   "the hub refuses it; the CRL already does."))
        return "not here"
    registry = SqliteProvisioningRegistry(db_path)
    try:
        if registry.withdraw(gateway, now_ms=clock.now_ms()):
            say("Marked revoked in the provisioning registry.")
            return "marked"
        return "unknown"
    finally:
        registry.close()
