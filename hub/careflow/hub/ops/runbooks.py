"""Runbooks for people and for the agent: one Markdown file each, its front matter for the agent.

A runbook (``runbooks/*.md``, package data ``careflow.runbooks``; ``CAREFLOW_RUNBOOKS_DIR``
points at your own) starts with a YAML block between ``---`` lines::

    ---
    id: gateway-offline                 # the file's name without .md
    title: A gateway went offline
    rules: [gateway-offline]            # the alert rules it answers (one runbook per rule)
    read_only: false                    # true: diagnosis and evidence only, never a write
    diagnose:                           # read actions, run before anything is proposed
      - action: gateway.ping
        params: {gateway: "{{incident.gateway}}"}
    actions:                            # what the agent may propose, in order of preference
      - action: gateway.resend
        params: {gateway: "{{incident.gateway}}"}
        why: the agent kept every event on disk; ask for them now it is back
    verify: {check: incident.resolved, params: {incident: "{{incident.id}}"}, within: 10m}
    rollback: []                        # {undo: ACTION} (the registry's rollback) or an action
    escalate: {to: oncall, say: still offline after the action: send a technician}
    ---

then the sections for people: Meaning, Impact, Diagnosis, Mitigation, Verify, Rollback, When to
escalate (``## `` headings, in that order). Templates are ``{{incident.id|rule|gateway|device|
severity}}``; a parameter that is a whole template takes the value's type (an id stays an
integer). :func:`check_runbooks` finds every problem with its file and line (an unknown action,
check or parameter, a bad template, a write in a care alarm's runbook); :func:`load_runbooks`
refuses a folder with any.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from careflow.core.errors import ConfigError
from careflow.hub.ops.actions import CHECKS, REGISTRY, Risk, check_param_problems, param_problems
from careflow.hub.store.records import Incident

__all__ = [
    "CARE_ALARM_RULES",
    "SECTIONS",
    "Escalation",
    "Problem",
    "Runbook",
    "Step",
    "VerifySpec",
    "check_runbooks",
    "default_runbooks_dir",
    "incident_values",
    "load_runbooks",
    "parse_runbook",
    "render",
    "runbook_for",
]

SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation", "Verify", "Rollback",
            "When to escalate")
# A person may need help now: the agent gathers evidence for whoever acts, and never acts itself.
CARE_ALARM_RULES = frozenset({"care-alarm", "refused-care-alarm", "spool-entry-unreadable"})
TEMPLATE_FIELDS = ("id", "rule", "gateway", "device", "severity")
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_WHOLE = re.compile(r"^\{\{\s*([^{}]*?)\s*\}\}$")
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_BYTES = 256 * 1024  # a runbook is a few pages; a larger file is the wrong file
_KEYS = {"id", "title", "rules", "read_only", "diagnose", "actions", "verify", "rollback",
         "escalate"}
# Values that make a template's result checkable before any incident exists.
_SAMPLE: dict[str, Any] = {"id": 1, "rule": "gateway-offline", "gateway": "gw-0001",
                           "device": "fall-1", "severity": "critical"}


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, where: ``file:line: message``."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class Step:
    """One action of a runbook, its parameter templates and why (``undo``: the registry's
    rollback of that action instead of the action itself)."""

    action: str
    params: Mapping[str, Any]
    why: str = ""
    undo: bool = False
    line: int = 0


@dataclass(frozen=True, slots=True)
class VerifySpec:
    """The runbook's check that the incident is handled, and its deadline."""

    check: str
    params: Mapping[str, Any]
    within_s: int
    line: int = 0


@dataclass(frozen=True, slots=True)
class Escalation:
    """Who to tell when the actions did not help, and what."""

    to: str
    say: str


