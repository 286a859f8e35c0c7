"""`careflow rules`: check and test the alert rules; list them with how noisy each was in the
last 24 h; mute a noisy one for a while, or disable it (never a critical one: see
:mod:`careflow.hub.ops.rule_controls`). Every change, and every refusal, is an audit row."""

from __future__ import annotations

import getpass
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    RulesDirOption,
    console,
    iso_ms,
    print_json_lines,
    styled,
    use_rules_dir,
)
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import ConfigError, RefusedError
from careflow.hub.alerting.incidents import default_rules_dir
from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.ruletests import run_rule_tests
from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.ops.rule_controls import (
    describe,
    in_force,
    mute_refusal,
    quiet_refusal,
)
from careflow.hub.store.interface import Store
from careflow.hub.store.records import RuleControl, RuleControlKind

__all__ = ["rules_app"]

rules_app = typer.Typer(help="Alert rules (YAML files; the hub's are in CAREFLOW_RULES_DIR or "
                        "shipped with careflow).", no_args_is_help=True)
_RULES_HELP = "Rule files or folders [default: CAREFLOW_RULES_DIR, else the rules shipped with careflow]."


@rules_app.command("check")
def check(
    paths: Annotated[list[Path] | None, typer.Argument(help=_RULES_HELP)] = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Validate rule files (by default the ones the hub uses); errors name the file, line and
    problem (exit 2).

    Example: `careflow rules check` (the rules `careflow hub` would load: --rules-dir or
    CAREFLOW_RULES_DIR, else the shipped ones) or `careflow rules check my-rules.yaml`.
    """
    use_rules_dir(rules_dir)
    with default_rules_dir() as default:
        ruleset = load_rules(paths or [default])
    table = ListTable("rule", "kind", "severity", "selects", "defined at",
                      text={"selects", "defined at"})
    for rule in ruleset.rules:
        table.add_row(rule.name, rule.kind, rule.severity,
                      f"{rule.select.gateway}/{rule.select.device}", ruleset.origins[rule.name])
    console.print(table.table)
    digests = ruleset.routing.digests
    if digests:
        listed = ListTable("digest", "at", "time zone", "channel", "defined at",
                           text={"defined at"})
        for digest, origin in zip(digests, ruleset.digest_origins, strict=True):
            listed.add_row(digest.key, digest.at, digest.timezone, digest.channel, origin)
        console.print(listed.table)
    console.print(f"{len(ruleset.rules)} rule(s)"
                  + (f", {len(digests)} digest(s)" if digests else "") + " OK", highlight=False)


@rules_app.command("test")
def run_tests(
    tests: Annotated[list[Path] | None, typer.Argument(
        help="Test files or folders (YAML `tests:`) [default: the tests/ folder of the default "
        "rules].")] = None,
    rules: Annotated[list[Path] | None, typer.Option("--rules", help=_RULES_HELP)] = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Run rule unit tests: events and ticks over time in, expected alerts out (exit 1 on a
    failure, listing what was missing and what was unexpected).

    Example: `careflow rules test --rules-dir /etc/careflow/rules` (its rules and their
    tests/) or `careflow rules test my-tests.yaml --rules my-rules.yaml`.
    """
    use_rules_dir(rules_dir)
    with default_rules_dir() as default:
        ruleset = load_rules(rules or [default])
        if not tests and not (default / "tests").is_dir():
            msg = f"no rule tests given, and {default / 'tests'} is not a folder of rule tests"
            raise ConfigError(msg)
        results = run_rule_tests(ruleset, tests or [default / "tests"])
    for result in results:
        mark = ("✓", "green") if result.passed else ("✗", "red")
        console.print(styled(mark, f" {result.name}  ", (str(result.file), "dim")),
                      highlight=False)
        for at, rule, gateway, device, status in result.missing:
            console.print(f"    missing:    {status} {rule} {gateway}/{device} at {at / 1000:g}s",
                          highlight=False)
        for at, rule, gateway, device, status in result.unexpected:
            console.print(f"    unexpected: {status} {rule} {gateway}/{device} at {at / 1000:g}s",
                          highlight=False)
    failed = sum(not r.passed for r in results)
    console.print(f"{len(results) - failed} passed, {failed} failed", highlight=False)
    raise typer.Exit(1 if failed else 0)


_DAY_MS = 86_400_000
_DURATION = re.compile(r"^(\d{1,7})\s*([smhd])$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": _DAY_MS}
ByOption = Annotated[str | None, typer.Option("--by", help="Who [default: login name].")]
ReasonOption = Annotated[str, typer.Option(
    "--reason", help="Why (shown in careflow status and every status digest while in force).")]


def _severities() -> dict[str, str]:
    """The loaded rules' severities (the hub's: --rules-dir, CAREFLOW_RULES_DIR or shipped),
    and the hub's own rules'."""
    with default_rules_dir() as folder:
        ruleset = load_rules([folder])
    return {**SELF_RULES, **{rule.name: rule.severity for rule in ruleset.rules}}


def _control_row(control: RuleControl | None) -> dict[str, Any]:
    if control is None:
        return {"control": None, "until": None, "by": None, "reason": None}
    return {"control": str(control.kind),
            "until": None if control.until_ms is None else iso_ms(control.until_ms),
            "by": control.by, "reason": control.reason}


def _one_line(option: str, text: str) -> str:
    if not text.strip():
        msg = f"give {option}: it is shown to everyone who looks (careflow status, digests)"
        raise ConfigError(msg)
    if any(ch < " " or ch == "\x7f" for ch in text):
        msg = f"{option} must be one visible line"
        raise ConfigError(msg)
    return text


@rules_app.command("list")
def list_rules(as_json: JsonOption = False, data_dir: DataDirOption = None,
               rules_dir: RulesDirOption = None) -> None:
    """The hub's rules with their incidents and notifications over the last 24 h (the noisy
    one stands out) and whether each is muted or disabled, by whom and why.

    Example: `careflow rules list` or `careflow rules list --json`.
    """
    use_rules_dir(rules_dir)
    with default_rules_dir() as folder:
        ruleset = load_rules([folder])
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    activity = store.rule_activity(since_ms=now_ms - _DAY_MS)
    severities = {**SELF_RULES, **{rule.name: rule.severity for rule in ruleset.rules}}
    controls = in_force(store.rule_controls(now_ms=now_ms), severities, now_ms)
    named: list[tuple[str, str, str]] = [(rule.name, rule.kind, rule.severity)
                                         for rule in ruleset.rules]
    named += [(name, "hub", SELF_RULES.get(name, "-")) for name in sorted(activity)
              if name not in {rule.name for rule in ruleset.rules}]
    rows = [{"rule": name, "kind": kind, "severity": severity,
             "incidents_24h": activity.get(name, (0, 0))[0],
             "notifications_24h": activity.get(name, (0, 0))[1],
             "may_quiet": quiet_refusal(name, severities.get(name)) is None,
             **_control_row(controls.quieted(name))} for name, kind, severity in named]
    if as_json:
        print_json_lines(rows)
        return
    table = ListTable("rule", "kind", "severity", "incidents 24h", "notifications 24h",
                      "control", "by", "reason", text={"reason"})
    for row in rows:
        control = row["control"] or ("-" if row["may_quiet"] else "never quieted")
        if row["until"]:
            control += f" until {row['until'][:16].replace('T', ' ')}"
        table.add_row(row["rule"], row["kind"], row["severity"], str(row["incidents_24h"]),
                      str(row["notifications_24h"]), control, row["by"] or "",
                      row["reason"] or "")
    console.print(table.table)


def _quiet(store: Store, rule: str, *, kind: RuleControlKind, until_ms: int | None, by: str,
           reason: str, now_ms: int, refusal: str | None) -> RuleControl:
    """Mute or disable a rule, or refuse to: either way an audit row."""
    verb = "mute" if kind is RuleControlKind.MUTED else "disable"
    if refusal is not None:
        store.append_audit(at_ms=now_ms, actor=by, event=f"rule.{verb}_refused",
                           subject=f"rule {rule}", detail={"reason": reason,
                                                           "refused": refusal})
        raise RefusedError(f"refused: {refusal}")
    with store.atomically(f"{verb} a rule"):  # quieted with its audit row, or not at all
        control = store.set_rule_control(rule, kind=kind, until_ms=until_ms, by=by,
                                         reason=reason, at_ms=now_ms)
        store.append_audit(at_ms=now_ms, actor=by, event=f"rule.{kind}", subject=f"rule {rule}",
                           detail={"reason": reason, **({} if until_ms is None else
                                                        {"until": iso_ms(until_ms)})})
    return control


def _print_control(control: RuleControl, as_json: bool) -> None:
    if as_json:
        print_json_lines([{"rule": control.rule, **_control_row(control)}])
    else:
        until = None if control.until_ms is None else iso_ms(control.until_ms)
        console.print(describe(control, iso=until), highlight=False)


@rules_app.command("mute")
def mute(
    rule: Annotated[str, typer.Argument(help="The rule's name (careflow rules list).")],
    duration: Annotated[str | None, typer.Option(
        "--for", help="How long: 30m, 4h, 2d (at most 7d): a mute must end.")] = None,
    reason: ReasonOption = "",
    by: ByOption = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Mute a noisy rule for a while: its incidents are still recorded, nothing is announced;
    when the mute ends, what is still open is announced. Refused for critical rules (care
    alarms, gateways offline) and the hub's own (exit 1, audited).

    Example: `careflow rules mute battery-low --for 4h --reason "cells swapped on ward 3"`.
    """
    use_rules_dir(rules_dir)
    by = _one_line("--by", by or getpass.getuser())
    reason = _one_line("--reason", reason)
    match = _DURATION.match((duration or "").strip().lower())
    duration_ms = int(match[1]) * _UNIT_MS[match[2]] if match else None
    if duration is not None and match is None:
        msg = f"--for {duration!r}: give a duration such as 30m, 4h or 2d"
        raise ConfigError(msg)
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    if any(c.rule == rule and c.kind is RuleControlKind.DISABLED
           for c in store.rule_controls(now_ms=now_ms)):
        msg = (f"{rule} is disabled (careflow rules list): a mute would evaluate it again; "
               "`careflow rules enable` it first")
        raise RefusedError(msg)
    refusal = quiet_refusal(rule, _severities().get(rule)) or mute_refusal(duration_ms)
    control = _quiet(store, rule, kind=RuleControlKind.MUTED,
                     until_ms=None if duration_ms is None else now_ms + duration_ms, by=by,
                     reason=reason, now_ms=now_ms, refusal=refusal)
    _print_control(control, as_json)


@rules_app.command("disable")
def disable(
    rule: Annotated[str, typer.Argument(help="The rule's name (careflow rules list).")],
    reason: ReasonOption = "",
    by: ByOption = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
    rules_dir: RulesDirOption = None,
) -> None:
    """Stop evaluating a rule until it is enabled: it opens no incident (what it has open
    stays open, unannounced, and resolves when its condition clears). Refused for critical
    rules and the hub's own (exit 1, audited).

    Example: `careflow rules disable error-burst --reason "firmware 2.3 floods errors"`.
    """
    use_rules_dir(rules_dir)
    by = _one_line("--by", by or getpass.getuser())
    reason = _one_line("--reason", reason)
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    control = _quiet(store, rule, kind=RuleControlKind.DISABLED, until_ms=None, by=by,
                     reason=reason, now_ms=now_ms,
                     refusal=quiet_refusal(rule, _severities().get(rule)))
    _print_control(control, as_json)


def _unquiet(rule: str, kind: RuleControlKind, by: str | None, data_dir: Path | None,
             as_json: bool) -> None:
    """Unmute or enable: clear the control if it is of this kind."""
    by = _one_line("--by", by or getpass.getuser())
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    current = next((c for c in store.rule_controls(now_ms=now_ms) if c.rule == rule), None)
    if current is None or current.kind is not kind:
        other = {RuleControlKind.MUTED: "careflow rules unmute",
                 RuleControlKind.DISABLED: "careflow rules enable"}
        msg = (f"{rule} is not {kind}" + ("" if current is None else
                                         f" but {current.kind}: use `{other[current.kind]}`"))
        raise RefusedError(msg)
    event = "rule.unmuted" if kind is RuleControlKind.MUTED else "rule.enabled"
    verb = "unmute" if kind is RuleControlKind.MUTED else "enable"
    with store.atomically(f"{verb} a rule"):  # with its audit row, or not at all
        if kind is RuleControlKind.MUTED:  # ends now: the hub announces what is open, even
            # if it is down at this moment (it finds the ended mute at its start)
            store.set_rule_control(rule, kind=kind, until_ms=now_ms, by=current.by,
                                   reason=current.reason, at_ms=current.at_ms)
        else:
            store.clear_rule_control(rule)
        store.append_audit(at_ms=now_ms, actor=by, event=event, subject=f"rule {rule}",
                           detail={"was": describe(current, iso=None if current.until_ms is None
                                                   else iso_ms(current.until_ms))})
    if as_json:
        print_json_lines([{"rule": rule, **_control_row(None)}])
    else:
        console.print(f"{rule} {event.removeprefix('rule.')}: announced again", highlight=False)


@rules_app.command("unmute")
def unmute(rule: Annotated[str, typer.Argument(help="The rule's name.")], by: ByOption = None,
           as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """End a rule's mute now (exit 1 if it is not muted): what is still open is announced.

    Example: `careflow rules unmute battery-low`.
    """
    _unquiet(rule, RuleControlKind.MUTED, by, data_dir, as_json)


@rules_app.command("enable")
def enable(rule: Annotated[str, typer.Argument(help="The rule's name.")], by: ByOption = None,
           as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """Evaluate a disabled rule again (exit 1 if it is not disabled).

    Example: `careflow rules enable error-burst`.
    """
    _unquiet(rule, RuleControlKind.DISABLED, by, data_dir, as_json)
