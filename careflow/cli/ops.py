"""Operator commands: events, devices, dead letters, status and replay."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.progress import Progress

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    RulesDirOption,
    WideOption,
    console,
    format_age,
    format_ms,
    iso_ms,
    parse_when,
    print_fields,
    print_json_lines,
    settings_from,
    styled,
    use_rules_dir,
)
from careflow.core import clock
from careflow.core.errors import ConfigError, ContractError, RefusedError
from careflow.edge.publish import publish_events
from careflow.edge.stamper import Stamper, new_boot_id
from careflow.hub.fleet.presence import PresenceRecord, device_state
from careflow.hub.ops.rule_controls import describe
from careflow.hub.ops.status import health_report, is_healthy, rules_quieted
from careflow.hub.replay import OPT_IN, STAGES, replay
from careflow.hub.store import adapters
from careflow.hub.store.interface import Store
from careflow.hub.store.records import EventFilter
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.schemas import EVENT_TYPES, parse_event

__all__ = [
    "deadletter_app",
    "devices_app",
    "events_app",
    "open_store",
    "replay_command",
    "status",
]

events_app = typer.Typer(help="Publish, query and count events.", no_args_is_help=True)
devices_app = typer.Typer(help="Gateways and devices: what each last said, maintenance "
                          "windows, and revoking a gateway (`devices revoke`).",
                          no_args_is_help=True)
deadletter_app = typer.Typer(help="Input the hub refused, with the reason.", no_args_is_help=True)

DEFAULT_DATA: dict[str, dict[str, Any]] = {
    "heartbeat": {"interval_s": 60},
    "status": {"state": "ok"},
    "error": {"code": "E_SYNTHETIC", "message": "synthetic error from careflow events publish"},
    "provision": {"action": "added", "kind": "sensor"},
    "alert": {"kind": "sos", "state": "raised"},
}

GatewayOption = Annotated[str | None, typer.Option("--gateway", "-g", help="Only this gateway.")]
DeviceOption = Annotated[str | None, typer.Option("--device", "-d", help="Only this device.")]
TypeOption = Annotated[str | None, typer.Option("--type", "-t", help="Only this event type.")]
SinceOption = Annotated[str | None, typer.Option(
    "--since", help="Event time from: an age (15m, 2h, 7d) or RFC 3339 time.")]
UntilOption = Annotated[str | None, typer.Option(
    "--until", help="Event time before: an age or RFC 3339 time.")]


def open_store(data_dir: Any) -> Store:  # noqa: ANN401 - Path | None from typer
    """The hub's store in ``data_dir`` (or as configured), which must exist already."""
    settings = settings_from(data_dir=data_dir)
    if not settings.db_path.exists():
        msg = (f"no event store at {settings.db_path}. Start `careflow hub` first, or point "
               "--data-dir / CAREFLOW_DATA_DIR at the hub's data directory.")
        raise ConfigError(msg)
    return adapters.open_store(settings)


def _filter(gateway: str | None, device: str | None, type_: str | None, since: str | None,
            until: str | None) -> EventFilter:
    if type_ is not None and type_ not in EVENT_TYPES:
        msg = f"unknown event type {type_!r}; choose from {', '.join(EVENT_TYPES)}"
        raise ConfigError(msg)
    return EventFilter(gateway=gateway, device=device, type=type_,
                       since_ms=parse_when(since) if since else None,
                       until_ms=parse_when(until) if until else None)


# -- events ----------------------------------------------------------------------------------


