"""Alert rules: the YAML files in rules/, loaded and checked with errors that name file and line.

Rules are structured YAML, never code: four kinds, each a small typed model.

* ``absence``   — a source stopped sending: nothing heard for ``grace`` x its declared heartbeat
                  interval (or a fixed ``after``).
* ``threshold`` — a reported value crosses a limit (``battery_pct < 20``) for at least ``for``.
* ``rate``      — more than ``more_than`` events of a ``type`` within ``within``.
* ``event``     — an event fires at once (care alarms: ``type: alert``).

``select`` narrows a rule to sources by shell-style patterns on ``gateway`` and ``device``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from careflow.errors import ConfigError

__all__ = [
    "AbsenceRule",
    "EscalationPolicy",
    "EscalationStep",
    "EventRule",
    "RateRule",
    "Rule",
    "RuleSet",
    "Selector",
    "ThresholdRule",
    "load_rules",
    "parse_duration",
]

_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str | float) -> int:
    """``90s``, ``5m``, ``2h``, ``1d`` (or plain seconds) → milliseconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text * 1000)
    match = _DURATION.match(str(text).strip())
    if match is None:
        msg = f"{text!r} is not a duration such as 30s, 5m, 2h or 1d"
        raise ValueError(msg)
    return int(float(match[1]) * _UNIT_MS[match[2]])


Duration = Annotated[int, BeforeValidator(parse_duration), Field(ge=0)]


class Selector(BaseModel):
    """Which sources a rule watches; patterns are shell-style (``gw-*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    gateway: str = "*"
    device: str = "*"

    def matches(self, gateway: str, device: str) -> bool:
        """Whether a source is watched by this rule."""
        return (self.gateway == "*" or fnmatch.fnmatchcase(gateway, self.gateway)) and (
            self.device == "*" or fnmatch.fnmatchcase(device, self.device))


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    severity: Literal["info", "warning", "critical"] = "warning"
    select: Selector = Selector()
    summary: str = ""
    runbook: str | None = None


class AbsenceRule(_Rule):
    """Nothing heard from a source for too long."""

    kind: Literal["absence"]
    grace: Annotated[float, Field(gt=1)] = 2.0
    after: Duration | None = None  # fixed silence instead of grace x declared interval
    only_gateways: bool = False  # watch gateways themselves (device == gateway) only


class ThresholdRule(_Rule):
    """A reported value crosses a limit, and stays there ``for`` a while."""

    kind: Literal["threshold"]
    field: Annotated[str, Field(min_length=1)]
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float | str
    for_: Duration = Field(default=0, alias="for")


class RateRule(_Rule):
    """Too many events of one type within a window (error bursts)."""

    kind: Literal["rate"]
    type: Literal["heartbeat", "status", "error", "provision", "alert"] = "error"
    more_than: Annotated[int, Field(ge=0)]
    within: Duration


class EventRule(_Rule):
    """An event that is an alert by itself: care alarms."""

    kind: Literal["event"]
    type: Literal["heartbeat", "status", "error", "provision", "alert"] = "alert"
    where: dict[str, str | int | float | bool] = Field(default_factory=dict)
    severity: Literal["info", "warning", "critical"] = "critical"


Rule: TypeAlias = Annotated[AbsenceRule | ThresholdRule | RateRule | EventRule,
                            Field(discriminator="kind")]
_rule_adapter: TypeAdapter[Rule] = TypeAdapter(Rule)


class EscalationStep(BaseModel):
    """``after`` the trigger, if nobody has acknowledged, tell these ``channels``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    after: Duration
    channels: Annotated[tuple[str, ...], Field(min_length=1)]


class EscalationPolicy(BaseModel):
    """The steps an unacknowledged incident of one severity walks (a capped list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    severity: Literal["info", "warning", "critical"]
    steps: Annotated[tuple[EscalationStep, ...], Field(max_length=20)]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules and escalation policies loaded from files, with where each came from."""

    rules: tuple[Rule, ...]
    origins: dict[str, str]  # rule name -> "file:line"
    escalation: dict[str, tuple[EscalationStep, ...]] = field(default_factory=dict)


_SECTIONS = ("rules", "escalation")


def _sections(text: str, path: Path) -> dict[str, list[tuple[Any, int]]]:
    """The ``rules:`` and ``escalation:`` lists of a file, each item with its line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"{path}: not valid YAML: {exc}"
        raise ConfigError(msg) from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - set(_SECTIONS) or not all(
            isinstance(value, list) for value in data.values()):
        msg = f"{path}:1: expected a mapping with `rules:` and/or `escalation:` lists"
        raise ConfigError(msg)
    assert isinstance(node, yaml.MappingNode)
    out: dict[str, list[tuple[Any, int]]] = {}
    for key, value in node.value:
        out[key.value] = [(item, value.value[i].start_mark.line + 1)
                          for i, item in enumerate(data[key.value])]
    return out


def load_rules(paths: Sequence[Path]) -> RuleSet:
    """Load and check every rule file; the first problem stops with ``file:line: what``."""
    rules: list[Rule] = []
    origins: dict[str, str] = {}
    escalation: dict[str, tuple[EscalationStep, ...]] = {}
    files = sorted(p for path in paths for p in (path.glob("*.yaml") if path.is_dir() else [path]))
    for path in files:
        sections = _sections(path.read_text(encoding="utf-8"), path)
        for item, line in sections.get("escalation", []):
            try:
                policy = EscalationPolicy.model_validate(item)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                     for e in exc.errors()[:3])
                msg = f"{path}:{line}: escalation policy: {problems}"
                raise ConfigError(msg) from exc
            escalation[policy.severity] = tuple(sorted(policy.steps, key=lambda s: s.after))
        for item, line in sections.get("rules", []):
            where = f"{path}:{line}"
            name = item.get("name", "?") if isinstance(item, dict) else "?"
            try:
                rule = _rule_adapter.validate_python(item)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['msg']}"
                    for e in exc.errors()[:3])
                msg = f"{where}: rule {name!r}: {problems}"
                raise ConfigError(msg) from exc
            if rule.name in origins:
                msg = f"{where}: rule name {rule.name!r} is already used at {origins[rule.name]}"
                raise ConfigError(msg)
            origins[rule.name] = where
            rules.append(rule)
    return RuleSet(tuple(rules), origins, escalation)
