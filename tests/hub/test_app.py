"""build_hub, the one place a hub is wired: what it makes, and what it leaves when it fails."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from careflow.core.errors import BrokerError, ConfigError, HubRunningError
from careflow.hub.alerting.notify import load_channels
from careflow.hub.app import build_hub
from tests.conftest import UNREACHABLE_CHANNELS, free_port, make_settings


def test_it_wires_alerting_and_a_sender_only_when_there_are_rules_and_channels(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", f"mqtt://127.0.0.1:{free_port()}")
    hub = build_hub(settings, channels=load_channels(UNREACHABLE_CHANNELS), provisioning=None)
    try:
        assert hub.alerts is not None and hub.service.alerts is hub.alerts  # the shipped rules
        assert hub.sender is not None and hub.alerts.on_queued == hub.sender.wake
        assert hub.broker is None  # a broker is configured
        assert hub.sink is None and hub.deadman is None  # neither is configured
    finally:
        hub.close()
    quiet = build_hub(settings, rules=None, channels=load_channels(UNREACHABLE_CHANNELS),
                      provisioning=None)
    try:
        assert quiet.alerts is None and quiet.sender is None
    finally:
        quiet.close()


def test_it_runs_the_embedded_broker_when_no_broker_is_configured(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", None,
                             CAREFLOW_LISTEN=f"127.0.0.1:{free_port()}")
    hub = build_hub(settings, rules=None, channels={}, provisioning=None)
    try:
        assert hub.broker is not None
    finally:
        hub.close()


def test_it_refuses_a_second_hub_on_one_data_directory_until_the_first_closes(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", f"mqtt://127.0.0.1:{free_port()}")
    first = build_hub(settings, lock="careflow demo", rules=None, channels={},
                      provisioning=None)
    try:
        with pytest.raises(HubRunningError, match="running `careflow demo` since"):
            build_hub(settings, rules=None, channels={}, provisioning=None)
    finally:
        first.close()
    build_hub(settings, rules=None, channels={}, provisioning=None).close()


def test_it_releases_the_data_directory_when_wiring_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("rules:\n  - name: no-kind\n")
    monkeypatch.setenv("CAREFLOW_RULES_DIR", str(rules))
    settings = make_settings(tmp_path / "data", f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        build_hub(settings, channels={}, provisioning=None)
    build_hub(settings, rules=None, channels={}, provisioning=None).close()  # not locked


def test_it_refuses_the_embedded_broker_off_loopback_without_credentials(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", None, CAREFLOW_LISTEN=f"0.0.0.0:{free_port()}")
    with pytest.raises(ConfigError, match="without credentials"):
        build_hub(settings, rules=None, channels={}, provisioning=None)
    build_hub(settings, broker_credentials=None, rules=None, channels={},
              provisioning=None).close()  # as the demo runs it: open to anyone


def test_it_stops_what_started_and_releases_the_data_directory_when_a_part_cannot_start(
        tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(tmp_path / "data", None, CAREFLOW_LISTEN=f"127.0.0.1:{port}")
        hub = build_hub(settings, rules=None, channels={}, provisioning=None)
        with pytest.raises(BrokerError, match="--listen"), hub:
            pytest.fail("the hub started on a port that is taken")
    build_hub(settings, rules=None, channels={}, provisioning=None).close()  # not locked
