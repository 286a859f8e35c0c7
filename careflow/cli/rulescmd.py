"""`careflow rules check`: load and validate the alert rules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from careflow.cli.common import ListTable, RulesDirOption, console, styled, use_rules_dir
from careflow.core.errors import ConfigError
from careflow.hub.alerting.incidents import default_rules_dir
from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.ruletests import run_rule_tests

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