@events_app.command("publish")
def publish(
    gateway: Annotated[str, typer.Option("--gateway", "-g", help="Gateway id.")] = "gw-demo",
    device: Annotated[str | None, typer.Option(
        "--device", "-d", help="Device id [default: the gateway itself].")] = None,
    event_type: Annotated[str, typer.Option("--type", "-t", help="Event type.")] = "heartbeat",
    data: Annotated[str | None, typer.Option(
        "--data", help='The data object as JSON, e.g. \'{"interval_s": 60}\' '
        "[default: a minimal valid one for the type].")] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many events.")] = 1,
    batch: Annotated[bool, typer.Option("--batch", help="Send them as one batch message.")] = False,
    boot: Annotated[str | None, typer.Option(
        "--boot", help="Boot id [default: a new one, so seq starts at 1].")] = None,
    seq: Annotated[int, typer.Option("--seq", min=1, help="First seq number.")] = 1,
    broker: Annotated[str | None, typer.Option(
        "--broker", help="mqtt://host:port [env: CAREFLOW_BROKER_URL; default: the embedded "
        "broker at CAREFLOW_LISTEN].", show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Publish synthetic events (QoS 1), checked against the contract first.

    Example: `careflow events publish --type status --data '{"state": "ok", "battery_pct": 15}'`
    """
    if event_type not in EVENT_TYPES:
        msg = f"unknown event type {event_type!r}; choose from {', '.join(EVENT_TYPES)}"
        raise ConfigError(msg)
    try:
        body = json.loads(data) if data is not None else DEFAULT_DATA[event_type]
    except json.JSONDecodeError as exc:
        msg = f"--data is not JSON: {exc}"
        raise ConfigError(msg) from exc
    settings = settings_from(broker=broker)
    stamper = Stamper(gateway=gateway, device=device or gateway, boot=boot or new_boot_id(),
                      next_seq=seq)
    events = [stamper.stamp(event_type, body) for _ in range(count)]
    try:
        parse_event(events[0])
    except ContractError as exc:
        msg = f"this event would be rejected by the hub: {exc}"
        raise ConfigError(msg) from exc
    publish_events(settings.effective_broker_url, events, client_id=f"careflow-cli-{boot or ''}"
                   f"{time.time_ns()}", batch=batch, username=settings.broker_username,
                   password=settings.broker_password, tls=settings.broker_tls)
    if as_json:
        print_json_lines([{"published": count, "type": event_type, "gateway": gateway,
                           "device": device or gateway, "boot": stamper.boot, "first_seq": seq,
                           "last_seq": seq + count - 1,
                           "broker": str(settings.effective_broker_url),
                           "ids": [event["id"] for event in events]}])
        return
    console.print(f"published {count} {event_type} event(s) for {gateway}/{device or gateway} "
                  f"to {settings.effective_broker_url} (boot {stamper.boot}, seq {seq}.."
                  f"{seq + count - 1})", highlight=False)


def _event_row(ev: Any) -> dict[str, Any]:  # noqa: ANN401 - StoredEvent
    row: dict[str, Any] = ev.envelope
    row["received"] = iso_ms(ev.received_ms)
    row["pos"] = ev.pos
    return row


@events_app.command("query")
def query(
    gateway: GatewayOption = None,
    device: DeviceOption = None,
    event_type: TypeOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=1, help="At most this many.")] = 20,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show stored events, newest first (by event time).

    Example: `careflow events query --gateway gw-0042 --type alert --since 2h`.
    """
    store = open_store(data_dir)
    events = store.query(_filter(gateway, device, event_type, since, until), limit=limit)
    if as_json:
        print_json_lines([_event_row(ev) for ev in events])
        return
    table = ListTable("time (UTC)", "gateway", "device", "type", "boot", "seq", "data",
                      wide={"boot", "seq"}, text={"data"}, show_wide=wide)
    for ev in events:
        table.add_row(format_ms(ev.time_ms), ev.gateway, ev.device, ev.type, ev.boot,
                      str(ev.seq), json.dumps(ev.data, separators=(",", ":"))[:60])
    console.print(table.table)
    if not events:
        console.print("no events match; try a wider --since or fewer filters")


@events_app.command("count")
def count_events(
    gateway: GatewayOption = None,
    device: DeviceOption = None,
    event_type: TypeOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print how many stored events match.

    Example: `careflow events count --type heartbeat --since 1d`.
    """
    store = open_store(data_dir)
    typer.echo(store.count(_filter(gateway, device, event_type, since, until)))


# -- devices ---------------------------------------------------------------------------------


def _device_row(rec: Any, presence: dict[str, PresenceRecord],  # noqa: ANN401 - DeviceRecord
                paused: dict[tuple[str, str], tuple[int, str]],
                sites: dict[str, str] | None = None) -> dict[str, Any]:
    window = paused.get((rec.gateway, rec.device)) or paused.get((rec.gateway, "*"))
    state, why = device_state(now_ms=clock.now_ms(), last_seen_ms=rec.last_seen_ms,
                              interval_s=rec.facts.get("interval_s"),
                              presence=presence.get(rec.gateway), paused=window is not None)
    if window is not None:
        why = f"maintenance until {iso_ms(window[0])}: {window[1]}"
    return {
        "gateway": rec.gateway, "device": rec.device, "state": str(state), "state_reason": why,
        "first_seen": iso_ms(rec.first_seen_ms), "last_seen": iso_ms(rec.last_seen_ms),
        "last_type": rec.last_type, "events": rec.events, "boot": rec.boot, "seq": rec.seq,
        "gaps": rec.gaps, "clock_skew_s": round(rec.skew_ms / 1000, 1),
        # a child's own label first, else the site its gateway was provisioned for
        "site": (rec.facts.get("labels") or {}).get("site") or (sites or {}).get(rec.gateway),
        **rec.facts,
    }


def _sites(settings_dir: Any) -> dict[str, str]:  # noqa: ANN401 - Path | None from typer
    """Gateway id → site from the provisioning registry (empty before any registration)."""
    settings = settings_from(data_dir=settings_dir)
    registry = SqliteProvisioningRegistry(settings.db_path,
                                          synchronous=settings.sqlite_synchronous)
    try:
        return {r.gateway_id: r.site for r in registry.records()}
    finally:
        registry.close()


@devices_app.command("list")
def devices_list(
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """List every known gateway and device with when it was last heard from.

    Example: `careflow devices list --gateway gw-0042` (`--wide` for more columns).
    """
    store = open_store(data_dir)
    records = store.devices(gateway=gateway)
    presence = store.presence()
    paused = store.paused(clock.now_ms())
    sites = _sites(data_dir)
    rows = [_device_row(r, presence, paused, sites) for r in records]
    if as_json:
        print_json_lines(rows)
        return
    table = ListTable("gateway", "device", "site", "state", "last seen", "last", "battery",
                      "firmware", "events", "gaps",
                      wide={"site", "last", "firmware", "events"}, show_wide=wide)
    colours = {"online": "green", "late": "yellow", "offline": "red", "paused": "blue"}
    for r, row in zip(records, rows, strict=True):
        battery = r.facts.get("battery_pct")
        state = row["state"]
        table.add_row(r.gateway, r.device, row["site"] or "-",
                      styled((state, colours.get(state, "white"))),
                      format_age(r.last_seen_ms) + " ago", r.last_type,
                      "-" if battery is None else f"{battery:g}%", str(r.facts.get("firmware", "-")),
                      str(r.events), styled((str(r.gaps), "red")) if r.gaps else "0")
    console.print(table.table)
    if not records:
        console.print("no devices yet: they appear with their first event")


@devices_app.command("show")
def devices_show(
    gateway: Annotated[str, typer.Argument(help="Gateway id.")],
    device: Annotated[str | None, typer.Argument(help="Device id [default: the gateway].")] = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Everything the registry knows about one device; exit 1 if it is not known.

    Example: `careflow devices show gw-0042 fall-1`.
    """
    store = open_store(data_dir)
    record = store.device(gateway, device or gateway)
    if record is None:
        msg = (f"no device {gateway}/{device or gateway} in the registry; "
               "`careflow devices list` shows the known ones")
        raise RefusedError(msg)
    row = _device_row(record, store.presence(), store.paused(clock.now_ms()),
                      _sites(data_dir))
    if as_json:
        print_json_lines([row])
        return
    print_fields(row, width=14)
    if abs(record.skew_ms) > 300_000:
        console.print(styled(("clock skew over 5 minutes: check the gateway's NTP", "yellow")))


@devices_app.command("pause")
def devices_pause(
    gateway: Annotated[str, typer.Argument(help="Gateway id.")],
    device: Annotated[str | None, typer.Argument(
        help="Device id [default: the whole gateway and its devices].")] = None,
    duration: Annotated[str, typer.Option(
        "--for", help="How long: 30m, 2h, 1d.")] = "2h",
    reason: Annotated[str, typer.Option("--reason", help="Shown to everyone who looks.")] =
        "maintenance visit",
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Mark a gateway or device as in maintenance: its state reads `paused` until the window ends.

    Example: `careflow devices pause gw-0042 --for 90m --reason "battery swap"`.
    """
    now_ms = clock.now_ms()
    until_ms = 2 * now_ms - parse_when(duration, now_ms=now_ms)  # an age, counted forwards
    if until_ms <= now_ms:
        msg = f"--for {duration!r} must be a positive duration such as 30m or 2h"
        raise ConfigError(msg)
    open_store(data_dir).pause(gateway, device, until_ms=until_ms, reason=reason)
    if as_json:
        print_json_lines([{"gateway": gateway, "device": device, "paused": True,
                           "until": iso_ms(until_ms), "reason": reason}])
        return
    console.print(f"paused {gateway}{'/' + device if device else ' (all devices)'} until "
                  f"{iso_ms(until_ms)}: {reason}", highlight=False)


@devices_app.command("resume")
def devices_resume(
    gateway: Annotated[str, typer.Argument(help="Gateway id.")],
    device: Annotated[str | None, typer.Argument(help="Device id [default: the gateway].")] =
        None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """End a maintenance window early; exit 1 if it is not paused.

    Example: `careflow devices resume gw-0042`.
    """
    if not open_store(data_dir).resume(gateway, device):
        msg = (f"{gateway}{'/' + device if device else ''} is not paused; "
               "`careflow devices list` shows states")
        raise RefusedError(msg)
    if as_json:
        print_json_lines([{"gateway": gateway, "device": device, "paused": False}])
        return
    console.print(f"resumed {gateway}{'/' + device if device else ''}", highlight=False)


# -- dead letters ----------------------------------------------------------------------------


@deadletter_app.command("list")
def deadletter_list(
    code: Annotated[str | None, typer.Option("--code", help="Only this reason code.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=1)] = 20,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show refused input, newest first, with the reason and the raw payload (`--wide`).

    Example: `careflow deadletter list --code schema --limit 5`.
    """
    store = open_store(data_dir)
    letters = store.dead_letters(limit=limit, code=code)
    rows: list[dict[str, Any]] = [{"pos": d.pos, "received": iso_ms(d.received_ms), "topic": d.topic,
             "code": d.code, "reason": d.reason, "batch_index": d.batch_index,
             "payload_size": d.payload_size,
             "payload": d.payload.decode("utf-8", errors="replace")} for d in letters]
    if as_json:
        print_json_lines(rows)
        return
    table = ListTable("received (UTC)", "code", "topic", "reason", "payload", wide={"payload"},
                      text={"topic", "reason", "payload"}, show_wide=wide)
    for row in rows:
        table.add_row(row["received"][:19].replace("T", " "), row["code"], row["topic"], row["reason"],
                      row["payload"][:40])
    console.print(table.table)
    console.print(f"{store.dead_letter_count()} dead letter(s) kept in all", highlight=False)


# -- status and replay -----------------------------------------------------------------------


def status(
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """The hub's health: connected, events/s, queue depth, dead letters, lag, gaps.

    Exits 0 when the hub is running and connected, 1 otherwise (for scripts and runbooks).

    Example: `careflow status` or, from a monitor, `careflow status --json`.
    """
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    report = {("reported" if key == "reported_ms_ago" else key):
              (format_age(now_ms - value, now_ms=now_ms) + " ago" if key == "reported_ms_ago"
               else value) for key, value in health_report(store, now_ms).items()}
    # where it is, resolved as every command does (scripts/check-health.sh checks its disk)
    report["data_dir"] = str(settings_from(data_dir=data_dir).data_dir)
    quieted = rules_quieted(store, now_ms)
    healthy = is_healthy(report)
    if as_json:
        print_json_lines([report])
    else:
        print_fields({k: v for k, v in report.items() if k != "rules_quieted"})
        for control in quieted:
            console.print(styled(("rule quieted", "yellow"), ": ", describe(control),
                                 " (careflow rules list)"), highlight=False)
        if not report["running"]:
            console.print(styled(("the hub is not running", "red"), " (no health report in the "
                                 "last 5 s): start it with `careflow hub`"), highlight=False)
        elif not report.get("connected"):
            console.print(styled(("the hub is running but not connected to its broker", "red"),
                                 ": check the broker and CAREFLOW_BROKER_URL"), highlight=False)
        if report.get("influx_failing_since_ms"):
            console.print(styled(("InfluxDB writes are failing", "yellow"), ": events wait in the "
                                 "log and follow when it is back; check CAREFLOW_INFLUX_URL and "
                                 "the server"), highlight=False)
        if report.get("digests_failing_since_ms"):
            console.print(styled(("status digests cannot be queued", "yellow"), ": none goes out "
                                 "until this is fixed; the hub log says why"), highlight=False)
    raise typer.Exit(0 if healthy else 1)


def replay_command(
    since: SinceOption = None,
    until: UntilOption = None,
    gateway: GatewayOption = None,
    device: DeviceOption = None,
    event_type: TypeOption = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", help=f"Stage to re-run: {', '.join(STAGES)} [default: all but "
        f"{', '.join(sorted(OPT_IN))}, which run only when named].")] = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Re-run stored events, in arrival order, through the downstream stages.

    Examples:

    `careflow replay --target registry` rebuilds the device registry from the event log;
    `careflow replay --target rules --since 2h` shows what the alert rules would have fired
    (a dry run: no incident, no notification); `careflow replay --target influx` rewrites
    InfluxDB from the log (an emptied or new database ends up as if it had never been away).
    """
    use_rules_dir(rules_dir)
    store = open_store(data_dir)
    flt = _filter(gateway, device, event_type, since, until)
    total = store.count(flt)
    with Progress(console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("replaying", total=total)
        report = replay(store, flt, target or [],
                        progress=lambda n: progress.advance(task, n))
    if as_json:
        print_json_lines([{"events": report.events, "stages": list(report.stages),
                           "notes": list(report.notes)}])
        return
    console.print(f"replayed {report.events} event(s) through {', '.join(report.stages)}",
                  highlight=False)
    for line in report.notes:
        console.print(line, highlight=False, soft_wrap=True)
