"""Sending an allowlisted command to a gateway's agent and awaiting its reply over MQTT.

One round trip shared by ``careflow gateway cmd`` and the action registry
(:mod:`careflow.hub.ops.actions`): a request on ``careflow/v1/{gateway}/cmd`` carrying a fresh
correlation id, the answer read from ``careflow/v1/{gateway}/reply``. The gateway refuses any name
outside its allowlist (``careflow.edge.commands.ALLOWED``); this side sends what it is given, so
the CLI can show that refusal, and the registry sends only the names it declares.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import paho.mqtt.client as paho

from careflow.core.config import Settings
from careflow.core.errors import BrokerError
from careflow.core.mqtt import connect_blocking, make_client
from careflow.schemas import command_topic, reply_topic

__all__ = ["GatewayCommands", "MqttGatewayCommands", "send_command"]


class GatewayCommands(Protocol):
    """Sends one command to a gateway and returns its reply (the seam the registry uses)."""

    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        """The gateway's reply: ``{"id", "name", "ok", "result" | "error", "elapsed_ms"}``;
        raises BrokerError when it does not answer within ``timeout_s``."""
        ...


def send_command(settings: Settings, gateway: str, name: str, args: Mapping[str, Any], *,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """Send ``name`` with ``args`` to ``gateway`` and wait for its reply.

    Args:
        settings: where the broker is and how to log in (``settings.effective_broker_url``).
        gateway: the gateway id (a topic level: the caller has checked it).
        name: the command; the gateway answers ``ok: false`` for one it does not allow.
        args: the command's arguments, a JSON object.
        timeout_s: how long to wait for the reply.

    Returns:
        The reply, with ``elapsed_ms`` (from sending to the answer) added.

    Raises:
        BrokerError: the broker cannot be reached, or the gateway did not reply in time (retry:
            it may be offline).
    """
    url = settings.effective_broker_url
    correlation = str(uuid.uuid4())
    answered = threading.Event()
    subscribed = threading.Event()
    reply: dict[str, Any] = {}

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("id") == correlation:
            reply.update(body)
            answered.set()

    client = make_client(client_id=f"careflow-cmd-{correlation}", clean_session=True, url=url,
                         username=settings.broker_username, password=settings.broker_password,
                         tls=settings.broker_tls)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()

    def subscribe(connected: paho.Client) -> None:
        connected.subscribe(reply_topic(gateway), qos=1)

    connect_blocking(client, url, on_connected=subscribe)
    try:
        subscribed.wait(5)  # subscribe before asking, so the answer cannot be missed
        started = time.monotonic()
        client.publish(command_topic(gateway),
                       json.dumps({"id": correlation, "name": name, "args": dict(args)}), qos=1)
        if not answered.wait(timeout_s):
            msg = (f"no reply from {gateway} within {timeout_s:g}s. Is it online? "
                   f"`careflow devices show {gateway}` shows its state.")
            raise BrokerError(msg)
        reply["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
    finally:
        client.disconnect()
        client.loop_stop()
    return reply


class MqttGatewayCommands:
    """:class:`GatewayCommands` over the configured broker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def send(self, gateway: str, name: str, args: Mapping[str, Any], *,
             timeout_s: float) -> dict[str, Any]:
        """See :func:`send_command`."""
        return send_command(self._settings, gateway, name, args, timeout_s=timeout_s)