@dataclass(frozen=True, slots=True)
class Runbook:
    """A runbook's front matter, checked; ``path`` is the file."""

    id: str
    title: str
    path: Path
    rules: tuple[str, ...]
    read_only: bool
    diagnose: tuple[Step, ...]
    actions: tuple[Step, ...]
    verify: VerifySpec | None
    rollback: tuple[Step, ...]
    escalate: Escalation
    sections: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The runbook as JSON (``careflow runbooks list --json``)."""

        def steps(items: tuple[Step, ...]) -> list[dict[str, Any]]:
            return [{("undo" if s.undo else "action"): s.action,
                     **({"params": dict(s.params)} if s.params else {}),
                     **({"why": s.why} if s.why else {})} for s in items]

        return {"id": self.id, "title": self.title, "file": self.path.name,
                "rules": list(self.rules), "read_only": self.read_only,
                "diagnose": steps(self.diagnose), "actions": steps(self.actions),
                "verify": None if self.verify is None else {
                    "check": self.verify.check, "params": dict(self.verify.params),
                    "within_s": self.verify.within_s},
                "rollback": steps(self.rollback),
                "escalate": {"to": self.escalate.to, "say": self.escalate.say}}


# -- templates -------------------------------------------------------------------------------


def incident_values(incident: Incident) -> dict[str, Any]:
    """What ``{{incident.FIELD}}`` stands for."""
    return {"id": incident.id, "rule": incident.rule, "gateway": incident.gateway,
            "device": incident.device, "severity": str(incident.severity)}


def _fields(text: str) -> list[str]:
    return _TEMPLATE.findall(text)


def _substitute(value: Any, values: Mapping[str, Any]) -> Any:  # noqa: ANN401 - YAML values
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        if whole:
            return values[whole[1].removeprefix("incident.")]
        return _TEMPLATE.sub(lambda m: str(values[m[1].removeprefix("incident.")]), value)
    if isinstance(value, Mapping):
        return {key: _substitute(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, values) for item in value]
    return value


def render(params: Mapping[str, Any], incident: Incident | Mapping[str, Any]) -> dict[str, Any]:
    """A step's parameters with the incident's values in place of its templates.

    The result still has to pass the action's schema (the registry validates it again before it
    runs), so a device id that came from the field can only be an id.
    """
    values = incident_values(incident) if isinstance(incident, Incident) else dict(incident)
    rendered: dict[str, Any] = _substitute(dict(params), values)
    return rendered


# -- reading front matter with line numbers --------------------------------------------------



def _plain(loader: yaml.SafeLoader, node: yaml.Node, path: tuple[Any, ...],
           lines: dict[tuple[Any, ...], int], offset: int,
           seen: set[int]) -> Any:  # noqa: ANN401 - YAML values
    """The node as plain Python, noting the file line of every value under its key path."""
    if id(node) in seen:  # an alias: a runbook cannot refer to itself or expand a billion times
        raise yaml.constructor.ConstructorError(
            None, None, "anchors and aliases (& and *) are not used in runbooks: spell it out",
            node.start_mark)
    seen.add(id(node))
    lines[path] = node.start_mark.line + offset
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain word, not a list or a mapping",
                    key_node.start_mark)
            out[key] = _plain(loader, value_node, (*path, key), lines, offset, seen)
            lines[(*path, key)] = key_node.start_mark.line + offset
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(loader, item, (*path, index), lines, offset, seen)
                for index, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _front_matter(text: str) -> tuple[str, int, str] | None:
    """(YAML, the file line it starts on, the Markdown after it), or None without a block."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip() != "---":
        return None
    for index in range(1, len(lines)):
        if lines[index].rstrip() == "---":
            return "".join(lines[1:index]), 2, "".join(lines[index + 1:])
    return None


class _Reader:
    """Collects the problems of one file, each at the line of the value it is about."""

    def __init__(self, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
        self.path = path
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, where: tuple[Any, ...]) -> int:
        while where and where not in self.lines:
            where = where[:-1]
        return self.lines.get(where, 1)

    def add(self, where: tuple[Any, ...], message: str) -> None:
        # one line per problem, whatever the file holds (a name quoted from it may hold breaks)
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")
        self.problems.append(Problem(self.path, self.line(where), one_line))


