"""Alert rules: the YAML files in rules/, loaded and checked with errors that name file and line.

Rules are structured YAML, never code: four kinds, each a small typed model.

* ``absence``   — a source stopped sending: nothing heard for ``grace`` x its declared heartbeat
                  interval (or a fixed ``after``).
* ``threshold`` — a reported value crosses a limit (``battery_pct < 20``) for at least ``for``.
* ``rate``      — more than ``more_than`` events of a ``type`` within ``within``.
* ``event``     — an event fires at once (care alarms: ``type: alert``).

``select`` narrows a rule to sources by shell-style patterns on ``gateway`` and ``device``.

Besides ``rules:``, a file may declare ``escalation:`` policies and (in one file only) a
``routing:`` section: grouping intervals and ordered routes that pick channels and an escalation
policy by severity, rule, site, gateway, device and kind (the decisions are in ``routing.py``),
and ``digests:``, status messages at set times of day (scheduling and text in ``digest.py``).
"""

from __future__ import annotations

import fnmatch
import re
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from careflow.core.errors import ConfigError

__all__ = [
    "AbsenceRule",
    "Digest",
    "EscalationPolicy",
    "EscalationStep",
    "EventRule",
    "RateRule",
    "Route",
    "RouteMatch",
    "Routing",
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
    """The steps an unacknowledged incident walks (a capped list).

    A policy with a ``severity`` (and no ``name``) is the default for that severity; a named one
    is used where a route names it (``routing: routes: - escalation: NAME``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] | None = None
    severity: Literal["info", "warning", "critical"] | None = None
    steps: Annotated[tuple[EscalationStep, ...], Field(max_length=20)]

    @model_validator(mode="after")
    def _named_or_for_a_severity(self) -> EscalationPolicy:
        if (self.name is None) == (self.severity is None):
            msg = "give either `severity:` (the default policy for it) or `name:` (for routes)"
            raise ValueError(msg)
        if self.name == "none":
            msg = "`none` is reserved: a route with `escalation: none` escalates nothing"
            raise ValueError(msg)
        return self

    @property
    def key(self) -> str:
        """How routes and the default lookup find this policy."""
        return self.name or str(self.severity)


ChannelName: TypeAlias = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]


class RouteMatch(BaseModel):
    """Shell-style patterns an incident's labels must all match (``*``: anything)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    severity: str = "*"
    rule: str = "*"
    site: str = "*"
    gateway: str = "*"
    device: str = "*"
    kind: str = "*"

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether every pattern matches its label (an unknown label is the empty string)."""
        return all(pattern == "*" or fnmatch.fnmatchcase(labels.get(name, ""), pattern)
                   for name, pattern in self)


class Route(BaseModel):
    """Where matching incidents are announced, and how they escalate and are grouped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    match: RouteMatch = RouteMatch()
    channels: Annotated[tuple[ChannelName, ...], Field(min_length=1)]
    # a policy key from `escalation:`; None: the policy of the incident's severity; "none": none
    escalation: str | None = None
    group_wait: Duration | None = None
    group_interval: Duration | None = None
    repeat_interval: Duration | None = None


_TIME_OF_DAY = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def _time_of_day(value: object) -> str:
    """``HH:MM`` (24 h), as written; YAML reads an unquoted ``19:00`` as the number 1140."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = f"{value // 60:02d}:{value % 60:02d}" if 0 <= value < 1440 else "07:30"
        msg = (f"YAML reads an unquoted time as a number ({value}): quote it, e.g. "
               f"at: \"{text}\"")
        raise ValueError(msg)
    if not isinstance(value, str) or _TIME_OF_DAY.match(value.strip()) is None:
        msg = f"{value!r} is not a time of day such as \"07:30\" or \"19:00\" (24 h, HH:MM)"
        raise ValueError(msg)
    hour, minute = value.strip().split(":")
    return f"{int(hour):02d}:{minute}"


def _time_zone(value: object) -> str:
    """An IANA time zone the system's zoneinfo knows (``Europe/Berlin``, ``UTC``)."""
    if not isinstance(value, str) or not value.strip():
        msg = "give an IANA time zone such as Europe/Berlin or UTC"
        raise ValueError(msg)
    try:
        zoneinfo.ZoneInfo(value.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        msg = (f"unknown time zone {value!r}: give an IANA name such as Europe/Berlin, "
               "America/New_York or UTC (the tz database; on Debian the tzdata package)")
        raise ValueError(msg) from exc
    return value.strip()


class Digest(BaseModel):
    """A status message (a shift handover) to one channel at a time of day in a time zone:
    open, unacknowledged incidents, offline gateways, low batteries, and what changed since
    the last one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at: Annotated[str, BeforeValidator(_time_of_day)]
    timezone: Annotated[str, BeforeValidator(_time_zone)]
    channel: ChannelName
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] | None = None
    low_battery_pct: Annotated[float, Field(gt=0, le=100)] = 20  # below this: listed as low

    @property
    def key(self) -> str:
        """Its name, by default channel and time (``ops-0700``): it keeps the last one sent."""
        return self.name or f"{self.channel}-{self.at.replace(':', '')}"

    @property
    def hour_minute(self) -> tuple[int, int]:
        """The time of day as numbers."""
        hour, minute = self.at.split(":")
        return int(hour), int(minute)


class Routing(BaseModel):
    """Grouping intervals (Alertmanager's defaults) and the ordered routes; first match wins;
    and the status digests."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    group_wait: Duration = 30_000
    group_interval: Duration = 300_000
    repeat_interval: Duration = 4 * 3_600_000  # 0 turns repeats off
    routes: Annotated[tuple[Route, ...], Field(max_length=200)] = ()
    digests: Annotated[tuple[Digest, ...], Field(max_length=50)] = ()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules, escalation policies and routing loaded from files, with where each came from."""

    rules: tuple[Rule, ...]
    origins: dict[str, str]  # rule name -> "file:line"
    escalation: dict[str, tuple[EscalationStep, ...]] = field(default_factory=dict)
    routing: Routing = field(default_factory=Routing)
    route_origins: tuple[str, ...] = ()  # "file:line" of each route
    digest_origins: tuple[str, ...] = ()  # "file:line" of each digest


_SECTIONS = ("rules", "escalation", "routing")


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
            isinstance(value, dict if key == "routing" else list) for key, value in data.items()):
        msg = (f"{path}:1: expected a mapping with `rules:` and/or `escalation:` lists and "
               "an optional `routing:` mapping")
        raise ConfigError(msg)
    assert isinstance(node, yaml.MappingNode)
    out: dict[str, list[tuple[Any, int]]] = {}
    for key, value in node.value:
        if key.value == "routing":  # one mapping; its routes keep their own lines
            out["routing"] = [(data["routing"], key.start_mark.line + 1)]
            for part in ("routes", "digests"):
                items = next((v for k, v in value.value if k.value == part), None)
                if isinstance(items, yaml.SequenceNode):
                    out[part] = [(None, item.start_mark.line + 1) for item in items.value]
            continue
        out[key.value] = [(item, value.value[i].start_mark.line + 1)
                          for i, item in enumerate(data[key.value])]
    return out


def _problems(exc: ValidationError, skip: int = 0) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'][skip:] or e['loc'])}: {e['msg']}"
                     for e in exc.errors()[:3])


def load_rules(paths: Sequence[Path]) -> RuleSet:
    """Load and check every rule file; the first problem stops with ``file:line: what``."""
    rules: list[Rule] = []
    origins: dict[str, str] = {}
    escalation: dict[str, tuple[EscalationStep, ...]] = {}
    routing, routing_at = Routing(), ""
    route_origins: tuple[str, ...] = ()
    digest_origins: tuple[str, ...] = ()
    files = sorted(p for path in paths for p in (path.glob("*.yaml") if path.is_dir() else [path]))
    for path in files:
        sections = _sections(path.read_text(encoding="utf-8"), path)
        for item, line in sections.get("escalation", []):
            try:
                policy = EscalationPolicy.model_validate(item)
            except ValidationError as exc:
                msg = f"{path}:{line}: escalation policy: {_problems(exc)}"
                raise ConfigError(msg) from exc
            escalation[policy.key] = tuple(sorted(policy.steps, key=lambda s: s.after))
        for item, line in sections.get("routing", []):
            if routing_at:
                msg = f"{path}:{line}: `routing:` is already declared at {routing_at}"
                raise ConfigError(msg)
            try:
                routing = Routing.model_validate(item)
            except ValidationError as exc:
                at = line
                loc = exc.errors()[0]["loc"]
                if len(loc) > 1 and loc[0] in ("routes", "digests") and isinstance(loc[1], int):
                    at = sections[str(loc[0])][loc[1]][1]  # the line of the offending entry
                msg = f"{path}:{at}: routing: {_problems(exc)}"
                raise ConfigError(msg) from exc
            routing_at = f"{path}:{line}"
            route_origins = tuple(f"{path}:{n}" for _, n in sections.get("routes", []))
            digest_origins = tuple(f"{path}:{n}" for _, n in sections.get("digests", []))
            _unique_digests(routing.digests, digest_origins)
        for item, line in sections.get("rules", []):
            where = f"{path}:{line}"
            name = item.get("name", "?") if isinstance(item, dict) else "?"
            try:
                rule = _rule_adapter.validate_python(item)
            except ValidationError as exc:
                msg = f"{where}: rule {name!r}: {_problems(exc, skip=1)}"
                raise ConfigError(msg) from exc
            if rule.name in origins:
                msg = f"{where}: rule name {rule.name!r} is already used at {origins[rule.name]}"
                raise ConfigError(msg)
            origins[rule.name] = where
            rules.append(rule)
    for route, origin in zip(routing.routes, route_origins, strict=True):
        if route.escalation not in (None, "none", *escalation):
            msg = (f"{origin}: route names escalation policy {route.escalation!r}, which no "
                   f"`escalation:` entry declares (known: {', '.join(sorted(escalation)) or 'none'})")
            raise ConfigError(msg)
    return RuleSet(tuple(rules), origins, escalation, routing, route_origins, digest_origins)


def _unique_digests(digests: Sequence[Digest], origins: Sequence[str]) -> None:
    """Each digest keeps its last sending under its name: two of one name would share it."""
    seen: dict[str, str] = {}
    for digest, origin in zip(digests, origins, strict=True):
        if digest.key in seen:
            msg = (f"{origin}: digest {digest.key!r} is already declared at {seen[digest.key]}"
                   + ("" if digest.name else "; give each a `name:`"))
            raise ConfigError(msg)
        seen[digest.key] = origin
