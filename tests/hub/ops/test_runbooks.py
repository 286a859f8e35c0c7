"""Runbook front matter: the shipped runbooks load, and every mistake is named with its file and
line (an unknown action, check or parameter, a bad template, a write in a care alarm's runbook)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from careflow.core.errors import ConfigError
from careflow.hub.ops.actions import REGISTRY, Risk, validate_params
from careflow.hub.ops.runbooks import (
    CARE_ALARM_RULES,
    check_runbooks,
    default_runbooks_dir,
    load_runbooks,
    parse_runbook,
    render,
    runbook_for,
)

SHIPPED = Path(__file__).parents[3] / "runbooks"
BODY = "".join(f"\n## {name}\n\ntext\n" for name in (
    "Meaning", "Impact", "Diagnosis", "Mitigation", "Verify", "Rollback", "When to escalate"))
GOOD = """---
id: {id}
title: A test
rules: [{rule}]
diagnose:
  - action: device.show
    params: {{gateway: "{{{{incident.gateway}}}}"}}
actions:
  - action: gateway.resend
    params: {{gateway: "{{{{incident.gateway}}}}"}}
    why: because
verify: {{check: incident.resolved, params: {{incident: "{{{{incident.id}}}}"}}, within: 10m}}
rollback: []
escalate: {{to: oncall, say: call someone}}
---
# Runbook
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.md"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str, name: str = "rb") -> list[str]:
    write(tmp_path / "rb", name, text)
    return [str(p) for p in check_runbooks(tmp_path / "rb")[1]]


def good(name: str = "rb", rule: str = "gateway-offline") -> str:
    return GOOD.format(id=name, rule=rule) + BODY


def test_the_shipped_runbooks_load_and_answer_each_rule_once() -> None:
    runbooks = load_runbooks(SHIPPED)
    assert set(runbooks) >= {"gateway-offline", "device-silent", "battery-low", "error-burst",
                             "care-alarm", "hub-unhealthy", "certificates-expiring",
                             "provisioning-failed", "clock-skew", "noisy-rule"}
    assert runbook_for(runbooks, "hub-alerts-lagging") == runbooks["hub-unhealthy"]
    assert runbook_for(runbooks, "gateway-offline") == runbooks["gateway-offline"]
    for runbook in runbooks.values():
        assert runbook.verify is not None and runbook.escalate.to and runbook.escalate.say
        assert all(REGISTRY[step.action].risk is Risk.READ for step in runbook.diagnose)


def test_a_care_alarms_runbook_gathers_evidence_and_never_acts() -> None:
    runbooks = load_runbooks(SHIPPED)
    for rule in CARE_ALARM_RULES:
        runbook = runbook_for(runbooks, rule)
        assert runbook is not None and runbook.read_only and runbook.diagnose
        assert runbook.actions == () and runbook.rollback == ()


def test_it_loads_the_shipped_package_data_or_the_configured_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAREFLOW_RUNBOOKS_DIR", raising=False)
    with default_runbooks_dir() as folder:
        assert (folder / "gateway-offline.md").is_file()
    assert "care-alarm" in load_runbooks()
    write(tmp_path / "mine", "only-mine", good("only-mine"))
    monkeypatch.setenv("CAREFLOW_RUNBOOKS_DIR", str(tmp_path / "mine"))
    assert list(load_runbooks()) == ["only-mine"]


def test_it_renders_templates_into_parameters_the_registry_then_checks() -> None:
    runbook = load_runbooks(SHIPPED)["device-silent"]
    incident = {"id": 7, "rule": "device-silent", "gateway": "gw-1", "device": "fall-1",
                "severity": "warning"}
    assert render(runbook.diagnose[0].params, incident) == {"gateway": "gw-1", "device": "fall-1"}
    assert render(runbook.verify.params if runbook.verify else {}, incident) == {"incident": 7}
    assert render({"reason": "noisy: {{incident.rule}} at {{ incident.gateway }}"}, incident) == {
        "reason": "noisy: device-silent at gw-1"}
    # a device id that came from the field is still only an id
    hostile = render(runbook.actions[0].params, {**incident, "gateway": "gw;rm -rf /"})
    with pytest.raises(Exception, match="does not match"):
        validate_params(runbook.actions[0].action, hostile)


@pytest.mark.parametrize(("old", "new", "line", "message"), [
    ("action: gateway.resend", "action: gateway.reboot", 9, "unknown action 'gateway.reboot'"),
    ('params: {gateway: "{{incident.gateway}}"}\n    why',
     'params: {gateway: "{{incident.gateway}}", shell: ls}\n    why', 10,
     "gateway.resend: parameters: Additional properties are not allowed ('shell'"),
    ('    params: {gateway: "{{incident.gateway}}"}\nactions',
     '    params: {gateway: "{{incident.gw}}"}\nactions', 7, "unknown template {{incident.gw}}"),
    ('    params: {gateway: "{{incident.gateway}}"}\nactions',
     '    params: {gateway: "{{incident.gateway}"}\nactions', 7, "a template must look like"),
    ('    params: {gateway: "{{incident.gateway}}"}\nactions',
     '    params: {gateway: "gw;rm -rf /"}\nactions', 7, "device.show: gateway: 'gw;rm -rf /' "
     "does not match"),
    ("action: device.show", "action: devices.pause", 6, "diagnose runs only read actions"),
    ("check: incident.resolved", "check: incident.fixed", 12, "unknown check 'incident.fixed'"),
    ("within: 10m", "within: soon", 12, "verify.within must be a duration"),
    ("rollback: []", "rollback: [{undo: incident.ack}]", 13, "incident.ack has no rollback"),
    ("title: A test", "title: A test\nowner: me", 4, "unknown key 'owner'"),
    ("id: rb", "id: other", 2, "id must be the file's name"),
    ("escalate: {to: oncall, say: call someone}", "", 2, "escalate: {to: CHANNEL, say: WHAT}"),
    ("rules: [gateway-offline]", "rules: [gateway-offline\n", 6, "not YAML"),
])
def test_it_names_the_file_and_line_of_each_mistake(tmp_path: Path, old: str, new: str,
                                                    line: int, message: str) -> None:
    text = good()
    assert old in text
    problems = problems_of(tmp_path, text.replace(old, new, 1))
    path = tmp_path / "rb" / "rb.md"
    assert any(p.startswith(f"{path}:{line}: ") and message in p for p in problems), problems


