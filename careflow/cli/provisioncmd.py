"""`careflow provision`: pre-register serials, list them, and watch one come alive."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    WideOption,
    console,
    err_console,
    format_age,
    format_ms,
    iso_ms,
    parse_when,
    print_json_lines,
    settings_from,
    styled,
)
from careflow.core import clock
from careflow.core.config import Settings
from careflow.core.errors import ConfigError, RefusedError
from careflow.provisioning import pki as pki_mod
from careflow.provisioning.claims import (
    ClaimRecord,
    Reject,
    State,
    gateway_id_for,
    hash_token,
    new_token,
)
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.provisioning.service import revoke_pending

__all__ = ["provision_app"]

provision_app = typer.Typer(help="Onboard gateways: register a serial, then watch it claim.",
                            no_args_is_help=True)


def _registry(settings: Settings) -> SqliteProvisioningRegistry:
    return SqliteProvisioningRegistry(settings.db_path, synchronous=settings.sqlite_synchronous)


def _pki_dir(settings: Settings) -> Path | None:
    """CAREFLOW_PKI_DIR, or the embedded hub's demo PKI if it exists."""
    if settings.pki_dir is not None:
        return settings.pki_dir
    default = pki_mod.default_pki_dir({})
    if (default / f"{pki_mod.DEVICE_CA}.crt").exists():
        return default
    demo = settings.data_dir / "demo-pki"
    return demo if demo.is_dir() else None


