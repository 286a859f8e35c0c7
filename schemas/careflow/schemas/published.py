"""The published JSON Schema contract, loaded from the files beside this module.

Integrators validate with these files; careflow uses them in ``careflow schemas validate`` and in the
drift tests that keep the pydantic types honest.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from careflow.schemas.timefmt import is_rfc3339

__all__ = ["SCHEMA_FILES", "event_validator", "load_schema", "schema_errors", "validator"]

SCHEMA_FILES = ("event.json", "heartbeat.json", "status.json", "error.json", "provision.json",
                "alert.json", "state.json")


def load_schema(name: str) -> dict[str, Any]:
    """Read one schema file shipped with careflow."""
    text = resources.files("careflow.schemas").joinpath(name).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def validator(name: str = "event.json") -> Draft202012Validator:
    """A validator for one schema file, with every schema registered and formats checked."""
    schemas = {file: load_schema(file) for file in SCHEMA_FILES}
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    checker = FormatChecker(formats=())
    checker.checks("date-time")(is_rfc3339)
    return Draft202012Validator(schemas[name], registry=registry, format_checker=checker)


def event_validator() -> Draft202012Validator:
    """The validator of the event envelope."""
    return validator("event.json")


def schema_errors(payload: object, schema: str = "event.json") -> list[str]:
    """Every contract violation in ``payload`` as ``path: message`` lines; empty when valid."""
    errors = sorted(validator(schema).iter_errors(payload), key=lambda e: list(e.absolute_path))
    lines = []
    for error in errors:
        path = ".".join(str(part) for part in error.absolute_path) or "(event)"
        lines.append(f"{path}: {error.message}")
    return lines
