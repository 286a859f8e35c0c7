"""`careflow rules check/test` default to the rules the hub uses, from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import careflow_cmd, free_port

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


def test_rules_dir_is_the_same_setting_as_careflow_rules_dir(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(SHIPPED / "default.yaml", own / "mine.yaml")
    by_flag = cli(tmp_path, "rules", "check", "--rules-dir", str(own))
    by_env = cli(tmp_path, "rules", "check", CAREFLOW_RULES_DIR=str(own))
    assert by_flag.returncode == by_env.returncode == 0, by_flag.stderr
    assert "mine.yaml" in by_flag.stdout and by_flag.stdout == by_env.stdout
    # the flag wins over the variable, as every flag does
    flag_wins = cli(tmp_path, "rules", "check", "--rules-dir", str(own),
                    CAREFLOW_RULES_DIR=str(tmp_path / "elsewhere"))
    assert flag_wins.returncode == 0 and "mine.yaml" in flag_wins.stdout, flag_wins.stderr
    untested = cli(tmp_path, "rules", "test", "--rules-dir", str(own))
    assert untested.returncode == 2
    assert f"{own.resolve() / 'tests'} is not a folder of rule tests" in untested.stderr
    missing = cli(tmp_path, "rules", "check", "--rules-dir", str(tmp_path / "none"))
    assert missing.returncode == 2


@pytest.mark.parametrize("command", [("hub",), ("demo",), ("replay",), ("rules", "check"),
                                     ("rules", "test")], ids=" ".join)
def test_every_command_that_loads_the_hubs_rules_takes_rules_dir(command: tuple[str, ...],
                                                                 tmp_path: Path) -> None:
    assert "--rules-dir" in cli(tmp_path, *command, "--help").stdout


def test_the_hub_and_replay_load_the_rules_dir_they_are_given(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "broken.yaml").write_text("rules:\n  - name: broken\n    kind: nonsense\n")
    data = tmp_path / "data"
    data.mkdir()
    SqliteStore(data / "careflow.db", synchronous="normal").close()
    env = {"CAREFLOW_DATA_DIR": str(data), "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}"}
    replayed = cli(tmp_path, "replay", "--target", "rules", "--rules-dir", str(own), **env)
    assert replayed.returncode == 2 and "broken.yaml" in replayed.stderr, replayed.stderr
    hub = cli(tmp_path, "hub", "--rules-dir", str(own), **env)
    assert hub.returncode == 2 and "broken.yaml" in hub.stderr, hub.stderr
