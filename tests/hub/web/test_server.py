"""The on-call web's server in the hub: a clear error on a taken port, /healthz and /readyz
against a real Mosquitto that is stopped and started again."""

from __future__ import annotations

import json
import socket
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from careflow.core.config import HostPort, load_settings
from careflow.core.errors import ConfigError
from careflow.hub.web.links import LINK_SECRET_FILE, load_link_key
from careflow.hub.web.server import bind
from tests.conftest import Mosquitto, RunningHub, make_settings, wait_until


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_it_says_which_setting_to_change_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="CAREFLOW_HTTP_LISTEN") as caught:
            bind(HostPort("127.0.0.1", port))
    assert "port is taken" in str(caught.value)


def test_it_listens_on_8080_on_loopback_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert load_settings({}, data_dir=tmp_path).http_listen == HostPort("127.0.0.1", 8080)
    off = load_settings({"CAREFLOW_HTTP_LISTEN": "off"}, data_dir=tmp_path)
    assert off.http_listen is None
    assert off.web_url is None
    with pytest.raises(ConfigError, match="HOST:PORT or off"):
        load_settings({"CAREFLOW_HTTP_LISTEN": "8080"}, data_dir=tmp_path)
    public = load_settings({"CAREFLOW_PUBLIC_URL": "https://care.example.org/"}, data_dir=tmp_path)
    assert public.web_url == "https://care.example.org"
    with pytest.raises(ConfigError, match="https://"):
        load_settings({"CAREFLOW_PUBLIC_URL": "care.example.org"}, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="CAREFLOW_LINK_TTL_S must be from 1 to 604800"):
        load_settings({"CAREFLOW_LINK_TTL_S": str(8 * 24 * 3600)}, data_dir=tmp_path)


def test_it_keeps_a_generated_link_secret_private_and_stable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    tmp_path.mkdir(exist_ok=True)
    first = load_link_key(settings, env={})
    assert load_link_key(settings, env={}) == first
    assert stat.S_IMODE((tmp_path / LINK_SECRET_FILE).stat().st_mode) == 0o600
    given = "x" * 40
    assert load_link_key(settings, env={"CAREFLOW_LINK_SECRET": given}) == given.encode()
    with pytest.raises(ConfigError, match="at least 32"):
        load_link_key(settings, env={"CAREFLOW_LINK_SECRET": "short"})


def test_readyz_is_503_while_mosquitto_is_stopped_and_200_after(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url), web=True).start()
    try:
        assert hub.hub.web is not None
        base = hub.hub.web.url
        assert _get(f"{base}/healthz") == (200, {"status": "ok"})
        status, body = _get(f"{base}/readyz")
        assert status == 200, body
        assert body["checks"] == {"broker": "ok", "store": "ok"}

        mosquitto.stop()
        wait_until(lambda: _get(f"{base}/readyz")[0] == 503, what="readyz to say 503")
        status, body = _get(f"{base}/readyz")
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert "not connected to the broker" in checks["broker"]
        assert _get(f"{base}/healthz")[0] == 200  # alive all the same

        mosquitto.start()
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, timeout_s=30,
                   what="readyz to say 200 again")
    finally:
        hub.stop()
