"""The shipped Mosquitto configuration loads in a real Mosquitto and enforces its ACL."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from careflow.core.config import parse_broker_url
from careflow.core.errors import BrokerError
from careflow.core.mqtt import connect_blocking, make_client
from tests.conftest import MOSQUITTO, free_port, wait_for_port, wait_until

pytestmark = pytest.mark.broker
SHIPPED = Path(__file__).parents[1] / "mosquitto"


@pytest.fixture
def shipped_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    hub_port, device_port = free_port(), free_port()
    text = (SHIPPED / "mosquitto.conf").read_text()
    text = text.replace("listener 1883 127.0.0.1", f"listener {hub_port} 127.0.0.1")
    text = text.replace("listener 8883 0.0.0.0", f"listener {device_port} 127.0.0.1")
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path}/")
    text = text.replace("/etc/mosquitto/", f"{tmp_path}/")
    text = text.replace("log_dest stdout", f"log_dest file {tmp_path}/mosquitto.log")
    # As root, Mosquitto would drop to the `mosquitto` user, who cannot read pytest's tmp dirs.
    (tmp_path / "mosquitto.conf").write_text("user root\n" + text)
    shutil.copy(SHIPPED / "careflow.acl", tmp_path / "careflow.acl")
    passwd = tmp_path / "careflow.passwd"
    passwd.touch()
    for user in ("careflow-hub", "gw-a"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-secret"], check=True)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")])
    wait_for_port(hub_port)
    wait_for_port(device_port)
    yield hub_port, device_port
    proc.terminate()
    proc.wait(timeout=10)


def client(port: int, user: str | None) -> paho.Client:
    url = parse_broker_url(f"mqtt://127.0.0.1:{port}")
    c = make_client(client_id=f"cfg-test-{user}", clean_session=True, url=url, username=user,
                    password=f"{user}-secret" if user else None)
    connect_blocking(c, url)
    return c


def test_it_refuses_anonymous_clients(shipped_broker: tuple[int, int]) -> None:
    with pytest.raises(BrokerError, match="refused"):
        client(shipped_broker[1], None)


def test_it_lets_a_gateway_publish_only_under_its_own_id(shipped_broker: tuple[int, int]) -> None:
    hub_port, device_port = shipped_broker
    received: list[str] = []
    hub = client(hub_port, "careflow-hub")
    hub.on_message = lambda _c, _u, m: received.append(m.topic)
    hub.subscribe("careflow/v1/#", qos=1)
    time_to_subscribe = hub.publish("careflow/v1/x/ack/probe", b"", qos=1)
    time_to_subscribe.wait_for_publish(5)
    gateway = client(device_port, "gw-a")
    gateway.publish("careflow/v1/gw-b/gw-b/heartbeat", b"{}", qos=1).wait_for_publish(5)
    gateway.publish("careflow/v1/gw-a/gw-a/heartbeat", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: "careflow/v1/gw-a/gw-a/heartbeat" in received, what="own topic delivered")
    assert "careflow/v1/gw-b/gw-b/heartbeat" not in received
    for c in (hub, gateway):
        c.disconnect()
        c.loop_stop()
