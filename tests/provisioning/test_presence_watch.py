"""`careflow devices revoke` watches the revoked gateway's presence topic to see whether it comes
back during the broker's reload window. That topic is the gateway's own: a stolen gateway must
not be able to blind the watch with a hostile payload (which would report it gone)."""

from __future__ import annotations

import pytest

from careflow.core.config import parse_broker_url
from careflow.core.mqtt import connect_blocking, make_client
from careflow.provisioning.revocation import _PresenceWatcher
from careflow.schemas import state_topic
from tests.conftest import Mosquitto, wait_until

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("hostile", [b"[" * 200_000, b"\xff\xfe not text",
                                     b'{"state": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
def test_a_hostile_presence_payload_does_not_blind_the_revocation_watch(
        mosquitto: Mosquitto, hostile: bytes) -> None:
    url = parse_broker_url(mosquitto.url)
    watcher = _PresenceWatcher(url, None, "gw-stolen")  # type: ignore[arg-type]
    gateway = make_client(client_id="gw-stolen", clean_session=True, url=url)
    connect_blocking(gateway, url, timeout_s=10)
    try:
        topic = state_topic("gw-stolen")
        gateway.publish(topic, hostile, qos=1).wait_for_publish(10)
        gateway.publish(topic, b'{"state": "online"}', qos=1).wait_for_publish(10)
        wait_until(lambda: "online" in watcher.states, timeout_s=10,
                   what="the watch still sees the gateway come back")
    finally:
        gateway.disconnect()
        gateway.loop_stop()
        watcher.close()


