"""`careflow schemas`: check payloads against the published JSON Schema contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from careflow.cli.common import console, styled
from careflow.schemas.published import schema_errors

__all__ = ["schemas_app"]

schemas_app = typer.Typer(help="The event contract (JSON Schema) for integrators.",
                          no_args_is_help=True)


@schemas_app.command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(
        help="JSON files holding one event or an array of events (a batch); - reads stdin.")],
) -> None:
    """Check payloads against contract v1 with jsonschema; exit 1 if any is invalid.

    Example: `careflow schemas validate event.json` or `mosquitto_sub ... | careflow schemas
    validate -`.
    """
    failures = 0
    for path in files:
        name = "stdin" if str(path) == "-" else str(path)
        try:
            text = sys.stdin.read() if name == "stdin" else path.read_text(encoding="utf-8")
            value = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            console.print(styled((f"✗ {name}", "red"), f": cannot read JSON: {exc}"),
                          highlight=False)
            failures += 1
            continue
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            label = f"{name}[{index}]" if isinstance(value, list) else name
            errors = schema_errors(item)
            if errors:
                failures += 1
                console.print(styled((f"✗ {label}", "red")), highlight=False)
                for line in errors:
                    console.print(f"    {line}", highlight=False)
            else:
                console.print(styled((f"✓ {label}", "green")), highlight=False)
    raise typer.Exit(1 if failures else 0)
