"""Two hubs with one client id on one broker: they say why, and the newcomer stops fighting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from careflow.cli import EXIT_SESSION_TAKEN
from careflow.hub.ingest.ingress import TAKEOVER_FAST_S, SessionVerdict, TakeoverWatch
from tests.conftest import Mosquitto, careflow_cmd, wait_until


@pytest.mark.parametrize(("lasted", "expected"), [
    # a hub that ran steadily, then is dropped right after every reconnect: it keeps its place
    ([3600.0, 1.0, 1.1, 0.9], [SessionVerdict.LOST] * 2 + [SessionVerdict.FIGHTING] * 2),
    # a hub that never held its session for long: the newcomer
    ([1.0, 1.0, 1.0], [SessionVerdict.LOST, SessionVerdict.LOST, SessionVerdict.YIELD]),
    # a link that drops now and then is only lost
    ([600.0, 2.0, 600.0, 2.0, 600.0], [SessionVerdict.LOST] * 5),
])
def test_it_tells_a_session_taken_over_from_a_lost_link(lasted: list[float],
                                                        expected: list[SessionVerdict]) -> None:
    watch = TakeoverWatch()
    now, verdicts = 0.0, []
    for seconds in lasted:
        now += seconds + 1.0  # paho reconnects after a second
        verdicts.append(watch.dropped(lasted_s=seconds, now=now))
    assert verdicts == expected


def test_quick_drops_spread_over_hours_are_not_a_fight() -> None:
    watch = TakeoverWatch()
    assert [watch.dropped(lasted_s=1.0, now=hour * 3600.0) for hour in range(5)] == [
        SessionVerdict.LOST] * 5


def hub_env(tmp_path: Path, name: str, broker: Mosquitto) -> dict[str, str]:
    return {**os.environ, "CAREFLOW_DATA_DIR": str(tmp_path / name),
            "CAREFLOW_SQLITE_SYNC": "normal", "CAREFLOW_BROKER_URL": broker.url}


def health(env: dict[str, str]) -> dict[str, object] | None:
    done = subprocess.run(careflow_cmd("status", "--json"), env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0:
        return None
    parsed: dict[str, object] = json.loads(done.stdout)
    return parsed


def test_a_second_hub_with_the_same_client_id_stops_with_a_clear_error(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Same broker, same (default) client id, different data directories: before, the two took
    the session from each other every second forever, logging "Unspecified error"."""
    first_env = hub_env(tmp_path, "first", mosquitto)
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:
        first = subprocess.Popen(careflow_cmd("hub"), env=first_env, stdout=log, stderr=log)
    try:
        wait_until(lambda: health(first_env) is not None or first.poll() is not None,
                   what="first hub connected")
        assert first.poll() is None, first_log.read_text()
        started = time.monotonic()
        # the first hub has held its session steadily (longer than a take-over lets it)
        wait_until(lambda: time.monotonic() - started > TAKEOVER_FAST_S + 1,
                   timeout_s=TAKEOVER_FAST_S + 5, what="the first hub's steady session")
        second = subprocess.Popen(careflow_cmd("hub"), env=hub_env(tmp_path, "second", mosquitto),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _out, err = second.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            raise AssertionError("the two hubs went on fighting over one session") from None
        # 3: systemd must not restart it (RestartPreventExitStatus), or it fights every 5 s
        assert second.returncode == EXIT_SESSION_TAKEN == 3
        assert "another client is using the client id 'careflow-hub'" in " ".join(err.split())
        assert "CAREFLOW_HUB_CLIENT_ID" in err
        assert first.poll() is None
        wait_until(lambda: "another client is using the client id" in first_log.read_text(),
                   what="the first hub to name the cause in its log")
        wait_until(lambda: (health(first_env) or {}).get("connected") is True,
                   what="the first hub keeps the session")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0, first_log.read_text()
