"""`careflow rules check/test` default to the rules the hub uses, from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import careflow_cmd

SHIPPED = Path(__file__).resolve().parents[2] / "rules"


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")}
    return subprocess.run(careflow_cmd(*args), cwd=cwd, env={**base, "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_it_checks_and_tests_the_shipped_rules_outside_the_checkout(tmp_path: Path) -> None:
    checked = cli(tmp_path, "rules", "check")
    assert checked.returncode == 0, checked.stderr
    assert "gateway-offline" in checked.stdout
    tested = cli(tmp_path, "rules", "test")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert " 0 failed" in tested.stdout


def test_it_uses_careflow_rules_dir_like_the_hub(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(SHIPPED / "default.yaml", own / "mine.yaml")
    checked = cli(tmp_path, "rules", "check", CAREFLOW_RULES_DIR=str(own))
    assert checked.returncode == 0 and "mine.yaml" in checked.stdout, checked.stderr
    untested = cli(tmp_path, "rules", "test", CAREFLOW_RULES_DIR=str(own))
    assert untested.returncode == 2
    assert f"{own / 'tests'} is not a folder of rule tests" in untested.stderr
