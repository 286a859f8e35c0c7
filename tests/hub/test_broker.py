"""The embedded broker: loopback unless credentials are configured, and then it demands them."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.core.errors import BrokerError, ConfigError
from careflow.core.mqtt import connect_blocking, make_client
from careflow.hub.ingest.embedded_broker import (
    GENERATED_PASSWORD_FILE,
    BrokerCredentials,
    EmbeddedBroker,
    is_loopback,
)
from tests.conftest import careflow_cmd, free_port, wait_until

SECRET = BrokerCredentials("careflow", "correct horse battery staple")


def can_connect(port: int, username: str | None = None, password: str | None = None) -> bool:
    """Whether a real MQTT client gets in on 127.0.0.1:port with these credentials."""
    url = parse_broker_url(f"mqtt://127.0.0.1:{port}")
    client = make_client(client_id=f"probe-{os.getpid()}-{free_port()}", clean_session=True,
                         url=url, username=username, password=password)
    try:
        connect_blocking(client, url, timeout_s=5)
    except BrokerError as exc:
        if "refused" not in str(exc):
            raise
        return False
    client.disconnect()
    client.loop_stop()
    return True


@pytest.fixture(params=["127.0.0.1", "0.0.0.0"])
def credentialed_broker(request: pytest.FixtureRequest) -> Iterator[int]:
    port = free_port()
    broker = EmbeddedBroker(request.param, port, credentials=SECRET)
    broker.start()
    yield port
    broker.stop()


def test_a_broker_with_credentials_refuses_anyone_without_them(credentialed_broker: int) -> None:
    assert not can_connect(credentialed_broker)
    assert not can_connect(credentialed_broker, "careflow")
    assert not can_connect(credentialed_broker, "careflow", "wrong")
    assert not can_connect(credentialed_broker, "someone", SECRET.password)
    assert can_connect(credentialed_broker, SECRET.username, SECRET.password)


def test_without_credentials_it_stays_on_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        EmbeddedBroker("0.0.0.0", free_port()).start()
    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        assert can_connect(port)
    finally:
        broker.stop()


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("hub.example.org", False),
])
def test_it_knows_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_hub_refuses_an_exposed_address_and_makes_credentials_to_use(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(data_dir), "CAREFLOW_SQLITE_SYNC": "normal"}
    for key in ("CAREFLOW_BROKER_USERNAME", "CAREFLOW_BROKER_PASSWORD",
                "CAREFLOW_BROKER_PASSWORD_FILE", "CAREFLOW_BROKER_URL"):
        env.pop(key, None)
    hub_cmd = careflow_cmd("hub", "--listen", f"0.0.0.0:{port}")
    try:
        refused = subprocess.run(hub_cmd, env=env, capture_output=True, text=True, timeout=30,
                                 check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the hub ran an open broker on 0.0.0.0")
    assert refused.returncode == 2, refused.stderr
    password_file = data_dir / GENERATED_PASSWORD_FILE
    assert f"CAREFLOW_BROKER_PASSWORD_FILE={password_file}" in refused.stderr
    assert "CAREFLOW_EDGE_PASSWORD_FILE" in refused.stderr
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert len(password_file.read_text().strip()) >= 24
    with socket.socket() as probe:  # nothing was left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0

    # with the credentials it printed, the hub runs; clients need them too
    secured = {**env, "CAREFLOW_BROKER_USERNAME": "careflow",
               "CAREFLOW_BROKER_PASSWORD_FILE": str(password_file),
               "CAREFLOW_LISTEN": f"127.0.0.1:{port}"}
    log_path = tmp_path / "hub.log"
    with log_path.open("wb") as log:
        hub = subprocess.Popen(hub_cmd, env=secured, stdout=log, stderr=log)
    try:
        wait_until(lambda: subprocess.run(careflow_cmd("status"), env=secured,
                                          capture_output=True, check=False).returncode == 0
                   or hub.poll() is not None, what="the hub with credentials")
        assert hub.poll() is None, log_path.read_text()
        assert "reachable from the network" in log_path.read_text()
        anonymous = {k: v for k, v in secured.items() if not k.startswith("CAREFLOW_BROKER_")}
        done = subprocess.run(careflow_cmd("events", "publish", "--count", "2"), env=anonymous,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and "refused" in done.stderr
        done = subprocess.run(careflow_cmd("events", "publish", "--count", "2"), env=secured,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: subprocess.run(careflow_cmd("events", "count"), env=secured,
                                          capture_output=True, text=True, check=False)
                   .stdout.strip() == "2", what="the authenticated events stored")
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=20) == 0, log_path.read_text()