def _duration_s(text: object) -> int | None:
    match = _DURATION.match(str(text)) if isinstance(text, str | int) else None
    return int(match[1]) * _UNIT_S[match[2]] if match else None


def _templates_ok(read: _Reader, where: tuple[Any, ...], value: object) -> bool:
    """Every template names a known field; says where one does not."""
    ok = True
    if isinstance(value, str):
        if value.count("{{") != len(_fields(value)) or value.count("}}") != len(_fields(value)):
            read.add(where, f"a template must look like {{{{incident.gateway}}}}: {value!r}")
            return False
        for name in _fields(value):
            if name.removeprefix("incident.") not in TEMPLATE_FIELDS or \
                    not name.startswith("incident."):
                read.add(where, f"unknown template {{{{{name}}}}}; use incident."
                         f"{'|'.join(TEMPLATE_FIELDS)}")
                ok = False
    elif isinstance(value, Mapping):
        for key, item in value.items():
            ok = _templates_ok(read, (*where, key), item) and ok
    elif isinstance(value, list):
        for index, item in enumerate(value):
            ok = _templates_ok(read, (*where, index), item) and ok
    return ok


def _param_line(read: _Reader, where: tuple[Any, ...], problem: str) -> tuple[Any, ...]:
    """The path of the parameter a schema message is about (``gateway: ...``)."""
    name = problem.partition(":")[0]
    if name != "parameters":
        return (*where, "params", name.split(".")[0])
    quoted = re.search(r"'([^']+)' was unexpected", problem)
    return (*where, "params", quoted[1]) if quoted else (*where, "params")


def _step(read: _Reader, where: tuple[Any, ...], item: object, *, section: str,
          read_only: bool) -> Step | None:
    if not isinstance(item, Mapping):
        read.add(where, f"each {section} entry is a mapping with `action:` and `params:`")
        return None
    undo = section == "rollback" and "undo" in item
    name = item.get("undo" if undo else "action")
    unknown = sorted(set(item) - {"action", "undo", "params", "why"}, key=str)
    if unknown:
        read.add((*where, unknown[0]), f"unknown key {unknown[0]!r} in a {section} entry "
                 "(action, params, why)")
    if not isinstance(name, str) or name not in REGISTRY:
        read.add((*where, "undo" if undo else "action"), f"unknown action {name!r}; the "
                 f"registry has: {', '.join(sorted(REGISTRY))}")
        return None
    action = REGISTRY[name]
    params = item.get("params") or {}
    if not isinstance(params, Mapping):
        read.add((*where, "params"), "params must be a mapping")
        return None
    if undo:
        if action.undo is None:
            read.add((*where, "undo"), f"{name} has no rollback in the registry")
    elif _templates_ok(read, (*where, "params"), params):
        for problem in param_problems(name, render(params, _SAMPLE)):
            read.add(_param_line(read, where, problem), f"{name}: {problem}")
    if section == "diagnose" and action.risk is not Risk.READ:
        read.add((*where, "action"), f"diagnose runs only read actions; {name} is a "
                 f"{action.risk} action (put it under actions:)")
    if read_only and (undo or action.risk is not Risk.READ):
        read.add((*where, "undo" if undo else "action"), f"{name} is a write: this runbook "
                 "is read-only for the agent (a care alarm: diagnosis and evidence only, "
                 "never an action)")
    why = item.get("why", "")
    return Step(name, dict(params), str(why), undo, read.line(where))


def _steps(read: _Reader, data: Mapping[str, Any], section: str,
           read_only: bool) -> tuple[Step, ...]:
    items = data.get(section) or []
    if not isinstance(items, list):
        read.add((section,), f"{section} must be a list")
        return ()
    steps = (_step(read, (section, i), item, section=section, read_only=read_only)
             for i, item in enumerate(items))
    return tuple(step for step in steps if step is not None)


