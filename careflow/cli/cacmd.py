"""`careflow ca`: create the provisioning CAs, check their expiry, keep the CRL fresh."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from careflow.cli.common import JsonOption, console, err_console, styled
from careflow.provisioning.pki import (
    BROKER_CONF_FILE,
    crl_next_update,
    default_pki_dir,
    init_pki,
    load_pki,
    pki_status,
    resign_crl,
)
from careflow.provisioning.revocation import reload_from_options

__all__ = [
    "BrokerPidFileOption",
    "BrokerPidOption",
    "PkiDirOption",
    "ReloadCommandOption",
    "ca_app",
    "resolve_pki_dir",
]

ca_app = typer.Typer(help="Certificate authorities for provisioning: claim CA, device CA, CRL.",
                     no_args_is_help=True)

PkiDirOption = Annotated[
    Path | None,
    typer.Option("--dir", "--pki-dir", help="The PKI directory [env: CAREFLOW_PKI_DIR; default: "
                 "~/.config/careflow/pki]. Keep it outside any repository.", show_default=False),
]
BrokerPidOption = Annotated[
    int | None, typer.Option("--broker-pid", help="Mosquitto's process id, to SIGHUP it.")]
BrokerPidFileOption = Annotated[
    Path | None, typer.Option("--broker-pidfile", help="Mosquitto's pid_file, to SIGHUP it.")]
ReloadCommandOption = Annotated[
    str | None, typer.Option("--reload-command", help="A command that reloads Mosquitto, e.g. "
                             "'docker kill -s HUP mosquitto' or 'systemctl reload mosquitto'.")]



def resolve_pki_dir(directory: Path | None) -> Path:
    """``--dir`` over ``$CAREFLOW_PKI_DIR`` over ``~/.config/careflow/pki``."""
    return (directory or default_pki_dir()).expanduser()


@ca_app.command("init")
def init(
    directory: PkiDirOption = None,
    broker_host: Annotated[list[str] | None, typer.Option(
        "--broker-host", help="A DNS name or IP gateways use to reach the broker (repeatable); "
        "localhost and 127.0.0.1 are always in the certificate.")] = None,
    import_device_ca: Annotated[tuple[Path, Path] | None, typer.Option(
        "--import-device-ca", help="CERT KEY of an existing device CA to use instead of a new "
        "one.", show_default=False)] = None,
    device_port: Annotated[int, typer.Option(help="The broker's device listener port.")] = 8883,
    claim_port: Annotated[int, typer.Option(help="The broker's claim listener port.")] = 8884,
    bind: Annotated[str, typer.Option(help="The address the broker's listeners bind to.")
                    ] = "0.0.0.0",  # noqa: S104 - gateways connect from the network
    broker_user: Annotated[str | None, typer.Option(
        "--broker-user", help="The user Mosquitto runs as (started as root, it drops to it): "
        "the configuration names it and its group may read the broker's files; the CA keys "
        "stay private [default: mosquitto when run as root and that user exists, else none: "
        "run Mosquitto as yourself].", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Allow a directory inside a git work tree (keys could get committed).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the claim CA, device CA, claim/hub/broker certificates, an empty CRL, and a
    ready-to-run Mosquitto configuration. Safe to re-run: nothing that exists is overwritten.

    Examples:

    `careflow ca init --broker-host broker.example.org`

    `careflow ca init --dir /srv/careflow/pki --import-device-ca device-ca.crt device-ca.key`
    """
    target = resolve_pki_dir(directory)
    broker_user = broker_user or default_broker_user()
    steps = init_pki(target, now=datetime.now(UTC), broker_hosts=broker_host or [],
                     import_device_ca=import_device_ca, force=force, device_port=device_port,
                     claim_port=claim_port, bind=bind, broker_user=broker_user)
    conf = target / BROKER_CONF_FILE
    if as_json:
        sys.stdout.write(json.dumps({
            "dir": str(target), "broker_config": str(conf), "broker_user": broker_user,
            "steps": [{"file": step.path.name, "action": step.action, "what": step.what}
                      for step in steps]}) + "\n")
        return
    table = Table(title=f"PKI in {target}", title_justify="left")
    for column in ("file", "", "what"):
        table.add_column(column)
    styles = {"created": "green", "imported": "green", "written": "green", "granted": "green",
              "kept": "dim", "to do": "yellow"}
    for step in steps:
        table.add_row(step.path.name, styled((step.action, styles.get(step.action, ""))),
                      step.what)
    console.print(table)
    if not any(step.action in ("created", "imported", "written") for step in steps):
        console.print("Everything was already there; nothing was overwritten.")
    who = (f"started as root it drops to user {broker_user}, who can read its files"
           if broker_user else "run it as this user, who can read broker.key; as root, pass "
           "--broker-user")
    todo = "; first do what the table lists as to do" if any(
        step.action == "to do" for step in steps) else ""
    console.print(styled("\n", ("Next", "bold"), "\n"
        f"1. Broker: `mosquitto -c {conf}` (device listener :{device_port}, claim listener "
        f":{claim_port}; {who}{todo}). Under systemd: deploy/ and README in mosquitto/.\n"
        f"2. Hub: CAREFLOW_BROKER_URL=mqtts://BROKER:{device_port} "
        f"CAREFLOW_BROKER_CA={target}/device-ca.crt CAREFLOW_BROKER_CERT={target}/hub.crt "
        f"CAREFLOW_BROKER_KEY={target}/hub.key "
        f"CAREFLOW_HUB_CLIENT_ID=careflow-hub-{secrets.token_hex(8)} careflow hub\n"
        "   (keep that client id to yourself: any broker client that knows it can take over "
        "the hub's session; mosquitto/README.md, 'Known limitation')\n"
        "3. Gateway images: bake in claim.crt, claim.key and device-ca.crt (nothing else).\n"
        "4. Back up claim-ca.key and device-ca.key offline; whoever holds device-ca.key can "
        "mint devices.\n"
        "5. Daily: `careflow ca crl-refresh --broker-pidfile ...` (the CRL expires in 30 days; "
        "an expired CRL locks every device out). Check with `careflow ca status`."))


