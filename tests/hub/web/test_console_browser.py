"""The console in Debian's chromium against a real hub (build_hub) and a real Mosquitto: a care
alarm published through the broker becomes an incident that an operator acknowledges from the
incident page on a phone; a viewer cannot; logins are refused and rate limited. Every page is
saved as a screenshot at 390x844 and 1280x800 (build/test-artifacts/screenshots/console-*)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from careflow.hub.web.auth import SESSION_COOKIE, hash_password
from tests.conftest import (
    DESKTOP,
    PHONE,
    HttpReceiver,
    Mosquitto,
    RunningHub,
    make_settings,
    screenshot,
    wait_until,
)
from tests.hub.conftest import publish, publish_raw

pytestmark = pytest.mark.broker

PASSWORD = "correct horse battery"
HOSTILE = "<script>document.title='owned'</script>"
RULES = """
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {state: raised}
    severity: critical
    summary: "CARE ALARM {device}"
  - name: battery-low
    kind: threshold
    field: battery_pct
    op: "<"
    value: 20
    summary: "Battery low on {device}"
"""


class Console:
    """A running hub with its web, two care alarms, a low battery, a dead letter and users."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        assert hub.hub.web is not None
        self.url = hub.hub.web.url
        self.alarms = {i.device: i.id for i in hub.store.incidents() if i.rule == "care-alarm"}


def _incidents_ready(hub: RunningHub) -> bool:
    return len({i.rule for i in hub.store.incidents()}) == 2 and len(
        [i for i in hub.store.incidents() if i.rule == "care-alarm"]) == 2


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """One hub for the module (each test logs in with its own browser context)."""
    workdir = tmp_path_factory.mktemp("console")
    broker = Mosquitto(workdir)
    broker.start()
    (workdir / "rules.yaml").write_text(RULES)
    receiver = HttpReceiver()  # the channels' messages show in the incidents' timelines
    channels = load_channels({f"CAREFLOW_CHANNEL_{name.upper()}":
                              f"json://127.0.0.1:{receiver.port}/{name}"
                              for name in ("oncall", "ops")})
    hub = RunningHub(make_settings(workdir / "data", broker.url),
                     load_rules([workdir / "rules.yaml"]), channels=channels, web=True).start()
    try:
        hashed = hash_password(PASSWORD)
        hub.store.add_user("olga", role="operator", password_hash=hashed, at_ms=1)
        hub.store.add_user("vik", role="viewer", password_hash=hashed, at_ms=1)
        hub.store.add_user("tess", role="viewer", password_hash=hashed, at_ms=1)
        gateway = Stamper(gateway="gw-elm-01")
        publish(broker, [
            gateway.stamp("provision", {"action": "added", "kind": "gateway",
                                        "labels": {"site": "Elm House"}}),
            gateway.stamp("heartbeat", {"interval_s": 60, "firmware": "2.4.1"}),
            Stamper(gateway="gw-elm-01", device="door-3").stamp(
                "status", {"state": "degraded", "battery_pct": 9, "firmware": HOSTILE}),
            Stamper(gateway="gw-elm-01", device="fall-1").stamp(
                "alert", {"kind": "fall", "state": "raised", "message": HOSTILE}),
            Stamper(gateway="gw-oak-02").stamp("heartbeat", {"interval_s": 1}),  # soon offline
            Stamper(gateway="gw-oak-02", device="sos-2").stamp(
                "alert", {"kind": "sos", "state": "raised"}),
        ])
        publish_raw(broker, [("careflow/v1/gw-elm-01/door-3/status", b'{"not": "an event"')])
        wait_until(lambda: _incidents_ready(hub) and hub.store.dead_letter_count() >= 1
                   and len(receiver.bodies) >= 1,
                   what="two care alarms (announced together), a low battery and a dead letter")
        hub.store.pause("gw-elm-01", "fall-1", until_ms=clock.now_ms() + 3_600_000,
                        reason="battery swap")
        yield Console(hub)
    finally:
        hub.stop()
        broker.stop()
        receiver.close()


def log_in(page: Any, console: Console, name: str = "olga", password: str = PASSWORD,
           path: str = "/") -> Any:
    """Open ``path``, get sent to the login form, fill it in; the response of the submit."""
    page.goto(f"{console.url}{path}")
    assert "/login" in page.url
    page.fill("#name", name)
    page.fill("#password", password)
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    return navigation.value


def test_a_wrong_password_is_refused_and_the_name_is_rate_limited(
        console: Console, page_at: Any) -> None:
    for viewport, size in ((PHONE, "phone"), (DESKTOP, "desktop")):
        page = page_at(viewport)
        page.goto(f"{console.url}/login")
        screenshot(page, f"console-login-{size}")
    page = page_at(PHONE)
    answer = log_in(page, console, "tess", "not the password")
    assert answer.status == 401
    assert "Wrong name or password" in page.inner_text("main")
    for _ in range(4):  # five failures in all
        page.fill("#password", "still not it")
        with page.expect_navigation() as navigation:
            page.click("button[type=submit]")
        assert navigation.value.status == 401
    page.fill("#password", PASSWORD)  # the right one, too late
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    assert navigation.value.status == 429
    assert "Too many failed logins for tess" in page.inner_text("main")
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    screenshot(page, "console-login-rate-limited-phone")