def _verify(read: _Reader, data: Mapping[str, Any]) -> VerifySpec | None:
    spec = data.get("verify")
    if spec is None:
        read.add(("verify",) if "verify" in data else (), "verify: {check, params, within} "
                 "is missing")
        return None
    if not isinstance(spec, Mapping):
        read.add(("verify",), "verify must be a mapping: {check, params, within}")
        return None
    name = spec.get("check")
    params = spec.get("params") or {}
    within = _duration_s(spec.get("within"))
    if within is None:
        read.add(("verify", "within"), f"verify.within must be a duration such as 10m, not "
                 f"{spec.get('within')!r}")
    if not isinstance(name, str) or name not in CHECKS:
        read.add(("verify", "check"), f"unknown check {name!r}; known: "
                 f"{', '.join(sorted(CHECKS))}")
        return None
    if isinstance(params, Mapping) and _templates_ok(read, ("verify", "params"), params):
        for problem in check_param_problems(name, render(params, _SAMPLE)):
            read.add(_param_line(read, ("verify",), problem), f"check {name}: {problem}")
    return VerifySpec(name, dict(params) if isinstance(params, Mapping) else {}, within or 0,
                      read.line(("verify",)))


def _sections(read: _Reader, body: str, body_line: int) -> tuple[str, ...]:
    found = [(index, line[3:].strip()) for index, line in enumerate(body.splitlines())
             if line.startswith("## ")]
    names = tuple(name for _, name in found)
    missing = [name for name in SECTIONS if name not in names]
    if missing:
        read.problems.append(Problem(read.path, body_line, "sections for people missing: "
                                     + ", ".join(f"## {name}" for name in missing)))
    elif tuple(name for name in names if name in SECTIONS) != SECTIONS:
        read.problems.append(Problem(read.path, body_line, "sections for people out of order: "
                                     + " → ".join(SECTIONS)))
    return names


