"""The published JSON Schema contract, loaded from the files beside this module.

Integrators validate with these files; careflow uses them in ``careflow schemas validate`` and in the
drift tests that keep the pydantic models honest.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from careflow.schemas.timefmt import is_rfc3339

__all__ = ["SCHEMA_FILES", "event_validator", "load_schema", "schema_errors"]

SCHEMA_FILES = ("event.json", "heartbeat.json", "status.json", "error.json", "provision.json",
                "alert.json")


def load_schema(name: str) -> dict[str, Any]:
    """Read one schema file shipped with careflow."""
    text = resources.files("careflow.schemas").joinpath(name).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def event_validator() -> Draft202012Validator:
    """A validator for the envelope with every per-type schema registered and formats checked."""
    schemas = [load_schema(name) for name in SCHEMA_FILES]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    checker = FormatChecker(formats=())
    checker.checks("date-time")(is_rfc3339)
    return Draft202012Validator(schemas[0], registry=registry, format_checker=checker)


def schema_errors(payload: object) -> list[str]:
    """Every contract violation in ``payload`` as ``path: message`` lines; empty when valid."""
    errors = sorted(event_validator().iter_errors(payload), key=lambda e: list(e.absolute_path))
    lines = []
    for error in errors:
        path = ".".join(str(part) for part in error.absolute_path) or "(event)"
        lines.append(f"{path}: {error.message}")
    return lines
