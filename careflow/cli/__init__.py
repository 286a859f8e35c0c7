"""The ``careflow`` command: one CLI for operators and technicians.

The command tree lives in :mod:`careflow.cli.app`; this module stays small so that
``careflow edge run`` on a gateway loads only what the agent needs.
"""

from __future__ import annotations

import sys

from careflow.errors import CareflowError

__all__ = ["main"]


def main() -> None:
    """Entry point: careflow's own errors become one clear line and exit code 2."""
    try:
        if sys.argv[1:3] == ["edge", "run"]:
            # On a gateway only the agent runs: skip the hub, amqtt and jsonschema, which the
            # full command tree would load (about 10 MB of RSS).
            from careflow.cli.edgecmd import edge_app  # noqa: PLC0415

            edge_app(args=sys.argv[3:], prog_name="careflow edge run")
            return
        from careflow.cli.app import app  # noqa: PLC0415

        app()
    except CareflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