@provision_app.command("register")
def register(
    serial: Annotated[str, typer.Option("--serial", help="The device's hardware serial.")],
    site: Annotated[str, typer.Option("--site", help="Where it is installed.")],
    gateway_id: Annotated[str | None, typer.Option(
        "--gateway-id", help="Its gateway id [default: gw-<serial lowercased>].")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token works: 30m, 24h, 7d.")]
        = "24h",
    replace: Annotated[bool, typer.Option(
        "--replace", help="Re-provision a serial that has an identity; the old one is revoked.")]
        = False,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Pre-register a serial and print its one-time claim token (shown once, stored hashed).

    Example: `careflow provision register --serial SN-0042 --site berlin-3 --ttl 24h`.
    """
    settings = settings_from(data_dir=data_dir)
    now_ms = clock.now_ms()
    expires_ms = 2 * now_ms - parse_when(ttl, now_ms=now_ms)
    if expires_ms <= now_ms:
        msg = f"--ttl {ttl!r} must be a positive duration such as 30m or 24h"
        raise ConfigError(msg)
    token = new_token()
    gateway = gateway_id or gateway_id_for(serial)
    if gateway.startswith("check-"):  # the shipped rules route check-* away from on-call
        msg = (f"gateway id {gateway!r}: ids starting with check- are reserved for "
               "careflow-check.sh --live, whose incidents never page on-call; choose another "
               "--gateway-id")
        raise ConfigError(msg)
    registry = _registry(settings)
    try:
        decision = registry.register(serial=serial, site=site, gateway_id=gateway,
                                     token_hash=hash_token(token), token_expires_ms=expires_ms,
                                     replace=replace, now_ms=now_ms)
        if isinstance(decision, Reject):
            raise RefusedError(decision.message)
        revocation = "none"
        if decision.revoke_cert_serial:
            pki_dir = _pki_dir(settings)
            if pki_dir is not None:
                revoke_pending(registry, pki_mod.load_pki(pki_dir), now=datetime.now(UTC))
                revocation = (f"old certificate {decision.revoke_cert_serial} revoked on the CRL "
                              "(send the broker SIGHUP to apply it now)")
            else:
                revocation = (f"old certificate {decision.revoke_cert_serial} recorded for "
                              "revocation; no PKI here (CAREFLOW_PKI_DIR), the hub revokes it "
                              "when it next starts")
    finally:
        registry.close()
    row = {"serial": serial, "site": site, "gateway_id": gateway, "token": token,
           "expires": iso_ms(expires_ms), "revocation": revocation}
    if as_json:
        print_json_lines([row])
        return
    console.print(styled("registered ", (serial, "bold"), f" at {site} as ", (gateway, "bold")))
    console.print(styled("claim token (shown once): ", (token, "bold")), highlight=False)
    console.print(f"expires {format_ms(expires_ms)} UTC; revocation: {revocation}",
                  highlight=False)
    console.print(f"on the gateway: careflow-edge claim --serial {serial} --token <token> "
                  "--claim-cert claim.crt --claim-key claim.key --broker mqtts://HUB:8884 "
                  "--out /var/lib/careflow-edge", highlight=False)


def _record_row(r: ClaimRecord) -> dict[str, Any]:
    return {"serial": r.serial, "site": r.site, "gateway_id": r.gateway_id, "state": r.state.value,
            "registered": iso_ms(r.registered_ms),
            "token_expires": iso_ms(r.token_expires_ms) if r.token_expires_ms else None,
            **{name: iso_ms(v) if v else None for name, v in (
                ("claimed", r.claimed_ms), ("issued", r.issued_ms),
                ("connected", r.connected_ms), ("active", r.active_ms),
                ("renewed", r.renewed_ms))},
            "cert_serial": r.cert_serial,
            "cert_not_after": iso_ms(r.cert_not_after_ms) if r.cert_not_after_ms else None,
            "last_error": r.last_error}


@provision_app.command("list")
def list_serials(as_json: JsonOption = False, wide: WideOption = False,
                 data_dir: DataDirOption = None) -> None:
    """Every registered serial with its state, certificate expiry and last error.

    Example: `careflow provision list --json`.
    """
    registry = _registry(settings_from(data_dir=data_dir))
    try:
        records = registry.records()
    finally:
        registry.close()
    if as_json:
        print_json_lines([_record_row(r) for r in records])
        return
    colours = {"active": "green", "issued": "cyan", "claimed": "cyan", "registered": "yellow",
               "revoked": "red"}
    table = ListTable("serial", "site", "gateway", "state", "certificate until", "last error",
                      wide={"site"}, text={"last error"}, show_wide=wide)
    for r in records:
        table.add_row(r.serial, r.site, r.gateway_id,
                      styled((r.state, colours.get(r.state, "white"))),
                      format_ms(r.cert_not_after_ms), r.last_error or "")
    console.print(table.table)
    if not records:
        console.print("nothing registered: `careflow provision register --serial SN --site S`")


@provision_app.command("refusals")
def list_refusals(
    serial: Annotated[str | None, typer.Option("--serial", help="Only those naming it.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=1)] = 30,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Refused claims and renewals, most recent first, counted by who sent them (the client
    id or gateway of the topic), the serial they named and the reason.

    A stranger's attempts are kept here only: they never change a registered serial's state or
    last error. The hub writes them every few seconds and keeps the 10,000 most recent.

    Example: `careflow provision refusals --serial SN-0042`.
    """
    registry = _registry(settings_from(data_dir=data_dir))
    try:
        refusals = registry.refusals(limit=limit, serial=serial)
    finally:
        registry.close()
    if as_json:
        print_json_lines([{"source": r.source, "serial": r.serial, "code": r.code,
                           "count": r.count, "first": iso_ms(r.first_ms),
                           "last": iso_ms(r.last_ms)} for r in refusals])
        return
    table = ListTable("last", "source", "serial", "code", "count", "first (UTC)",
                      text={"source"})
    for r in refusals:
        table.add_row(format_age(r.last_ms) + " ago", r.source, r.serial or "-",
                      r.code, str(r.count), format_ms(r.first_ms))
    console.print(table.table)
    if not refusals:
        console.print("no refused claims or renewals recorded")


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    at_ms: int | None
    hint: str


def _steps(r: ClaimRecord) -> list[_Step]:
    """The onboarding steps of one serial, with what to check when one does not happen."""
    return [
        _Step("registered", r.registered_ms, "register the serial first"),
        _Step("claimed", r.claimed_ms,
              f"the gateway has not claimed yet. On it, run `careflow-edge claim --serial "
              f"{r.serial} --token ...`; check it reaches the claim listener (mqtts://HUB:8884, "
              "with the claim certificate) and that the token has not expired "
              f"({format_ms(r.token_expires_ms)} UTC)."),
        _Step("certificate issued", r.issued_ms,
              "the hub spent the token but did not finish signing: see the hub's log (PKI "
              "directory, disk); the gateway may run its claim again, it reuses its key."),
        _Step("connected", r.connected_ms,
              f"{r.gateway_id} has its certificate but has not come online with it. Check that "
              "`careflow edge run --config OUT/edge.yaml` runs on the gateway, that it reaches "
              "the device listener (mqtts://HUB:8883), and the broker log for TLS errors (CA, "
              "CRL expired, clock)."),
        _Step("first heartbeat", r.active_ms,
              f"{r.gateway_id} is online but no heartbeat of its own is stored yet: check "
              "`careflow deadletter list` and the broker ACL for careflow/v1/"
              f"{r.gateway_id}/#."),
    ]


def _watch_table(r: ClaimRecord, now_ms: int, started_ms: int) -> Table:
    table = Table("step", "", "at (UTC)", "after", title=f"{r.serial} → {r.gateway_id} ({r.site})")
    previous: int | None = None
    waiting_shown = False
    for step in _steps(r):
        if step.at_ms is not None:
            after = "-" if previous is None else f"{(step.at_ms - previous) / 1000:.1f}s"
            table.add_row(step.name, styled(("✓", "green")), format_ms(step.at_ms), after)
            previous = step.at_ms
        elif not waiting_shown:
            since = max(previous or started_ms, started_ms)
            table.add_row(step.name, styled(("…", "yellow")), "waiting",
                          f"{(now_ms - since) / 1000:.0f}s")
            waiting_shown = True
        else:
            table.add_row(styled((step.name, "dim")), "", "", "")
    return table


def _print_refusals_of(settings: Settings, serial: str) -> None:
    """Refused claims naming ``serial`` (a mistyped token leaves no mark on the serial itself)."""
    registry = _registry(settings)
    try:
        refusals = registry.refusals(limit=5, serial=serial)
    finally:
        registry.close()
    for r in refusals:
        err_console.print(f"refused claim naming {serial}: {r.code} x{r.count} from "
                          f"{r.source}, last {format_age(r.last_ms)} ago", highlight=False)


@provision_app.command("watch")
def watch(
    serial: Annotated[str, typer.Argument(help="The serial to watch.")],
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds to wait for the device to become active.")] = 300.0,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show the onboarding steps live until the device is active; exit 1 naming the step that
    did not happen in time, and what to check.

    Example: `careflow provision watch SN-0042 --timeout 120`.
    """
    settings = settings_from(data_dir=data_dir)
    registry = _registry(settings)
    started_ms = clock.now_ms()
    deadline = time.monotonic() + timeout
    try:
        record = registry.get(serial)
        if record is None:
            msg = f"serial {serial} is not registered; `careflow provision list` shows those that are"
            raise RefusedError(msg)
        with Live(_watch_table(record, started_ms, started_ms), console=err_console,
                  refresh_per_second=8, transient=as_json) as live:
            while record.state not in (State.ACTIVE, State.REVOKED) \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
                record = registry.get(serial) or record
                live.update(_watch_table(record, clock.now_ms(), started_ms))
    finally:
        registry.close()
    steps = _steps(record)
    missing = next((s for s in steps if s.at_ms is None), None)
    if as_json:
        print_json_lines([{**_record_row(record), "ok": missing is None,
                           "waiting_for": missing.name if missing else None}])
    if record.state == State.REVOKED:
        err_console.print(styled((f"{serial} is revoked", "red"), ": register it again"),
                          highlight=False)
        raise typer.Exit(1)
    if missing is not None:
        err_console.print(styled((f"timed out after {timeout:g}s waiting for: {missing.name}",
                                  "red")), highlight=False)
        err_console.print(f"check: {missing.hint}", highlight=False)
        if record.last_error:
            err_console.print(f"last error: {record.last_error}", highlight=False)
        _print_refusals_of(settings, serial)
        raise typer.Exit(1)
    total = (record.active_ms or 0) - record.registered_ms
    err_console.print(styled((f"{serial} is active", "green"), f" as {record.gateway_id} "
                             f"({total / 1000:.1f}s after registration)"), highlight=False)
