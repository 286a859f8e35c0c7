"""The on-call web as one Starlette app: what it needs from the hub (:class:`WebDeps`) and
the routes of each part (one-tap links, the console, /metrics), wired by :func:`create_app`.

Everything but the signed links, /healthz, /readyz, /metrics and the login page needs a login
(the console's own check). Store calls run in worker threads, one at a time on the web's own
connection (:meth:`WebDeps.call`): SQLite serialises writes anyway, and a slow page never
holds up ingest, which has its own connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import anyio.to_thread
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from careflow.core import clock
from careflow.core.config import Settings
from careflow.hub.store.interface import Store
from careflow.hub.web import console, link_pages, metrics

__all__ = ["WebDeps", "create_app", "templates"]

T = TypeVar("T")

Readiness = Callable[[], Mapping[str, str | None]]  # check -> None (ok) or what is wrong


@dataclass(kw_only=True)
class WebDeps:
    """What the web reads and changes, handed in by the hub (or a test)."""

    settings: Settings
    store: Store  # the web's own connection
    link_key: bytes  # signs the one-tap links
    readiness: Readiness  # broker connected, store writable...
    health: Callable[[], Mapping[str, Any]]  # the hub's last health report
    now_ms: Callable[[], int] = clock.now_ms
    wake_sender: Callable[[], None] = lambda: None  # something was queued for the channels
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def call(self, action: Callable[[], T]) -> T:
        """Run store work off the event loop, one at a time on the web's connection."""
        def locked() -> T:
            with self._lock:
                return action()
        return await anyio.to_thread.run_sync(locked)


def templates() -> Environment:
    """The Jinja2 templates (package data), autoescaped."""
    folder = resources.files("careflow.hub.web") / "templates"
    return Environment(loader=FileSystemLoader(str(folder)),
                       autoescape=select_autoescape(default=True, default_for_string=True))


async def healthz(_request: Request) -> Response:
    """Alive: the web thread answers."""
    return JSONResponse({"status": "ok"})


def _readyz(deps: WebDeps) -> Callable[[Request], Any]:
    async def readyz(_request: Request) -> Response:
        """Ready: every check passes (broker connected, store writable); 503 says which not."""
        checks = dict(deps.readiness())
        ready = all(problem is None for problem in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready",
                             "checks": {name: problem or "ok" for name, problem in
                                        checks.items()}},
                            status_code=200 if ready else 503,
                            headers={"Cache-Control": "no-store"})
    return readyz


def create_app(deps: WebDeps) -> Starlette:
    """The web app: probes, one-tap links, /metrics and the console."""
    routes: list[BaseRoute] = [Route("/healthz", healthz), Route("/readyz", _readyz(deps))]
    routes += metrics.routes(deps)
    routes += link_pages.routes(deps)
    routes += console.routes(deps)
    return Starlette(routes=routes)
