"""`careflow mcp`: the hub's state for an operator's AI assistant (MCP over stdio)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from careflow.cli.common import DataDirOption, settings_from
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.hub.ops.agent import agent_for
from careflow.hub.store.records import Proposal
from careflow.hub.web.link_pages import typed_name

__all__ = ["mcp"]


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
    # the mcp package takes half a second to import: only this command pays for it, not
    # every other careflow command
    from careflow.hub.ops.mcp_server import (  # noqa: PLC0415
        PLANNER,
        LoadedRunbooks,
        build_server,
    )

    store = open_store(data_dir)
    name = typed_name(by or "", "")
    actor = f"{PLANNER}:{name}" if name else PLANNER
    agent = agent_for(settings_from(data_dir=data_dir), store)

    def propose(incident_id: int, *, action: str, params: Mapping[str, Any],
                why: str) -> Proposal | None:
        return agent.propose(incident_id, actor=actor, action=action, params=params, why=why,
                             planner=PLANNER).proposal

    server = build_server(store, runbooks=LoadedRunbooks({b.id: b for b in agent.runbooks}),
                          propose=propose, clock=clock.now_ms, actor=actor)
    server.run("stdio")
