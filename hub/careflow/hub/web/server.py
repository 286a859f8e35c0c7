"""The on-call web's HTTP server: uvicorn in a thread of the hub process, on a socket bound
before anything starts, so a taken port is a clear error at once (as the broker's is).

TLS and the public name come from a reverse proxy in front (README: Caddy and nginx); the hub
listens on loopback by default (CAREFLOW_HTTP_LISTEN).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from careflow.core.config import HostPort
from careflow.core.errors import ConfigError

__all__ = ["WebServer", "bind"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def bind(address: HostPort) -> socket.socket:
    """A listening socket on ``address`` (port 0: any free port); a ConfigError names the fix
    when the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            msg = (f"the web console cannot listen on {address}: the port is taken (another "
                   "careflow hub, or another web server?). Stop it, or set CAREFLOW_HTTP_LISTEN "
                   f"to a free address, e.g. {address.host}:{address.port + 1}; "
                   "CAREFLOW_HTTP_LISTEN=off runs the hub without it")
        else:
            msg = (f"the web console cannot listen on {address}: {exc.strerror or exc}. Set "
                   "CAREFLOW_HTTP_LISTEN to an address of this machine (default "
                   "127.0.0.1:8080), or off")
        raise ConfigError(msg) from exc
    sock.set_inheritable(False)
    return sock


class WebServer:
    """An ASGI app served by uvicorn from a daemon thread, on a socket bound at construction."""

    def __init__(self, app: ASGIApp, address: HostPort) -> None:
        self._sock = bind(address)
        host, port = self._sock.getsockname()[:2]
        self.address = HostPort(host, port)
        # X-Forwarded-For/-Proto are believed from a proxy on this machine only (Caddy or
        # nginx in front, README): the client's address for login rate limits, https for
        # Secure cookies
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, proxy_headers=True,
                                forwarded_allow_ips="127.0.0.1,::1")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    @property
    def url(self) -> str:
        """Where this server answers (the bound port, for port 0)."""
        host = self.address.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.address.port}"

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception:  # the hub goes on ingesting; /healthz stops answering
            log.exception("the web server stopped on an error")

    def start(self) -> None:
        """Serve; returns once uvicorn has started (or raises ConfigError saying why not)."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                msg = f"the web console did not start on {self.address} (see the hub log)"
                raise ConfigError(msg)
            time.sleep(0.01)
        log.info("web console listening", extra={"url": self.url})

    def stop(self) -> None:
        """Finish the requests in hand, then stop."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self._sock.close()
