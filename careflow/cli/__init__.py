"""The ``careflow`` command: one CLI for operators and technicians.

The command tree lives in :mod:`careflow.cli.app`; this module stays small so that
``careflow edge ...`` on a gateway loads only what the agent needs. Exit statuses mean one thing
each (:mod:`careflow.core.exits`): 0 done, 1 failed or refused, 2 usage or configuration,
75 try again; 3 only from ``careflow hub``, when it yielded its broker session.
"""

from __future__ import annotations

import sys

from careflow.core.errors import CareflowError
from careflow.core.exits import EXIT_SESSION_TAKEN, exit_status

__all__ = ["EXIT_SESSION_TAKEN", "main"]


def main() -> None:
    """Entry point: careflow's own errors become one clear line and the exit status of their
    meaning (careflow.core.exits)."""
    try:
        if sys.argv[1:2] == ["edge"]:
            # On a gateway only the agent runs: skip the hub, amqtt and jsonschema, which the
            # full command tree would load (about 10 MB of RSS).
            from careflow.edge.cli import edge_app  # noqa: PLC0415

            edge_app(args=sys.argv[2:], prog_name="careflow edge")
            return
        from careflow.cli.app import app  # noqa: PLC0415

        app()
    except CareflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exit_status(exc))
