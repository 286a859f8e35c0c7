"""Rule unit tests in YAML, like promtool's: events and clock ticks over time in, alerts out.

    tests:
      - name: battery low fires after its for-window
        input:
          - at: 0s
            event: {device: door-1, type: status, data: {state: ok, battery_pct: 15}}
          - at: 10m
            tick: true
        expect:
          - {at: 10m, rule: battery-low, device: door-1, status: firing}

``gateway`` defaults to ``gw``; ``device`` defaults to the gateway. Every transition the rules
produce must be expected, and every expected one must happen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from careflow.core.errors import ConfigError
from careflow.hub.alerting.evaluate import Evaluator, Observation
from careflow.hub.alerting.rules import RuleSet, parse_duration

__all__ = ["RuleTestResult", "run_rule_tests"]

Expected = tuple[int, str, str, str, str]  # at, rule, gateway, device, status


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    """One test case: passed, or what was missing and what was unexpected."""

    file: str
    name: str
    missing: tuple[Expected, ...]
    unexpected: tuple[Expected, ...]

    @property
    def passed(self) -> bool:
        """No difference between expected and produced transitions."""
        return not self.missing and not self.unexpected


def _case(ruleset: RuleSet, case: dict[str, Any], where: str) -> tuple[set[Expected],
                                                                         set[Expected]]:
    wanted = set(case.get("rules") or [r.name for r in ruleset.rules])
    unknown = wanted - {r.name for r in ruleset.rules}
    if unknown:
        msg = f"{where}: unknown rule(s) {', '.join(sorted(unknown))}"
        raise ConfigError(msg)
    evaluator = Evaluator(tuple(r for r in ruleset.rules if r.name in wanted))
    produced: set[Expected] = set()
    steps = sorted(case.get("input") or [], key=lambda s: parse_duration(s.get("at", 0)))
    for step in steps:
        at = parse_duration(step.get("at", 0))
        if "event" in step:
            ev = step["event"]
            gateway = ev.get("gateway", "gw")
            event_at = at + parse_duration(ev.get("offset", 0)) if "offset" in ev else at
            transitions = evaluator.observe(Observation(
                gateway, ev.get("device", gateway), ev["type"], event_at, at,
                ev.get("data", {})), at)
        else:
            transitions = evaluator.tick(at)
        produced |= {(t.at_ms, t.rule, t.gateway, t.device, t.status) for t in transitions}
    expected = {(parse_duration(e["at"]), e["rule"], e.get("gateway", "gw"),
                 e.get("device", e.get("gateway", "gw")), e.get("status", "firing"))
                for e in case.get("expect") or []}
    return expected, produced


def run_rule_tests(ruleset: RuleSet, paths: Sequence[Path]) -> list[RuleTestResult]:
    """Run every test case in the given files or folders."""
    results: list[RuleTestResult] = []
    files = sorted(p for path in paths for p in (path.glob("*.yaml") if path.is_dir() else [path]))
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            msg = f"{path}: not valid YAML: {exc}"
            raise ConfigError(msg) from exc
        for index, case in enumerate(data.get("tests") or []):
            name = case.get("name", f"test {index + 1}")
            try:
                expected, produced = _case(ruleset, case, f"{path}: {name}")
            except (KeyError, TypeError, ValueError) as exc:
                msg = f"{path}: {name}: malformed test ({exc})"
                raise ConfigError(msg) from exc
            results.append(RuleTestResult(str(path), name, tuple(sorted(expected - produced)),
                                          tuple(sorted(produced - expected))))
    return results
