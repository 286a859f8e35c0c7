"""Silences and inhibition: which incidents are recorded but not announced, and why.

Pure functions; the alert stage passes in what the store knows and ``now``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FLAP_WINDOW_MS", "Silence", "flapping", "inhibited_by", "silenced_by"]


@dataclass(frozen=True, slots=True)
class Silence:
    """A maintenance window: matching incidents are not announced between starts and ends."""

    id: int
    gateway: str  # shell-style patterns
    device: str
    rule: str
    starts_ms: int
    ends_ms: int
    created_by: str
    comment: str

    def covers(self, rule: str, gateway: str, device: str, now_ms: int) -> bool:
        """Whether this silence mutes ``rule`` for that source now."""
        return (self.starts_ms <= now_ms < self.ends_ms
                and fnmatch.fnmatchcase(rule, self.rule)
                and fnmatch.fnmatchcase(gateway, self.gateway)
                and fnmatch.fnmatchcase(device, self.device))


def silenced_by(silences: Iterable[Silence], rule: str, gateway: str, device: str,
                now_ms: int) -> Silence | None:
    """The silence that mutes this incident, if any."""
    return next((s for s in silences if s.covers(rule, gateway, device, now_ms)), None)


def inhibited_by(*, rule_kind: str, gateway: str, device: str, gateway_offline: bool,
                 gateway_announced_by: str | None = None) -> str | None:
    """A gateway that is offline explains its devices going silent: announce the gateway once,
    not every device behind it (Alertmanager's inhibition).

    ``gateway_announced_by`` names a gateway rule (``only_gateways``) firing for this gateway:
    the gateway's own silence under another absence rule is then said already.
    """
    if rule_kind == "absence" and device != gateway and gateway_offline:
        return f"inhibited: gateway {gateway} is offline"
    if rule_kind == "absence" and device == gateway and gateway_announced_by is not None:
        return f"inhibited: {gateway_announced_by} announces gateway {gateway}"
    return None


FLAP_WINDOW_MS = 30 * 60_000
FLAP_TRIGGERS = 4


def flapping(recent_triggers_ms: Iterable[int], *, now_ms: int, window_ms: int = FLAP_WINDOW_MS,
             threshold: int = FLAP_TRIGGERS) -> bool:
    """A condition that fired ``threshold`` times within ``window_ms`` (this time included) is
    flapping: keep recording it, stop announcing every swing."""
    return sum(1 for at in recent_triggers_ms if now_ms - at < window_ms) + 1 >= threshold