def default_broker_user() -> str | None:
    """``mosquitto`` when run as root and that user exists: Mosquitto started as root drops to
    it, so it must be able to read the broker's files. Otherwise None (Mosquitto runs as the
    user who started it, the one running this command)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


@ca_app.command("status")
def status(directory: PkiDirOption = None, as_json: JsonOption = False) -> None:
    """Show when the CAs, certificates and the CRL expire; exit 1 if something needs action
    (the CRL's nextUpdate is less than 7 days away, or a certificate expires within 30 days).

    Example: `careflow ca status` or, from cron, `careflow ca status --json`.
    """
    target = resolve_pki_dir(directory)
    report = pki_status(load_pki(target), now=datetime.now(UTC))
    rows, warnings = report["files"], report["warnings"]
    issued, revoked = report["issued"], report["revoked"]
    if as_json:
        sys.stdout.write(json.dumps({"dir": str(target), **report}) + "\n")
    else:
        table = Table(title=f"PKI in {target}", title_justify="left")
        for column in ("file", "expires (UTC)", "days left"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["file"], row["expires"][:16].replace("T", " "), f"{row['days_left']:g}")
        console.print(table)
        console.print(f"{issued} device certificates issued; revoked gateways: "
                      f"{', '.join(revoked) or 'none'}")
        for warning in warnings:
            err_console.print(styled(("warning:", "yellow"), f" {warning}"))
    raise typer.Exit(1 if warnings else 0)


@ca_app.command("crl-refresh")
def crl_refresh(
    directory: PkiDirOption = None,
    days: Annotated[int, typer.Option(min=2, help="Validity of the new CRL.")] = 30,
    broker_pid: BrokerPidOption = None,
    broker_pidfile: BrokerPidFileOption = None,
    reload_command: ReloadCommandOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sign the CRL again with a fresh nextUpdate (same entries) and reload Mosquitto.

    Mosquitto reads the CRL only at start and on SIGHUP, so without a reload option the new
    file waits for the next reload. Run daily from cron or a systemd timer.

    Example: `careflow ca crl-refresh --broker-pidfile /run/mosquitto/mosquitto.pid`
    """
    pki = load_pki(resolve_pki_dir(directory))
    resign_crl(pki, now=datetime.now(UTC), days=days)
    if not as_json:  # said before the reload, which can fail
        console.print(f"CRL re-signed: {pki.crl_path}, next update "
                      f"{crl_next_update(pki):%Y-%m-%d %H:%M} UTC")
    reload = broker_pid is not None or broker_pidfile is not None or bool(reload_command)
    how = reload_from_options(pid=broker_pid, pidfile=broker_pidfile, command=reload_command) \
        if reload else None
    if as_json:
        sys.stdout.write(json.dumps({"crl": str(pki.crl_path),
                                     "next_update": crl_next_update(pki).isoformat(),
                                     "reloaded": how}) + "\n")
        return
    if how is None:
        console.print(styled(("Mosquitto was not reloaded", "yellow"), ": send it a SIGHUP (or "
                             "pass --broker-pid / --broker-pidfile / --reload-command)."))
        return
    console.print(f"Mosquitto reloaded ({how}).")
