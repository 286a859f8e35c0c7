"""`careflow rules test`: the shipped rule tests pass, and a wrong expectation is reported."""

from __future__ import annotations

from pathlib import Path

from careflow.hub.alerting.rules import load_rules
from careflow.hub.alerting.ruletests import run_rule_tests

ROOT = Path(__file__).parents[2]


def test_it_passes_the_shipped_rule_tests() -> None:
    results = run_rule_tests(load_rules([ROOT / "rules"]), [ROOT / "rules" / "tests"])
    assert len(results) >= 5
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_it_reports_missing_and_unexpected_alerts(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("""
tests:
  - name: wrong on purpose
    rules: [care-alarm]
    input:
      - at: 0s
        event: {device: fall-1, type: alert, data: {kind: fall, state: raised}}
    expect:
      - {at: 5s, rule: care-alarm, device: fall-1}
""")
    (result,) = run_rule_tests(load_rules([ROOT / "rules"]), [tmp_path / "t.yaml"])
    assert not result.passed
    assert result.missing == ((5000, "care-alarm", "gw", "fall-1", "firing"),)
    assert result.unexpected == ((0, "care-alarm", "gw", "fall-1", "firing"),)
