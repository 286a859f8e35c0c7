"""Revoking a gateway against a running Mosquitto: CRL + ACL, reload, end the live session, check.

Mosquitto checks the CRL only during the TLS handshake, so a revoked gateway that is connected
stays connected after the reload. The broker has no "kick client" command, but MQTT does: a
second connection with the same client id takes the session over and the broker closes the
first. We connect with the hub's certificate under the gateway's client id, disconnect cleanly,
then watch the gateway's retained presence topic to prove it did not get back in.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as paho

from careflow.core.config import BrokerUrl, TlsFiles
from careflow.core.errors import BrokerError, ConfigError, ContractError, PkiError
from careflow.core.mqtt import connect_blocking, make_client
from careflow.provisioning.pki import IssuedCert, Pki, current_certificate, revoke_identity
from careflow.schemas import state_topic
from careflow.schemas.codec import decode_json
from careflow.schemas.limits import MAX_PAYLOAD_DEPTH

__all__ = [
    "agent_client_id",
    "end_session",
    "read_pidfile",
    "reload_broker",
    "reload_from_options",
    "revoke_gateway",
    "watch_presence",
]


def agent_client_id(gateway_id: str) -> str:
    """The MQTT client id the careflow agent uses (edge/agent.py)."""
    return f"careflow-gw-{gateway_id}"


def revoke_gateway(pki: Pki, gateway_id: str, *, now: datetime) -> IssuedCert:
    """Put every unexpired certificate of the gateway on the CRL; return the current one.

    Every one, not just the newest: a gateway renews at two thirds of a certificate's life, so
    an older certificate may still be valid for days, and a stolen gateway that kept one (or
    renewed twice on purpose) would otherwise walk back in with it. The ACL follows
    (``write_device_acl``).

    Raises:
        PkiError: no certificate was ever recorded for this gateway.
    """
    current = current_certificate(pki, gateway_id)
    if current is None:
        msg = (f"no certificate recorded for {gateway_id!r} in {pki.issued_path}. Check the id "
               "(`careflow devices list`) and --pki-dir.")
        raise PkiError(msg)
    revoke_identity(pki, gateway_id, now=now)
    return current


def read_pidfile(path: Path) -> int:
    """The process id in a pidfile (Mosquitto's ``pid_file`` option)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        msg = f"cannot read a process id from {path}: {exc}. Is Mosquitto's pid_file set there?"
        raise BrokerError(msg, retry=False) from exc


def reload_broker(*, pid: int | None = None, command: Sequence[str] | None = None) -> None:
    """SIGHUP Mosquitto (by pid, or by a command such as ``docker kill -s HUP mosquitto``).

    A SIGHUP makes Mosquitto re-read its ACL files and its CRL; TCP connections stay open.
    """
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError as exc:
            msg = f"no process {pid}: is Mosquitto running, and is its pidfile current?"
            raise BrokerError(msg, retry=False) from exc
        except PermissionError as exc:
            msg = (f"not allowed to signal process {pid}: run as the broker's user or root, or "
                   "use --reload-command")
            raise BrokerError(msg, retry=False) from exc
    elif command:
        result = subprocess.run(list(command), capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            msg = (f"`{shlex.join(command)}` exited {result.returncode}: "
                   f"{result.stderr.strip()[:300]}")
            raise BrokerError(msg, retry=False)
    else:
        msg = "nothing to reload: give a pid or a command"
        raise BrokerError(msg, retry=False)


def reload_from_options(*, pid: int | None, pidfile: Path | None,
                        command: str | None) -> str:
    """Reload Mosquitto the way the operator said (one of pid, pidfile, command); say how.

    Raises:
        ConfigError: none was given.
        BrokerError: the signal or the command failed.
    """
    if pidfile is not None and pid is None:
        pid = read_pidfile(pidfile)
    if pid is not None:
        reload_broker(pid=pid)
        return f"SIGHUP to Mosquitto (pid {pid})"
    if command:
        reload_broker(command=shlex.split(command))
        return f"`{command}`"
    msg = ("say how to reload Mosquitto so it re-reads the CRL and ACL: --broker-pid PID, "
           "--broker-pidfile /run/mosquitto/mosquitto.pid, or --reload-command "
           "'docker kill -s HUP mosquitto' (or --no-reload to only update the files)")
    raise ConfigError(msg)


def end_session(url: BrokerUrl, tls: TlsFiles, client_id: str, *, timeout_s: float = 10.0) -> None:
    """Take over ``client_id``'s session with our own credentials and close it cleanly.

    Mosquitto disconnects the older connection with that client id (and publishes its Will); a
    clean session also discards what was queued for it.
    """
    client = make_client(client_id=client_id, clean_session=True, url=url, tls=tls)
    connect_blocking(client, url, timeout_s=timeout_s)
    client.disconnect()
    client.loop_stop()


class _PresenceWatcher:
    """Records the states a gateway publishes live (not retained) on its presence topic."""

    def __init__(self, url: BrokerUrl, tls: TlsFiles, gateway_id: str) -> None:
        self.states: list[str] = []
        self._subscribed = threading.Event()
        self._topic = state_topic(gateway_id)
        self._client = make_client(client_id=f"careflow-revoke-{os.getpid()}-{time.monotonic_ns()}",
                                   clean_session=True, url=url, tls=tls)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        connect_blocking(self._client, url, on_connected=self._subscribe)
        self._subscribed.wait(5)

    def _subscribe(self, client: paho.Client) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        if message.retain:  # the state before we looked; only what happens now counts
            return
        try:  # the gateway's own topic: a stolen one may send anything, even a nesting bomb
            body = decode_json(bytes(message.payload), max_depth=MAX_PAYLOAD_DEPTH)
            state = str(body.get("state"))[:40] if isinstance(body, dict) else repr(body)[:40]
        except ContractError:
            state = message.payload[:40].decode(errors="replace")
        self.states.append(state)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def watch_presence(url: BrokerUrl, tls: TlsFiles, gateway_id: str, *, client_id: str,
                   watch_s: float, attempts: int = 3) -> tuple[list[str], bool]:
    """End the gateway's session and watch whether it reconnects; retry if it does.

    A gateway that reconnects within the SIGHUP's reload window (before Mosquitto read the new
    CRL) comes back ``online``; taking the session over again after the reload closes that gap.

    Returns:
        The live presence states seen, and whether the gateway was still back at the end.
    """
    watcher = _PresenceWatcher(url, tls, gateway_id)
    try:
        for _ in range(attempts):
            seen = len(watcher.states)
            end_session(url, tls, client_id)
            deadline = time.monotonic() + watch_s
            while time.monotonic() < deadline:
                time.sleep(0.1)
                if "online" in watcher.states[seen:]:
                    break
            if "online" not in watcher.states[seen:]:
                return list(watcher.states), False
        return list(watcher.states), True
    finally:
        watcher.close()
