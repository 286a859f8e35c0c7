"""`careflow mcp`: the hub's state for an operator's AI assistant (MCP over stdio)."""

from __future__ import annotations

from typing import Annotated

import typer

from careflow.cli.common import DataDirOption
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.hub.ops.llm import record_in_store
from careflow.hub.ops.mcp_server import PLANNER, LoadedRunbooks, build_server
from careflow.hub.ops.runbooks import load_runbooks
from careflow.hub.web.link_pages import typed_name

__all__ = ["PROPOSAL_TTL_MS", "mcp"]

PROPOSAL_TTL_MS = 30 * 60_000  # a proposal is about the fleet as it is now: stale after 30 min


def mcp(
    by: Annotated[str | None, typer.Option(
        "--by", help="Who runs the assistant: the audit rows name mcp:NAME.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Serve the hub's state to an AI assistant over MCP (stdio): read tools and
    propose_action only; no tool approves or runs anything.

    Example (an assistant's MCP configuration): `{"command": "careflow", "args": ["mcp",
    "--by", "kari"]}`.
    """
    store = open_store(data_dir)
    actor = f"{PLANNER}:{typed_name(by, '')}" if by and typed_name(by, "") else PLANNER
    server = build_server(store, runbooks=LoadedRunbooks(load_runbooks()),
                          record=record_in_store(store, now_ms=clock.now_ms,
                                                 ttl_ms=PROPOSAL_TTL_MS),
                          clock=clock.now_ms, actor=actor)
    server.run("stdio")
