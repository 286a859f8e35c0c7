"""The knowledge base: the MkDocs site builds strictly, and the configuration page names every
``CAREFLOW_*`` variable the code reads.

The variables are found in the source itself (its syntax tree), so a setting added without a
line in the README's configuration table fails here, not in an operator's hands.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
SOURCE_DIRS = ("core", "schemas", "provisioning", "edge", "hub", "careflow")
MKDOCS = Path(sys.executable).parent / "mkdocs"
NAME = re.compile(r"CAREFLOW_[A-Z0-9_<>]+")
READERS = {"get", "getenv", "pop", "read_secret", "setdefault"}


def _name_of(node: ast.expr) -> str | None:
    """A literal ``CAREFLOW_*`` name, or an f-string family as ``CAREFLOW_CHANNEL_<NAME>_X``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(part.value if isinstance(part, ast.Constant) else "<NAME>"
                       for part in node.values)
    else:
        return None
    return text if re.fullmatch(r"CAREFLOW_[A-Z0-9_<>]+", text) else None


def variables_read(source: str) -> set[str]:
    """The ``CAREFLOW_*`` variables a module reads: ``env.get("X")``, ``os.environ["X"]``,
    ``getenv``, ``read_secret(env, "X")``, ``_int_setting(env, "X", ...)`` and typer's
    ``envvar="X"``; an f-string name is a family (``CAREFLOW_CHANNEL_<NAME>``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in READERS or called.endswith("_setting"):
                found.update(n for n in map(_name_of, node.args) if n)
            found.update(n for k in node.keywords if k.arg == "envvar" and (n := _name_of(k.value)))
        elif isinstance(node, ast.Subscript):
            target = node.value
            holder = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if holder in {"environ", "env"} and (n := _name_of(node.slice)):
                found.add(n)
    return found


def code_variables() -> dict[str, str]:
    """Variable → the first file reading it, over every part's source."""
    found: dict[str, str] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part in {"build", ".venv"} or part.endswith(".egg-info") for part in path.parts):
                continue
            for name in variables_read(path.read_text()):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def configuration_table() -> list[str]:
    """The rows of the README's configuration table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def documented(rows: list[str]) -> set[str]:
    """Names in the table; in a first cell, ``/ `_FILE``` adds the suffix to the name before it
    (and to that name less its last word: `` `X_TEMPLATE` / `_LANGUAGE` `` is ``X_LANGUAGE``)."""
    names: set[str] = set()
    for row in rows:
        names.update(NAME.findall(row))
        last = ""
        for token in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if token.startswith("CAREFLOW_"):
                last = token
            elif token.startswith("_") and last:
                names.update({last + token, last.rsplit("_", 1)[0] + token})
    return names


def test_it_finds_the_reads_the_code_has() -> None:
    """The scan itself: each way the code reads a setting is found (or the next test proves
    nothing)."""
    found = variables_read(
        'env.get("CAREFLOW_A")\nos.environ["CAREFLOW_B"]\nread_secret(env, "CAREFLOW_C")\n'
        '_int_setting(env, "CAREFLOW_D", 1)\nOption(envvar="CAREFLOW_E")\n'
        'env.get(f"CAREFLOW_CHANNEL_{name}_TEMPLATE")\nprint("CAREFLOW_NOT_A_READ")\n')
    assert found == {"CAREFLOW_A", "CAREFLOW_B", "CAREFLOW_C", "CAREFLOW_D", "CAREFLOW_E",
                     "CAREFLOW_CHANNEL_<NAME>_TEMPLATE"}
    real = code_variables()
    assert {"CAREFLOW_DATA_DIR", "CAREFLOW_INFLUX_BACKLOG_WARN", "CAREFLOW_RUNBOOK_URL",
            "CAREFLOW_CHANNEL_<NAME>", "CAREFLOW_CHANNEL_<NAME>_TEMPLATE_LINK",
            "CAREFLOW_CLAIM_TOKEN", "CAREFLOW_EDGE_PASSWORD"} <= set(real)


def test_it_documents_every_variable_the_code_reads() -> None:
    names = documented(configuration_table())
    missing = {name: where for name, where in code_variables().items() if name not in names}
    assert not missing, ("add these to the configuration table in README.md (## Configuration): "
                         + ", ".join(f"{name} (read in {where})" for name, where in
                                     sorted(missing.items())))


def test_it_catches_a_variable_missing_from_the_table() -> None:
    rows = [row for row in configuration_table() if "`CAREFLOW_RUNBOOK_URL`" not in row]
    assert "CAREFLOW_RUNBOOK_URL" not in documented(rows)
    assert "CAREFLOW_CHANNEL_<NAME>_LANGUAGE" in documented(configuration_table())


@pytest.mark.slow
def test_it_builds_the_site_strictly_with_the_runbooks_where_notifications_link(
        tmp_path: Path) -> None:
    if not MKDOCS.exists() and shutil.which("mkdocs") is None:
        pytest.fail("mkdocs is missing: pip install -e '.[test]' (it is in the test extra)")
    mkdocs = str(MKDOCS) if MKDOCS.exists() else "mkdocs"
    site = tmp_path / "site"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "careflow" in (site / "index.html").read_text()
    for page in ("docs/system-map", "docs/configuration", "schemas", "grafana",
                 "docs/oncall-web", "docs/influxdb"):
        assert (site / page / "index.html").exists(), page
    # CAREFLOW_RUNBOOK_URL + a rule's runbook path opens the rendered runbook
    paths = {"runbooks/hub-unhealthy.md"}
    for rules in (ROOT / "rules").glob("*.yaml"):
        for rule in (yaml.safe_load(rules.read_text()) or {}).get("rules", []):
            if isinstance(rule, dict) and rule.get("runbook"):
                paths.add(rule["runbook"])
    assert len(paths) >= 5
    for path in paths:
        assert "<h1" in (site / path / "index.html").read_text(), path


def test_it_fails_the_build_on_a_broken_link(tmp_path: Path) -> None:
    """--strict is what makes the build a check: a link to a missing page aborts it."""
    mkdocs = str(MKDOCS) if MKDOCS.exists() else "mkdocs"
    tree = tmp_path / "repo"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "index.md").write_text("# home\n\n[gone](nowhere.md)\n")
    (tree / "mkdocs.yml").write_text("site_name: t\ntheme:\n  name: material\n")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tree, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode != 0
    assert "nowhere.md" in done.stdout + done.stderr