def _read_text(path: Path) -> str | Problem:
    """The file's text, or why it is no runbook (unreadable, binary, far too large)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as exc:
        return Problem(path, 1, f"cannot be read: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        return Problem(path, 1, f"not a text file (UTF-8): {exc.reason} at byte {exc.start}")
    if len(raw) > MAX_BYTES:
        return Problem(path, 1, f"larger than {MAX_BYTES} bytes: a runbook is a few pages (is "
                       "this the right file?)")
    return text


def _parse_yaml(source: str, first_line: int, lines: dict[tuple[Any, ...], int]) -> Any:  # noqa: ANN401
    """The front matter as plain Python, the line of each value noted in ``lines``.

    Raises:
        yaml.YAMLError: not YAML, or YAML a runbook has no use for.
    """
    loader = yaml.SafeLoader(source)
    try:
        node = loader.get_single_node()
        return _plain(loader, node, (), lines, first_line, set()) if node is not None else None
    finally:
        loader.dispose()


def parse_runbook(path: Path) -> tuple[Runbook | None, list[Problem]]:
    """One runbook file: the runbook (None when it cannot be read) and every problem found."""
    text = _read_text(path)
    if isinstance(text, Problem):
        return None, [text]
    split = _front_matter(text)
    if split is None:
        return None, [Problem(path, 1, "no front matter: the file must start with a `---` line, "
                              "the agent's YAML, and a closing `---`")]
    source, first_line, body = split
    lines: dict[tuple[Any, ...], int] = {}
    try:
        data = _parse_yaml(source, first_line, lines)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = first_line + (mark.line if mark is not None else 0)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        return None, [Problem(path, line, f"the front matter is not YAML: {what}")]
    except RecursionError:  # [[[[... or a staircase of keys, past the parser's depth
        return None, [Problem(path, first_line, "the front matter is nested too deeply: a "
                              "runbook's YAML is a few levels deep")]
    read = _Reader(path, lines)
    if not isinstance(data, Mapping):
        read.add((), "the front matter must be a mapping (id, title, rules, diagnose, ...)")
        return None, read.problems
    for key in sorted(set(data) - _KEYS, key=str):
        read.add((key,), f"unknown key {key!r}; a runbook has: {', '.join(sorted(_KEYS))}")
    if data.get("id") != path.stem:
        read.add(("id",), f"id must be the file's name, {path.stem!r}, not {data.get('id')!r}")
    rules = data.get("rules") or []
    if not isinstance(rules, list) or not all(isinstance(rule, str) for rule in rules):
        read.add(("rules",), "rules must be a list of rule names")
        rules = []
    read_only = bool(data.get("read_only")) or bool(CARE_ALARM_RULES & set(rules))
    if CARE_ALARM_RULES & set(rules) and data.get("read_only") is not True:
        read.add(("read_only",), "a runbook answering a care alarm must say read_only: true")
    escalate = data.get("escalate")
    if not isinstance(escalate, Mapping) or not escalate.get("to") or not escalate.get("say"):
        read.add(("escalate",), "escalate: {to: CHANNEL, say: WHAT} is missing")
        escalate = {}
    runbook = Runbook(
        id=path.stem, title=str(data.get("title") or path.stem), path=path,
        rules=tuple(rules), read_only=read_only,
        diagnose=_steps(read, data, "diagnose", read_only),
        actions=_steps(read, data, "actions", read_only),
        verify=_verify(read, data), rollback=_steps(read, data, "rollback", read_only),
        escalate=Escalation(str(escalate.get("to", "")), str(escalate.get("say", ""))),
        sections=_sections(read, body, first_line + source.count("\n") + 1))
    return runbook, read.problems


def check_runbooks(folder: Path, *, known_rules: Iterable[str] | None = None,
                   ) -> tuple[list[Runbook], list[Problem]]:
    """Every runbook in ``folder`` and every problem (empty: all good). With ``known_rules``, a
    runbook answering another rule is a problem too (a typo would leave the rule unanswered)."""
    runbooks: list[Runbook] = []
    problems: list[Problem] = []
    files = sorted(p for p in folder.glob("*.md") if p.name != "README.md")
    if not files:
        problems.append(Problem(folder, 0, "no runbooks (*.md) in this folder"))
    answered: dict[str, Path] = {}
    known = None if known_rules is None else set(known_rules)
    for path in files:
        runbook, found = parse_runbook(path)
        problems.extend(found)
        if runbook is None:
            continue
        runbooks.append(runbook)
        for rule in runbook.rules:
            if rule in answered:
                problems.append(Problem(path, 1, f"rule {rule!r} is answered by "
                                        f"{answered[rule].name} already"))
            answered[rule] = path
            if known is not None and rule not in known:
                problems.append(Problem(path, 1, f"no rule {rule!r} is loaded (typo?)"))
    return runbooks, problems


@contextlib.contextmanager
def default_runbooks_dir() -> Iterator[Path]:
    """CAREFLOW_RUNBOOKS_DIR, else the runbooks shipped with careflow (package data, the same
    from a checkout, a wheel or any working directory)."""
    configured = os.environ.get("CAREFLOW_RUNBOOKS_DIR")
    if configured:
        yield Path(configured)
        return
    with resources.as_file(resources.files("careflow.runbooks")) as folder:
        yield Path(folder)


def load_runbooks(folder: Path | None = None) -> dict[str, Runbook]:
    """The runbooks of ``folder`` (default: :func:`default_runbooks_dir`) by id.

    Raises:
        ConfigError: the folder is missing, or a runbook has a problem (each named with its file
            and line; ``careflow runbooks check`` lists them).
    """
    if folder is None:
        with default_runbooks_dir() as found:
            return load_runbooks(found)
    if not folder.is_dir():
        msg = f"no runbooks folder {folder} (CAREFLOW_RUNBOOKS_DIR)"
        raise ConfigError(msg)
    runbooks, problems = check_runbooks(folder)
    if problems:
        msg = "; ".join(str(p) for p in problems[:5]) + (
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + \
            ". `careflow runbooks check` lists every problem."
        raise ConfigError(msg)
    return {runbook.id: runbook for runbook in runbooks}


def runbook_for(runbooks: Mapping[str, Runbook], rule: str) -> Runbook | None:
    """The runbook answering ``rule``, if any."""
    return next((r for r in runbooks.values() if rule in r.rules), None)
