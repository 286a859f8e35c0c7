"""Sites: which site each gateway belongs to, one rule for alert routing, the InfluxDB sink and the report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from careflow.hub.store.records import StoredEvent

__all__ = ["UNASSIGNED", "SiteBook"]

UNASSIGNED = "unassigned"


@dataclass(slots=True)
class SiteBook:
    """Which site each gateway belongs to: the newest ``labels.site`` (by event time) that a
    provision event of that gateway declared. The InfluxDB sink tags points with it and the
    report groups gateways by it, so both agree."""

    sites: dict[str, str] = field(default_factory=dict)
    _since: dict[str, tuple[int, int]] = field(default_factory=dict)

    def learn(self, event: StoredEvent, data: Mapping[str, Any]) -> None:
        """A provision event naming a site places its gateway there, unless a newer one did."""
        if event.type != "provision":
            return
        labels = data.get("labels")
        if not (isinstance(labels, Mapping) and isinstance(site := labels.get("site"), str)
                and site):
            return
        when = (event.time_ms, event.pos)
        if when >= self._since.get(event.gateway, (-1, -1)):
            self.sites[event.gateway] = site
            self._since[event.gateway] = when

    def site_of(self, gateway: str) -> str:
        """The gateway's site, or ``unassigned``."""
        return self.sites.get(gateway, UNASSIGNED)