def test_a_good_runbook_has_no_problem(tmp_path: Path) -> None:
    assert problems_of(tmp_path, good()) == []


def test_it_refuses_a_write_in_a_care_alarms_runbook(tmp_path: Path) -> None:
    text = good(rule="care-alarm").replace("rules: [care-alarm]",
                                           "rules: [care-alarm]\nread_only: true")
    problems = problems_of(tmp_path, text)
    assert any(":10: gateway.resend is a write: this runbook is read-only" in p
               for p in problems), problems
    unflagged = problems_of(tmp_path, good(rule="care-alarm").replace(
        "actions:\n  - action: gateway.resend\n    params: {gateway: \"{{incident.gateway}}\"}\n"
        "    why: because\n", "actions: []\n"))
    assert any("must say read_only: true" in p for p in unflagged), unflagged


def test_it_wants_the_sections_for_people_in_order(tmp_path: Path) -> None:
    no_impact = GOOD.format(id="rb", rule="x") + BODY.replace("## Impact", "## Effect")
    assert any(":16: sections for people missing: ## Impact" in p
               for p in problems_of(tmp_path, no_impact))
    swapped = GOOD.format(id="rb", rule="x") + BODY.replace("## Verify", "## X").replace(
        "## Rollback", "## Verify").replace("## X", "## Rollback")
    assert any("out of order" in p for p in problems_of(tmp_path, swapped))


def test_it_refuses_two_runbooks_for_one_rule_and_a_folder_with_problems(tmp_path: Path) -> None:
    write(tmp_path / "rb", "one", good("one"))
    write(tmp_path / "rb", "two", good("two"))
    _, problems = check_runbooks(tmp_path / "rb")
    assert [str(p) for p in problems] == [
        f"{tmp_path}/rb/two.md:1: rule 'gateway-offline' is answered by one.md already"]
    with pytest.raises(ConfigError, match=r"two\.md:1: .*`careflow runbooks check`"):
        load_runbooks(tmp_path / "rb")
    with pytest.raises(ConfigError, match="no runbooks folder"):
        load_runbooks(tmp_path / "nope")


def test_a_file_without_front_matter_is_a_problem(tmp_path: Path) -> None:
    shutil.copy(SHIPPED / "README.md", tmp_path / "README.md")  # README is not a runbook
    write(tmp_path, "prose", "# Runbook\n\n1. do things\n")
    assert [str(p) for p in check_runbooks(tmp_path)[1]] == [
        f"{tmp_path}/prose.md:1: no front matter: the file must start with a `---` line, "
        "the agent's YAML, and a closing `---`"]
    runbook, _ = parse_runbook(SHIPPED / "gateway-offline.md")
    assert runbook is not None and runbook.sections[:2] == ("Meaning", "Impact")


@settings(max_examples=300, deadline=None)
@example(at=137, cut=0, insert="\n\n")  # a line break inside {{incident.gateway}}: one-line problem
@given(st.integers(0, 900), st.integers(0, 30),
       st.text(alphabet="{}[]:-,'\"\n #&*!|>?%@`ab0.", max_size=12))
def test_a_mangled_runbook_is_problems_never_a_crash(tmp_path_factory: pytest.TempPathFactory,
                                                     at: int, cut: int, insert: str) -> None:
    text = (SHIPPED / "error-burst.md").read_text()
    path = tmp_path_factory.mktemp("fuzz") / "error-burst.md"
    path.write_text(text[:at] + insert + text[at + cut:])
    runbook, problems = parse_runbook(path)
    assert runbook is not None or problems
    assert all(p.line >= 1 and "\n" not in p.message for p in problems)


@pytest.mark.parametrize("front", ["? [a]\n: b", "&a [*a]", "a: &x [1]\nb: *x",
                                   "!!python/object/apply:os.system [ls]", "[1, 2]"])
def test_it_refuses_yaml_a_runbook_has_no_use_for(tmp_path: Path, front: str) -> None:
    problems = problems_of(tmp_path, f"---\n{front}\n---\n" + BODY)
    assert problems and problems[0].startswith(f"{tmp_path}/rb/rb.md:2: ")


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00binary", "rb.md:1: not a text file (UTF-8)"),
    (("---\nid: rb\nrules: " + "[" * 3_000 + "]" * 3_000 + "\n---\n").encode(),
     "rb.md:2: the front matter is nested too deeply"),
    (("---\nid: rb\nx:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 700))
      + "---\n").encode(), "rb.md:2: the front matter is nested too deeply"),
    (b"---\n" + b"# " + b"x" * (1 << 20) + b"\n---\n", "rb.md:1: larger than 262144 bytes"),
])
def test_a_hostile_file_is_a_problem_never_a_crash(tmp_path: Path, content: bytes,
                                                   message: str) -> None:
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "rb.md").write_bytes(content)
    # raised UnicodeDecodeError or RecursionError: `careflow runbooks check` and the hub's
    # start ended in a traceback instead of naming the file
    (problem,) = [str(p) for p in check_runbooks(folder)[1]]
    assert message in problem
    with pytest.raises(ConfigError, match="runbooks check"):
        load_runbooks(folder)
