"""One hub per data directory: a second `careflow hub` refuses to start, naming the first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from careflow.hub.datadir_lock import LOCK_NAME, describe_holder
from tests.conftest import careflow_cmd, free_port, wait_until


def hub_env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "CAREFLOW_DATA_DIR": str(data_dir), "CAREFLOW_SQLITE_SYNC": "normal",
            "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}"}


def status_ok(env: dict[str, str]) -> bool:
    done = subprocess.run(careflow_cmd("status"), env=env, capture_output=True, timeout=60,
                          check=False)
    return done.returncode == 0


def test_a_second_hub_on_the_same_data_directory_refuses_to_start_naming_the_first(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first_env = hub_env(data_dir)
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen(careflow_cmd("hub"), env=first_env, stdout=log, stderr=log)
    try:
        wait_until(lambda: status_ok(first_env) or first.poll() is not None, what="first hub")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        # another port, so only the data directory is shared
        second = subprocess.Popen(careflow_cmd("hub"), env=hub_env(data_dir),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _out, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            raise AssertionError("the second hub ran beside the first") from None
        assert second.returncode == 2
        assert f"another hub already runs on the data directory {data_dir}" in err
        assert f"pid {first.pid}" in err and "since" in err and "--data-dir" in err
        assert first.poll() is None and status_ok(first_env)  # the first is undisturbed
        holder = json.loads((data_dir / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0, (tmp_path / "first.log").read_text()

    # the lock goes with the process: after a kill -9 the next hub starts at once
    for _ in range(2):
        proc = subprocess.Popen(careflow_cmd("hub"), env=hub_env(data_dir),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda p=proc: holder_pid(data_dir) == p.pid or p.poll() is not None,
                       what="the lock taken")
            assert proc.poll() is None, "a killed hub's lock kept the next one out"
        finally:
            proc.kill()
            proc.wait(timeout=20)


def holder_pid(data_dir: Path) -> int | None:
    try:
        return int(json.loads((data_dir / LOCK_NAME).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_it_names_the_holder_from_the_lock_file() -> None:
    text = json.dumps({"pid": 42, "host": "care-1", "started": "2026-11-30T07:00:00+00:00",
                       "command": "careflow hub"})
    assert describe_holder(text) == ("pid 42 on care-1, running `careflow hub` since "
                                     "2026-11-30T07:00:00+00:00")
    assert describe_holder("") == "another process (it did not say which)"
    assert describe_holder("[1]") == "another process (it did not say which)"
