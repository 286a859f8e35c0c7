"""The ``careflow`` command: one CLI for operators and technicians.

The command tree lives in :mod:`careflow.cli.app`; this module stays small so that
``careflow edge run`` on a gateway loads only what the agent needs.
"""

from __future__ import annotations

import sys

from careflow.core.errors import CareflowError, SessionTakenError

__all__ = ["EXIT_SESSION_TAKEN", "main"]

# The hub yielded its broker session to another client with its client id: not to be restarted
# (deploy/careflow-hub.service: RestartPreventExitStatus).
EXIT_SESSION_TAKEN = 3


def main() -> None:
    """Entry point: careflow's own errors become one clear line and exit code 2 (3 for a hub
    that yields its broker session to another)."""
    try:
        if sys.argv[1:3] == ["edge", "run"]:
            # On a gateway only the agent runs: skip the hub, amqtt and jsonschema, which the
            # full command tree would load (about 10 MB of RSS).
            from careflow.edge.cli import edge_app  # noqa: PLC0415

            edge_app(args=sys.argv[2:], prog_name="careflow edge")
            return
        from careflow.cli.app import app  # noqa: PLC0415

        app()
    except CareflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_SESSION_TAKEN if isinstance(exc, SessionTakenError) else 2)
