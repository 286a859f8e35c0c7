"""`careflow silences`: mute announcements for a maintenance visit (incidents are still kept)."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated, Any

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    RulesDirOption,
    WideOption,
    console,
    iso_ms,
    parse_when,
    print_json_lines,
    use_rules_dir,
)
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import ConfigError, RefusedError
from careflow.hub.alerting.incidents import default_rules
from careflow.hub.alerting.mute import Silence
from careflow.hub.ops.rule_controls import silence_refusal

__all__ = ["silences_app"]

silences_app = typer.Typer(help="Silences: matching incidents are recorded but not announced.",
                           no_args_is_help=True)


def _row(s: Silence) -> dict[str, Any]:
    # "reason", as for pauses; "comment" is its old name, kept for scripts that read it
    return {"id": s.id, "gateway": s.gateway, "device": s.device, "rule": s.rule,
            "starts": iso_ms(s.starts_ms), "ends": iso_ms(s.ends_ms), "created_by": s.created_by,
            "reason": s.comment, "comment": s.comment}


@silences_app.command("add")
def add(
    gateway: Annotated[str, typer.Option("--gateway", "-g", help="Pattern, e.g. gw-0042.")] = "*",
    device: Annotated[str, typer.Option("--device", "-d", help="Pattern.")] = "*",
    rule: Annotated[str, typer.Option("--rule", "-r", help="Pattern, e.g. battery-*.")] = "*",
    duration: Annotated[str, typer.Option("--for", help="How long: 30m, 2h, 1d.")] = "2h",
    reason: Annotated[str, typer.Option(
        "--reason", help="Why (shown to everyone who looks), as for `devices pause`.")] =
        "maintenance",
    comment: Annotated[str | None, typer.Option(
        "--comment", "-c", hidden=True, help="Old name of --reason.")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who [default: login name].")] = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Silence matching incidents from now on. One that covers a critical rule (a care alarm,
    a gateway offline, the hub's own alerts) must name one gateway, without a pattern.

    Example: `careflow silences add -g gw-0042 --for 90m --reason "battery swap by Ola"`.
    """
    if comment is not None:
        sys.stderr.write("note: `careflow silences add --comment/-c` is deprecated; use "
                         "--reason\n")
        reason = comment
    if (gateway, device, rule) == ("*", "*", "*"):
        msg = "a silence for everything would hide care alarms: narrow it with -g, -d or -r"
        raise ConfigError(msg)
    use_rules_dir(rules_dir)
    refusal = silence_refusal(gateway=gateway, rule=rule, severities={
        r.name: r.severity for r in default_rules().rules})
    if refusal is not None:
        raise RefusedError(f"refused: {refusal}")
    now_ms = clock.now_ms()
    ends_ms = 2 * now_ms - parse_when(duration, now_ms=now_ms)
    if ends_ms <= now_ms:
        msg = f"--for {duration!r} must be a positive duration such as 30m or 2h"
        raise ConfigError(msg)
    silence = open_store(data_dir).add_silence(gateway=gateway, device=device, rule=rule,
                                               starts_ms=now_ms, ends_ms=ends_ms,
                                               created_by=by or getpass.getuser(),
                                               comment=reason)
    if as_json:
        print_json_lines([_row(silence)])
    else:
        console.print(f"silence #{silence.id} until {iso_ms(ends_ms)}", highlight=False)


@silences_app.command("list")
def list_silences(
    include_expired: Annotated[bool, typer.Option("--all", help="Expired ones too.")] = False,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Active silences (or all with --all).

    Example: `careflow silences list --all`.
    """
    now_ms = clock.now_ms()
    rows = [_row(s) for s in open_store(data_dir).silences(
        active_at_ms=None if include_expired else now_ms)]
    if as_json:
        print_json_lines(rows)
        return
    table = ListTable("id", "gateway", "device", "rule", "ends (UTC)", "by", "reason",
                      wide={"by"}, text={"reason"}, show_wide=wide)
    for r in rows:
        table.add_row(str(r["id"]), r["gateway"], r["device"], r["rule"],
                      r["ends"][:19].replace("T", " "), r["created_by"], r["reason"])
    console.print(table.table)


@silences_app.command("expire")
def expire(silence_id: Annotated[int, typer.Argument(help="Silence id.")],
           as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """End a silence now; exit 1 if there is no active silence with that id.

    Example: `careflow silences expire 12`.
    """
    if not open_store(data_dir).expire_silence(silence_id, now_ms=clock.now_ms()):
        msg = f"no active silence #{silence_id}; `careflow silences list` shows them"
        raise RefusedError(msg)
    if as_json:
        print_json_lines([{"id": silence_id, "expired": True}])
    else:
        console.print(f"silence #{silence_id} expired", highlight=False)
