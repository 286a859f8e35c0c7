"""The management summary, computed from the hub's own records: pure functions, no I/O.

``careflow report`` is for people without Grafana (and without InfluxDB), so it works from what
the hub keeps anyway: the presence log of gateway changes, the incidents table with exact
trigger/acknowledge/resolve times, provision events and the device registry. The figures mean
what the management dashboard's mean: uptime is the share of the window a gateway was known to be
online, MTTA and MTTR are means over the incidents acknowledged or resolved inside the window.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from careflow.hub.fleet.sites import UNASSIGNED, SiteBook
from careflow.hub.store.records import DeviceRecord, Incident, PresenceChange, StoredEvent

__all__ = [
    "DayFigures",
    "GatewayUptime",
    "IncidentCount",
    "Report",
    "SiteUptime",
    "build_report",
    "day_starts",
    "mean_seconds",
    "online_ms",
    "sites_of",
]

DAY_MS = 86_400_000


def online_ms(changes: Iterable[tuple[int, bool]], *, start_ms: int, end_ms: int) -> tuple[int, int]:
    """How long a gateway was online inside ``[start_ms, end_ms)``, and how long its state was known.

    ``changes`` are (when, online) of one gateway, any order, including changes before the
    window: the last of those is the state the window starts in. Before the first change the state
    is unknown (the gateway did not exist yet, or announced itself later) and counts as neither
    up nor down, so a gateway installed mid-month is not punished for the days before.

    Returns:
        (online_ms, known_ms); uptime is ``online_ms / known_ms`` when ``known_ms > 0``.
    """
    up = known = 0
    state: bool | None = None
    cursor = start_ms
    for at_ms, online in sorted(changes):
        if at_ms >= end_ms:
            break
        if at_ms > cursor:
            if state is not None:
                known += at_ms - cursor
                up += (at_ms - cursor) if state else 0
            cursor = at_ms
        state = online
    if state is not None and end_ms > cursor:
        known += end_ms - cursor
        up += (end_ms - cursor) if state else 0
    return up, known


def share_pct(online_ms: int, known_ms: int) -> float | None:
    """Time online as a percentage of time known; None when nothing is known."""
    return 100 * online_ms / known_ms if known_ms else None


def sites_of(provisions: Iterable[StoredEvent]) -> dict[str, str]:
    """Each gateway's site: the newest ``labels.site`` a provision event of that gateway declared.

    The same rule the InfluxDB sink uses for its ``site`` tag, so report and dashboards group
    gateways the same way.
    """
    book = SiteBook()
    for event in provisions:
        book.learn(event, event.data)
    return dict(book.sites)


def day_starts(start_ms: int, end_ms: int) -> list[int]:
    """The UTC midnights of every day that overlaps ``[start_ms, end_ms)``, for per-day charts."""
    first = start_ms - start_ms % DAY_MS
    return list(range(first, max(end_ms, first + 1), DAY_MS))


def mean_seconds(durations_ms: Sequence[int]) -> float | None:
    """The mean of durations in seconds, or None when there are none (no incident, no figure)."""
    return sum(durations_ms) / len(durations_ms) / 1000 if durations_ms else None


class _Uptime:
    """Time online out of time known; ``pct`` is None when nothing is known in the window."""

    __slots__ = ()
    online_ms: int
    known_ms: int

    @property
    def pct(self) -> float | None:
        """Uptime in percent, None when nothing is known in the window."""
        return share_pct(self.online_ms, self.known_ms)


@dataclass(frozen=True, slots=True)
class GatewayUptime(_Uptime):
    """One gateway's time online in the window."""

    gateway: str
    site: str
    online_ms: int
    known_ms: int


@dataclass(frozen=True, slots=True)
class SiteUptime(_Uptime):
    """A site's gateways together, weighted by time (as a mean over minute snapshots is)."""

    site: str
    gateways: int
    online_ms: int
    known_ms: int


@dataclass(frozen=True, slots=True)
class IncidentCount:
    """How many incidents of one rule and severity were opened in the window."""

    rule: str
    severity: str
    count: int


