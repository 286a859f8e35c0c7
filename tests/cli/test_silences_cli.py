"""`careflow silences` as an operator runs them: `--reason`, the word `devices pause` uses too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import careflow_cmd


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    SqliteStore(data / "careflow.db", synchronous="normal").close()
    return data


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_it_takes_a_reason_and_expires_with_json(data_dir: Path) -> None:
    added = cli(data_dir, "silences", "add", "-g", "gw-1", "--for", "1h", "--reason",
                "new batteries", "--json")
    assert added.returncode == 0, added.stderr
    row = json.loads(added.stdout)
    assert row["reason"] == "new batteries" and not added.stderr
    listed = cli(data_dir, "silences", "list")
    assert "reason" in listed.stdout and "new batteries" in listed.stdout
    expired = cli(data_dir, "silences", "expire", str(row["id"]), "--json")
    assert expired.returncode == 0, expired.stderr
    assert json.loads(expired.stdout) == {"id": row["id"], "expired": True}
    again = cli(data_dir, "silences", "expire", str(row["id"]))
    assert again.returncode == 1 and "no active silence" in again.stderr  # refused


def test_the_old_comment_option_still_works_with_a_note(data_dir: Path) -> None:
    done = cli(data_dir, "silences", "add", "-g", "gw-2", "--for", "1h", "-c", "old habit",
               "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reason"] == "old habit"
    assert done.stderr == ("note: `careflow silences add --comment/-c` is deprecated; use "
                           "--reason\n")
    assert "--comment" not in cli(data_dir, "silences", "add", "--help").stdout


def test_a_silence_for_everything_is_a_usage_error(data_dir: Path) -> None:
    done = cli(data_dir, "silences", "add", "--for", "1h")
    assert done.returncode == 2 and "narrow it" in done.stderr
