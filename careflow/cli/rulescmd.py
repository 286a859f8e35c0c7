"""`careflow rules check`: load and validate the alert rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from careflow.cli.common import console
from careflow.hub.rules import load_rules

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
