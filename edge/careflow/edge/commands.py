"""Remote commands a gateway accepts, for runbooks: an allowlist, nothing else.

A request on ``careflow/v1/{gateway}/cmd`` is ``{"id": "<correlation>", "name": "ping",
"args": {}}``; the answer on ``careflow/v1/{gateway}/reply`` is ``{"id": ..., "name": ...,
"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``. Anything not allowlisted is
refused with a reply that lists what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ALLOWED", "CommandHandler", "handle_command"]

CommandHandler = Callable[[Mapping[str, Any]], dict[str, Any]]

ALLOWED = ("ping", "diagnostics", "resend", "restart-agent")


def handle_command(payload: bytes, handlers: Mapping[str, CommandHandler]) -> dict[str, Any]:
    """Run one request against the allowlisted handlers and build the reply."""
    try:
        request = json.loads(payload)
        if not isinstance(request, dict):
            raise TypeError
    except (ValueError, TypeError):
        return {"id": None, "ok": False, "error": "a command must be a JSON object with id and name"}
    correlation, name = request.get("id"), request.get("name")
    args = request.get("args") or {}
    reply: dict[str, Any] = {"id": correlation, "name": name}
    if name not in ALLOWED or name not in handlers:
        return {**reply, "ok": False,
                "error": f"command {name!r} is not allowed; allowed: {', '.join(ALLOWED)}"}
    if not isinstance(args, dict):
        return {**reply, "ok": False, "error": "args must be a JSON object"}
    try:
        return {**reply, "ok": True, "result": handlers[name](args)}
    except Exception as exc:
        return {**reply, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