@dataclass(frozen=True, slots=True)
class DayFigures:
    """One UTC day: incidents opened, and the mean times of those acknowledged/resolved that day."""

    day_ms: int
    incidents: int
    critical: int
    mtta_s: float | None
    mttr_s: float | None

    @property
    def day(self) -> str:
        """The date, ``2026-11-27``."""
        return datetime.fromtimestamp(self.day_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ``careflow report`` shows, for one window."""

    start_ms: int
    end_ms: int
    sites: tuple[SiteUptime, ...]
    gateways: tuple[GatewayUptime, ...]
    incidents: tuple[IncidentCount, ...]
    incidents_total: int
    acknowledged: int
    resolved: int
    mtta_s: float | None
    mttr_s: float | None
    per_day: tuple[DayFigures, ...]
    provisioned: Mapping[str, int]  # kind -> devices added in the window
    devices_total: int
    devices_active: int  # heard from inside the window

    @property
    def uptime_pct(self) -> float | None:
        """All gateways together."""
        known = sum(site.known_ms for site in self.sites)
        return 100 * sum(site.online_ms for site in self.sites) / known if known else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "start_ms": self.start_ms, "end_ms": self.end_ms, "uptime_pct": self.uptime_pct,
            "sites": [{"site": s.site, "gateways": s.gateways, "uptime_pct": s.pct}
                      for s in self.sites],
            "gateways": [{"gateway": g.gateway, "site": g.site, "uptime_pct": g.pct,
                          "online_s": g.online_ms / 1000, "known_s": g.known_ms / 1000}
                         for g in self.gateways],
            "incidents": [{"rule": i.rule, "severity": i.severity, "count": i.count}
                          for i in self.incidents],
            "incidents_total": self.incidents_total, "acknowledged": self.acknowledged,
            "resolved": self.resolved, "mtta_s": self.mtta_s, "mttr_s": self.mttr_s,
            "per_day": [{"day": d.day, "incidents": d.incidents, "critical": d.critical,
                         "mtta_s": d.mtta_s, "mttr_s": d.mttr_s} for d in self.per_day],
            "provisioned": dict(self.provisioned),
            "provisioned_total": sum(self.provisioned.values()),
            "devices_total": self.devices_total, "devices_active": self.devices_active,
        }


def _uptimes(changes: Sequence[PresenceChange], gateways: Iterable[str], sites: Mapping[str, str],
             start_ms: int, end_ms: int) -> tuple[tuple[GatewayUptime, ...], tuple[SiteUptime, ...]]:
    by_gateway: dict[str, list[tuple[int, bool]]] = {gateway: [] for gateway in gateways}
    for change in changes:
        by_gateway.setdefault(change.gateway, []).append(
            (change.changed_ms, change.state == "online"))
    per_gateway = tuple(
        GatewayUptime(gateway, sites.get(gateway, UNASSIGNED),
                      *online_ms(history, start_ms=start_ms, end_ms=end_ms))
        for gateway, history in sorted(by_gateway.items()))
    grouped: dict[str, list[GatewayUptime]] = defaultdict(list)
    for uptime in per_gateway:
        grouped[uptime.site].append(uptime)
    per_site = tuple(
        SiteUptime(site, len(members), sum(m.online_ms for m in members),
                   sum(m.known_ms for m in members))
        for site, members in sorted(grouped.items()))
    return per_gateway, per_site


def _per_day(incidents: Sequence[Incident], start_ms: int, end_ms: int) -> tuple[DayFigures, ...]:
    def inside(at_ms: int | None, day_ms: int) -> bool:
        return (at_ms is not None and max(day_ms, start_ms) <= at_ms
                < min(day_ms + DAY_MS, end_ms))

    days = []
    for day_ms in day_starts(start_ms, end_ms):
        opened = [i for i in incidents if inside(i.triggered_ms, day_ms)]
        acked = [i.acknowledged_ms - i.triggered_ms for i in incidents
                 if i.acknowledged_ms is not None and inside(i.acknowledged_ms, day_ms)]
        fixed = [i.resolved_ms - i.triggered_ms for i in incidents
                 if i.resolved_ms is not None and inside(i.resolved_ms, day_ms)]
        days.append(DayFigures(day_ms, len(opened),
                               sum(1 for i in opened if i.severity == "critical"),
                               mean_seconds(acked), mean_seconds(fixed)))
    return tuple(days)


def build_report(*, start_ms: int, end_ms: int, changes: Sequence[PresenceChange],
                 incidents: Sequence[Incident], provisions: Sequence[StoredEvent],
                 devices: Sequence[DeviceRecord]) -> Report:
    """The management summary of ``[start_ms, end_ms)``.

    Args:
        start_ms: window start (epoch ms, inclusive).
        end_ms: window end (exclusive), normally now.
        changes: the whole presence log (older changes set the state the window starts in).
        incidents: incidents that may touch the window (others are ignored).
        provisions: provision events, any time (older ones still name sites).
        devices: the device registry.

    Returns:
        The figures; a gateway in the registry that never announced its presence is listed with
        no uptime rather than counted as down.
    """
    sites = sites_of(provisions)
    gateways = {d.gateway for d in devices if d.device == d.gateway}
    per_gateway, per_site = _uptimes(changes, gateways, sites, start_ms, end_ms)

    def inside(at_ms: int | None) -> bool:
        return at_ms is not None and start_ms <= at_ms < end_ms

    opened = [i for i in incidents if inside(i.triggered_ms)]
    by_kind = Counter((i.rule, i.severity) for i in opened)
    acked = [i.acknowledged_ms - i.triggered_ms for i in incidents
             if i.acknowledged_ms is not None and inside(i.acknowledged_ms)]
    fixed = [i.resolved_ms - i.triggered_ms for i in incidents
             if i.resolved_ms is not None and inside(i.resolved_ms)]
    added = Counter(str(e.data.get("kind") or "unknown") for e in provisions
                    if inside(e.time_ms) and e.data.get("action") == "added")
    return Report(
        start_ms=start_ms, end_ms=end_ms, sites=per_site, gateways=per_gateway,
        incidents=tuple(IncidentCount(rule, severity, count) for (rule, severity), count
                        in sorted(by_kind.items(), key=lambda item: (-item[1], item[0]))),
        incidents_total=len(opened), acknowledged=len(acked), resolved=len(fixed),
        mtta_s=mean_seconds(acked), mttr_s=mean_seconds(fixed),
        per_day=_per_day(incidents, start_ms, end_ms),
        provisioned=dict(sorted(added.items())),
        devices_total=len(devices),
        devices_active=sum(1 for d in devices if d.last_seen_ms >= start_ms),
    )