@pytest.mark.parametrize(("viewport", "size"), [(PHONE, "phone"), (DESKTOP, "desktop")])
def test_every_page_renders_and_is_saved(console: Console, page_at: Any,
                                         viewport: dict[str, int], size: str) -> None:
    page = page_at(viewport)
    assert log_in(page, console, "vik").status == 200
    assert page.url == f"{console.url}/"
    main = page.inner_text("main")
    assert "Elm House" in main and "unassigned" in main and "door-3" in main
    assert "battery swap" in main  # paused: shown first, with why
    assert "2 active incidents" not in main  # three: two alarms and a battery
    assert "3 active incidents" in main
    assert page.title() != "owned"  # device text is never run
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], f"fleet page scrolls sideways at {size}"
    screenshot(page, f"console-fleet-{size}")

    pages = {
        "incidents": "/incidents",
        "incident": f"/incidents/{console.alarms['sos-2']}",
        "device": "/devices/gw-elm-01/door-3",
        "deadletters": "/deadletters",
        "health": "/health",
    }
    for name, path in pages.items():
        answer = page.goto(f"{console.url}{path}")
        assert answer is not None and answer.status == 200, path
        assert page.title() != "owned"
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], (
            f"{name} scrolls sideways at {size}")
        screenshot(page, f"console-{name}-{size}")
    page.goto(f"{console.url}/devices/gw-elm-01/door-3")
    assert HOSTILE in page.inner_text("main")  # shown as the text it is
    page.goto(f"{console.url}/deadletters")
    assert '{"not": "an event"' in page.inner_text("main")


def test_an_operator_acknowledges_from_the_incident_page_on_a_phone(
        console: Console, page_at: Any) -> None:
    page = page_at(PHONE)
    incident_id = console.alarms["fall-1"]
    assert log_in(page, console, path=f"/incidents/{incident_id}").status == 200
    assert page.url == f"{console.url}/incidents/{incident_id}"  # back where it was asked for
    cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
    assert "CARE ALARM fall-1" in page.inner_text("h1")
    with page.expect_navigation():
        page.click("button:has-text('Acknowledge')")
    assert page.url.endswith(f"/incidents/{incident_id}?done=acknowledged")
    assert "Incident acknowledged." in page.inner_text("main")
    timeline = page.inner_text("ol.timeline")
    assert re.search(r"Acknowledged\s+by olga via console", timeline), timeline
    assert "Triggered" in timeline and "Alert to oncall: sent" in timeline
    incident = console.hub.store.incident(incident_id)
    assert incident is not None and incident.state == "acknowledged"
    assert incident.acknowledged_by == "olga"
    assert [(a.action, a.by, a.via) for a in console.hub.store.incident_actions(incident_id)] \
        == [("acknowledge", "olga", "console")]
    assert page.locator("form[action$='/acknowledge']").count() == 0  # only Resolve is left
    screenshot(page, "console-incident-acknowledged-phone")

    # the same form posted without its CSRF token is refused, and changes nothing
    refused = page.request.post(f"{console.url}/incidents/{incident_id}/resolve",
                                form={"note": "no token"})
    assert refused.status == 403
    assert console.hub.store.incident(incident_id).state == "acknowledged"  # type: ignore[union-attr]


def test_a_viewer_sees_no_buttons_and_a_forged_acknowledge_is_refused(
        console: Console, page_at: Any) -> None:
    page = page_at(DESKTOP)
    incident_id = console.alarms["sos-2"]
    assert log_in(page, console, "vik", path=f"/incidents/{incident_id}").status == 200
    assert page.locator("form[action$='/acknowledge']").count() == 0
    assert "You are a viewer" in page.inner_text("main")
    csrf = page.get_attribute("form.logout input[name=csrf]", "value")  # the viewer's own token
    assert csrf
    forged = page.request.post(f"{console.url}/incidents/{incident_id}/acknowledge",
                               form={"csrf": csrf})
    assert forged.status == 403 and "viewers cannot change incidents" in forged.text()
    assert console.hub.store.incident(incident_id).state == "open"  # type: ignore[union-attr]
    assert console.hub.store.incident_actions(incident_id) == []


def test_the_session_cookie_is_secure_behind_https(tmp_path: Path, mosquitto: Mosquitto,
                                                  page_at: Any) -> None:
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url,
                                   CAREFLOW_PUBLIC_URL="https://care.example.org"),
                     web=True).start()
    try:
        hub.store.add_user("olga", role="operator", password_hash=hash_password(PASSWORD),
                           at_ms=1)
        page = page_at(PHONE)
        assert log_in(page, Console(hub)).status == 200  # chromium keeps it on 127.0.0.1
        cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    finally:
        hub.stop()
