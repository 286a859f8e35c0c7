"""The embedded broker (amqtt) for the zero-setup default: no Mosquitto to install.

It runs on its own thread with its own asyncio loop, beside the paho-based hub. Facts about amqtt
0.12.1 this relies on:

* An explicit ``plugins`` mapping replaces amqtt's defaults (event and packet loggers, $SYS
  broadcasts); an auth plugin is still required or every CONNECT is refused.
* amqtt's stock anonymous-auth plugin marks sessions anonymous, and anonymous sessions are
  neither kept nor queued for while the client is away. Our plugin accepts clients without
  that mark, so the hub's persistent QoS 1 session works as it does on Mosquitto.
* The session lives in memory: it survives the hub's reconnects, not a restart of the process.
  Production runs Mosquitto (see mosquitto/), which persists it.

Anyone who reaches the broker can publish as any gateway, fake the hub's confirmations (a
gateway then deletes events no hub stored) and read claim answers. So it listens on loopback
unless credentials are configured; with credentials, every client must present them (one user
for all: the embedded broker is for trying careflow, not for a fleet).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from careflow.core.errors import BrokerError, ConfigError

__all__ = ["GENERATED_PASSWORD_FILE", "GENERATED_USERNAME", "BrokerCredentials",
           "EmbeddedBroker", "exposed_without_credentials", "generate_password_file",
           "is_loopback"]

GENERATED_USERNAME = "careflow"
GENERATED_PASSWORD_FILE = "broker-password"  # noqa: S105 - a file name, not a password

log = logging.getLogger(__name__)


class AcceptAllAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Let every local client in, without the anonymous mark that disables persistent sessions."""

    async def authenticate(self, *, session: Session) -> bool | None:
        """Accept."""
        return True


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """The one user the embedded broker lets in when credentials are configured."""

    username: str
    password: str = field(repr=False)


class CredentialsAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Let in only clients presenting the configured username and password (compared in
    constant time); like :class:`AcceptAllAuth`, without the anonymous mark."""

    @dataclass
    class Config:
        """Filled by amqtt from the plugin's entry in the broker configuration."""

        username: str = ""
        password: str = field(default="", repr=False)

    async def authenticate(self, *, session: Session) -> bool | None:
        """Accept exactly the configured pair; anything else, including no username, is refused."""
        expected: CredentialsAuth.Config = self.config
        if not expected.username or session is None:
            return False
        given_user = _as_bytes(session.username)
        given_password = _as_bytes(session.password)
        user_ok = hmac.compare_digest(given_user, expected.username.encode())
        password_ok = hmac.compare_digest(given_password, expected.password.encode())
        return user_ok and password_ok


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value if isinstance(value, bytes) else value.encode()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def exposed_without_credentials(host: str, credentials: BrokerCredentials | None) -> bool:
    """The embedded broker would accept anyone from the network."""
    return credentials is None and not is_loopback(host)


def generate_password_file(data_dir: Path) -> Path:
    """A random password for the embedded broker in ``DATA_DIR/broker-password`` (0600), made
    once and then reused (never overwritten: clients may already use it)."""
    path = data_dir / GENERATED_PASSWORD_FILE
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(24) + "\n")
    return path


class _ClosingBroker(Broker):  # type: ignore[misc]
    """amqtt leaks the socket of a client that connects and never sends CONNECT; close it."""

    async def stream_connected(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, listener_name: str) -> None:
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(TimeoutError, OSError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)


def _config(host: str, port: int, credentials: BrokerCredentials | None) -> dict[str, Any]:
    if credentials is None:
        auth: dict[str, Any] = {f"{AcceptAllAuth.__module__}.{AcceptAllAuth.__qualname__}": {}}
    else:
        auth = {f"{CredentialsAuth.__module__}.{CredentialsAuth.__qualname__}": {
            "username": credentials.username, "password": credentials.password}}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": auth,
    }


class EmbeddedBroker:
    """An MQTT 3.1.1 broker on ``host:port`` inside this process."""

    def __init__(self, host: str, port: int, *, credentials: BrokerCredentials | None = None,
                 timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self._timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _port_taken_error(self, cause: object) -> BrokerError:
        return BrokerError(
            f"cannot start the embedded broker on {self.host}:{self.port}: {cause}. Another "
            "broker probably listens there: choose a free address with --listen "
            "127.0.0.1:1884 (or CAREFLOW_LISTEN), or use that broker with --broker "
            f"mqtt://{self.host}:{self.port} (or CAREFLOW_BROKER_URL).", retry=False)

    def start(self) -> None:
        """Start listening; raises BrokerError naming the fix when the port is taken, and
        ConfigError for an address off this machine without credentials."""
        if exposed_without_credentials(self.host, self.credentials):
            msg = (f"the embedded broker accepts anyone, so it listens only on loopback "
                   f"(127.0.0.1), not on {self.host}, unless credentials are configured")
            raise ConfigError(msg)
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        with socket.socket() as probe:  # a clear error before amqtt logs a traceback
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise self._port_taken_error(exc.strerror or exc) from exc
        self._thread = threading.Thread(target=self._main, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout_s):
            msg = f"the embedded broker did not start on {self.host}:{self.port} within " \
                  f"{self._timeout_s:g}s"
            raise BrokerError(msg)
        if self._error is not None:
            self._thread.join(self._timeout_s)
            self._thread = None
            raise self._port_taken_error(self._error.__cause__ or self._error) from self._error
        log.info("embedded broker listening", extra={"address": f"{self.host}:{self.port}"})

    def stop(self) -> None:
        """Shut down and join the broker thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(self._timeout_s)
        self._thread = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        try:
            broker = _ClosingBroker(_config(self.host, self.port, self.credentials),
                                    loop=asyncio.get_running_loop())
            await broker.start()
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopping.wait()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=self._timeout_s / 2)
        except Exception:
            log.warning("embedded broker did not shut down cleanly", exc_info=True)
