"""(filled in by its part of issue 13)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from careflow.hub.web.app import WebDeps

__all__ = ["routes"]


def routes(deps: WebDeps) -> list[BaseRoute]:
    """This part's routes."""
    del deps
    return []
