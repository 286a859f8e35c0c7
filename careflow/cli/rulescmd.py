"""`careflow rules check`: load and validate the alert rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from careflow.cli.common import console, styled
from careflow.hub.rules import load_rules
from careflow.hub.ruletests import run_rule_tests

__all__ = ["rules_app"]

rules_app = typer.Typer(help="Alert rules (YAML files in rules/).", no_args_is_help=True)


@rules_app.command("check")
def check(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Rule files or folders [default: CAREFLOW_RULES_DIR or ./rules].")] = None,
) -> None:
    """Validate rule files; errors name the file, line and problem (exit 2)."""
    targets = paths or [Path(os.environ.get("CAREFLOW_RULES_DIR", "rules"))]
    ruleset = load_rules(targets)
    table = Table("rule", "kind", "severity", "selects", "defined at")
    for rule in ruleset.rules:
        table.add_row(rule.name, rule.kind, rule.severity,
                      f"{rule.select.gateway}/{rule.select.device}", ruleset.origins[rule.name])
    console.print(table)
    console.print(f"{len(ruleset.rules)} rule(s) OK", highlight=False)


@rules_app.command("test")
def run_tests(
    tests: Annotated[list[Path], typer.Argument(help="Test files or folders (YAML `tests:`).")],
    rules: Annotated[list[Path] | None, typer.Option(
        "--rules", help="Rule files or folders [default: CAREFLOW_RULES_DIR or ./rules].")] = None,
) -> None:
    """Run rule unit tests: events and ticks over time in, expected alerts out (exit 1 on a
    failure, listing what was missing and what was unexpected)."""
    ruleset = load_rules(rules or [Path(os.environ.get("CAREFLOW_RULES_DIR", "rules"))])
    results = run_rule_tests(ruleset, tests)
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
