"""The console's pure shaping: an incident's timeline, the fleet by site."""

from __future__ import annotations

from careflow.hub.fleet.presence import PresenceRecord, State
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.store.records import (
    DeviceRecord,
    Incident,
    IncidentAction,
    IncidentState,
    Notification,
    NotificationKind,
    NotificationState,
    Severity,
)
from careflow.hub.web import views

NOW = 1_790_000_000_000


def _incident(**changes: object) -> Incident:
    base: dict[str, object] = {
        "id": 7, "rule": "care-alarm", "gateway": "gw-1", "device": "fall-1",
        "severity": Severity.CRITICAL, "state": IncidentState.ACKNOWLEDGED,
        "summary": "CARE ALARM fall-1", "detail": "", "triggered_ms": 1_000,
        "acknowledged_ms": 5_000, "acknowledged_by": "olga", "resolved_ms": None,
        "resolved_by": None}
    return Incident(**{**base, **changes})  # type: ignore[arg-type]


def _note(created: int, sent: int | None, state: NotificationState, error: str | None = None,
          attempts: int = 1) -> Notification:
    return Notification(1, 7, "oncall", NotificationKind.FIRING, "[CRITICAL] fall-1", "b",
                        state, attempts, 0, error, created, sent)


def test_the_timeline_merges_messages_and_actions_in_time_order_once_each() -> None:
    entries = views.timeline(
        _incident(raises=2, last_raised_ms=3_000),
        [IncidentAction(1, 7, 5_000, "acknowledge", "olga", "console", "")],
        [_note(1_000, 1_200, NotificationState.SENT),
         _note(3_000, None, NotificationState.PENDING, "HTTP 503", attempts=3)])
    assert [(e.at_ms, e.what) for e in entries] == [
        (1_000, "Triggered"), (1_000, "Alert to oncall: sent"),
        (3_000, "Raised again (2 raises)"), (3_000, "Alert to oncall: pending"),
        (5_000, "Acknowledged")]
    assert entries[-1].who == "olga via console"  # not a second, record-only "Acknowledged"
    assert entries[3].detail == "[CRITICAL] fall-1 (HTTP 503), 3 attempts"


def test_an_acknowledgement_without_its_action_still_shows() -> None:
    entries = views.timeline(_incident(state=IncidentState.RESOLVED, resolved_ms=9_000,
                                       resolved_by="careflow (condition cleared)"), [],
                             [_note(1_000, 61_000, NotificationState.SENT)])
    assert [(e.what, e.who) for e in entries][-2:] == [
        ("Acknowledged", "olga"), ("Resolved", "careflow (condition cleared)")]
    assert entries[1].what == "Alert to oncall: sent 1m later"


def _device(gateway: str, device: str, seen_ago_ms: int, **facts: object) -> DeviceRecord:
    return DeviceRecord(gateway, device, NOW - 10**7, NOW - seen_ago_ms, 5, NOW, "heartbeat",
                        "b", 5, 0, 0, dict(facts))


def test_the_fleet_puts_sites_by_name_unassigned_last_and_problems_first() -> None:
    book = SiteBook(sites={"gw-1": "Oak", "gw-2": "Elm"})
    sites = views.fleet(
        [_device("gw-1", "gw-1", 1_000, interval_s=60),
         _device("gw-1", "door", 1_000, battery_pct=12),
         _device("gw-1", "fall", 1_000, labels={"site": "Ash"}),
         _device("gw-2", "gw-2", 500_000, interval_s=60),
         _device("gw-3", "gw-3", 1_000)],
        now_ms=NOW, presence={"gw-3": PresenceRecord("gw-3", "offline", 1, "b", NOW, "lwt")},
        paused={("gw-1", "gw-1"): (NOW + 60_000, "battery swap")}, sites=book)
    assert [s.name for s in sites] == ["Ash", "Elm", "Oak", "unassigned"]
    oak = sites[2]
    assert [(r.device, r.state) for r in oak.rows] == [("gw-1", State.PAUSED),
                                                       ("door", State.ONLINE)]
    assert [r.device for r in oak.attention] == ["gw-1", "door"]  # paused; a low battery
    assert oak.counts == {"paused": 1, "online": 1}
    assert oak.rows[0].why.endswith("battery swap")
    assert sites[1].rows[0].state is State.OFFLINE and sites[3].rows[0].state is State.OFFLINE
    assert sites[0].fine and not sites[0].attention


def test_control_characters_are_made_visible() -> None:
    assert views.visible("a\x1b[2Jb\u202ec\n") == "a\\x1b[2Jb\\u202ec\n"
    assert views.compact_json({"k": "x" * 300}, limit=20).endswith("…")
