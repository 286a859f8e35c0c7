"""The console over a real SQLite store, through Starlette's test client: nothing but the public
paths without a login, every POST behind its CSRF token, viewers only read, the login limiter,
the trusted proxy header, and device text shown as text."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from starlette.routing import Route
from starlette.testclient import TestClient

from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import Rejected
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.web.app import WebDeps, create_app
from careflow.hub.web.auth import SESSION_COOKIE, hash_password, token_hash
from careflow.hub.web.console import PUBLIC_PATHS, PUBLIC_PREFIXES
from tests.conftest import make_settings, store_event

PASSWORD = "correct horse battery"
NOW = 1_790_000_000_000
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@dataclass
class Clock:
    now_ms: int = NOW

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class Console:
    """An app over a store in tmp_path, a clock the test moves, and two users."""

    store: SqliteStore
    clock: Clock
    app: Any
    woken: list[int] = field(default_factory=list)

    def client(self, **kwargs: Any) -> TestClient:
        return TestClient(self.app, follow_redirects=False, **kwargs)

    def login(self, name: str = "olga", password: str = PASSWORD,
              client: TestClient | None = None) -> TestClient:
        client = client or self.client()
        form = client.get("/login")
        response = client.post("/login", data={"name": name, "password": password,
                                               "csrf": csrf_of(form.text)})
        assert response.status_code == 303, response.text
        return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found[1]


def _console(tmp_path: Path, **env: str) -> Iterator[Console]:
    settings = make_settings(tmp_path / "data", None, **env)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(settings.db_path, synchronous="normal")
    clock = Clock()
    woken: list[int] = []
    deps = WebDeps(settings=settings, store=store, link_key=b"k" * 32,
                   readiness=lambda: {"broker": None, "store": None},
                   health=lambda: {"connected": True, "broker": "mqtt://127.0.0.1:1883",
                                   "events_stored": 3, "last_error": HOSTILE,
                                   "digests": {"errors": 2, "failing_since_ms": NOW,
                                               "last_error": "disk I/O error"},
                                   "rules_in_force": [f"battery-low muted until 2026-11-30 "
                                                      f"14:00 UTC by ana: {HOSTILE}"]},
                   now_ms=clock, wake_sender=lambda: woken.append(1))
    hashed = hash_password(PASSWORD)
    store.add_user("olga", role="operator", password_hash=hashed, at_ms=NOW)
    store.add_user("vik", role="viewer", password_hash=hashed, at_ms=NOW)
    yield Console(store, clock, create_app(deps), woken)
    store.close()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from _console(tmp_path)


def _incident(store: SqliteStore, summary: str = "CARE ALARM fall-1") -> int:
    incident_id = store.open_incident(rule="care-alarm", gateway="gw-1", device="fall-1",
                                      severity="critical", summary=summary, detail=HOSTILE,
                                      at_ms=NOW - 60_000, notify=[("oncall", summary, "b")])
    assert incident_id is not None
    return incident_id


def _fill(path: str) -> str:
    return re.sub(r"\{(\w+)(:int)?(:\w+)?\}", lambda m: "1" if m[2] else "x", path)


def test_nothing_but_the_public_paths_answers_without_a_login(console: Console) -> None:
    _incident(console.store)
    client = console.client()
    checked = 0
    for route in console.app.routes:
        assert isinstance(route, Route)
        if route.path in PUBLIC_PATHS or route.path.startswith(PUBLIC_PREFIXES):
            continue
        for method in sorted(route.methods or {"GET"}):
            if method == "HEAD":
                continue
            response = client.request(method, _fill(route.path))
            checked += 1
            if method == "GET":
                assert response.status_code == 303, (method, route.path)
                assert response.headers["location"].startswith("/login?next=")
            else:
                assert response.status_code == 403, (method, route.path)
            assert "CARE ALARM" not in response.text
    assert checked >= 8


def test_a_wrong_password_is_refused_and_a_right_one_starts_a_session(console: Console) -> None:
    client = console.client()
    token = csrf_of(client.get("/login").text)
    wrong = client.post("/login", data={"name": "olga", "password": "nope", "csrf": token})
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    unknown = client.post("/login", data={"name": "nobody", "password": PASSWORD,
                                          "csrf": token})
    assert unknown.status_code == 401 and "Wrong name or password" in unknown.text
    right = client.post("/login", data={"name": "olga", "password": PASSWORD, "csrf": token,
                                        "next": "/incidents"})
    assert right.status_code == 303 and right.headers["location"] == "/incidents"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    token_value = client.cookies[SESSION_COOKIE]
    session = console.store.session(token_hash(token_value), now_ms=NOW)
    assert session is not None and session.user == "olga"
    assert console.store.session(token_value, now_ms=NOW) is None  # kept by hash only
    page = client.get("/incidents")
    assert page.status_code == 200 and "olga · operator" in page.text
    assert "script-src" not in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_the_login_form_needs_its_csrf_token_and_next_stays_on_this_site(
        console: Console) -> None:
    client = console.client()
    client.get("/login")
    forged = client.post("/login", data={"name": "olga", "password": PASSWORD})
    assert forged.status_code == 403 and SESSION_COOKIE not in client.cookies
    other = console.client()
    stolen = other.post("/login", data={"name": "olga", "password": PASSWORD,
                                        "csrf": csrf_of(client.get("/login").text)})
    assert stolen.status_code == 403  # a token without its cookie
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example",
                   "/\t/evil.example", "/\n/evil.example", "/login?next=/login"):
        client = console.client()
        token = csrf_of(client.get("/login").text)
        went = client.post("/login", data={"name": "olga", "password": PASSWORD,
                                           "csrf": token, "next": target})
        assert went.headers["location"] == "/", target


def test_five_failures_refuse_the_name_from_that_address_for_fifteen_minutes(
        console: Console) -> None:
    client = console.client()
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        assert client.post("/login", data={"name": "olga", "password": "nope",
                                           "csrf": token}).status_code == 401
    refused = client.post("/login", data={"name": "olga", "password": PASSWORD, "csrf": token})
    assert refused.status_code == 429 and SESSION_COOKIE not in client.cookies
    assert refused.headers["retry-after"] == "900"
    assert "Try again at" in refused.text and "(in 15 min)" in refused.text
    assert client.post("/login", data={"name": "vik", "password": PASSWORD,
                                       "csrf": token}).status_code == 303  # another name
    console.clock.now_ms += 15 * 60_000
    console.login(client=console.client())


def test_a_new_ipv6_address_of_the_same_64_gets_no_new_tries(console: Console) -> None:
    for n in range(5):
        client = console.client(client=(f"2001:db8:7:7::{n + 1}", 40000))
        token = csrf_of(client.get("/login").text)
        assert client.post("/login", data={"name": "olga", "password": "nope",
                                           "csrf": token}).status_code == 401
    client = console.client(client=("2001:db8:7:7:abcd::9", 40000))
    token = csrf_of(client.get("/login").text)
    assert client.post("/login", data={"name": "olga", "password": PASSWORD,
                                       "csrf": token}).status_code == 429
    console.login(client=console.client(client=("2001:db8:7:8::1", 40000)))  # another /64


def test_an_operator_acknowledges_and_resolves_with_the_timeline_kept(
        console: Console) -> None:
    incident_id = _incident(console.store)
    client = console.login()
    page = client.get(f"/incidents/{incident_id}")
    assert page.status_code == 200 and "Acknowledge" in page.text
    csrf = csrf_of(page.text)
    assert client.post(f"/incidents/{incident_id}/acknowledge").status_code == 403  # no token
    assert client.post(f"/incidents/{incident_id}/acknowledge",
                       data={"csrf": "x" * 43}).status_code == 403
    assert console.store.incident(incident_id).state == "open"  # type: ignore[union-attr]
    done = client.post(f"/incidents/{incident_id}/acknowledge", data={"csrf": csrf, "seen": "1"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/incidents/{incident_id}?done=acknowledged"
    incident = console.store.incident(incident_id)
    assert incident is not None and incident.state == "acknowledged"
    assert incident.acknowledged_by == "olga"
    (action,) = console.store.incident_actions(incident_id)
    assert (action.action, action.by, action.via, action.at_ms) == (
        "acknowledge", "olga", "console", NOW)
    again = client.post(f"/incidents/{incident_id}/acknowledge",
                        data={"csrf": csrf, "seen": "1"})
    assert again.status_code == 409 and "Not acknowledged" in again.text
    assert len(console.store.incident_actions(incident_id)) == 1  # nothing recorded
    shown = client.get(done.headers["location"]).text
    assert "Incident acknowledged." in shown and "olga via console" in shown
    assert "Alert to oncall" in shown  # the message queued when it fired
    assert client.post(f"/incidents/{incident_id}/resolve",
                       data={"csrf": csrf, "seen": "1"}).status_code == 303
    assert console.store.incident(incident_id).state == "resolved"  # type: ignore[union-attr]
    assert console.woken


def test_it_refuses_to_act_on_an_alarm_raised_again_since_the_page_showed_it(
        console: Console) -> None:
    """The page's button acts on the raises it showed: a raise after it is a new emergency
    the operator has not seen, and acknowledging it unseen would stop its escalation."""
    incident_id = _incident(console.store)
    client = console.login()
    page = client.get(f"/incidents/{incident_id}")
    csrf = csrf_of(page.text)
    assert 'name="seen" value="1"' in page.text
    assert console.store.raise_again(incident_id, at_ms=NOW, detail="fell again")
    for action in ("acknowledge", "resolve"):
        stale = client.post(f"/incidents/{incident_id}/{action}",
                            data={"csrf": csrf, "seen": "1"})
        assert stale.status_code == 409 and "raised again" in stale.text, action
        assert 'name="seen" value="2"' in stale.text  # the page shows the new raise
        for seen in ({}, {"seen": ""}, {"seen": "0"}, {"seen": "x"}):
            assert client.post(f"/incidents/{incident_id}/{action}",
                               data={"csrf": csrf, **seen}).status_code == 409
    assert console.store.incident(incident_id).state == "open"  # type: ignore[union-attr]
    assert console.store.incident_actions(incident_id) == []
    done = client.post(f"/incidents/{incident_id}/acknowledge",
                       data={"csrf": csrf, "seen": "2"})
    assert done.status_code == 303
    assert console.store.incident(incident_id).state == "acknowledged"  # type: ignore[union-attr]


def test_an_incident_resolved_by_a_new_raise_points_to_the_new_incident(
        console: Console) -> None:
    """An acknowledged alarm raised again is closed and followed by a new incident: its page,
    and a button pressed on it, must send the operator there, not just say 'resolved'."""
    incident_id = _incident(console.store)
    client = console.login()
    csrf = csrf_of(client.get(f"/incidents/{incident_id}").text)
    console.store.acknowledge_incident(incident_id, by="kim", at_ms=NOW)
    newer = console.store.supersede_incident(incident_id, at_ms=NOW + 1, detail="fell again")
    assert newer is not None
    refused = client.post(f"/incidents/{incident_id}/resolve", data={"csrf": csrf, "seen": "1"})
    assert refused.status_code == 409
    for page in (refused, client.get(f"/incidents/{incident_id}")):
        assert "Raised again since" in page.text
        assert f'href="/incidents/{newer}">incident #{newer}</a> is open' in page.text
    assert "Raised again since" not in client.get(f"/incidents/{newer}").text
    console.store.resolve_incident(newer, by="kim", at_ms=NOW + 2)
    assert "Raised again since" not in client.get(f"/incidents/{incident_id}").text


def test_a_viewer_reads_but_a_forged_acknowledge_is_refused(console: Console) -> None:
    incident_id = _incident(console.store)
    client = console.login("vik")
    page = client.get(f"/incidents/{incident_id}")
    assert page.status_code == 200
    assert "/acknowledge" not in page.text and "You are a viewer" in page.text
    forged = client.post(f"/incidents/{incident_id}/acknowledge",
                         data={"csrf": csrf_of(page.text)})
    assert forged.status_code == 403 and "viewers cannot change incidents" in forged.text
    assert console.store.incident(incident_id).state == "open"  # type: ignore[union-attr]
    assert console.store.incident_actions(incident_id) == []


def test_logging_out_ends_the_session_and_a_removed_user_is_out_at_once(
        console: Console) -> None:
    client = console.login()
    csrf = csrf_of(client.get("/").text)
    token = client.cookies[SESSION_COOKIE]
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert console.store.session(token_hash(token), now_ms=NOW) is None
    client.cookies.set(SESSION_COOKIE, token)  # the old cookie, kept by someone
    assert client.get("/").status_code == 303
    other = console.login("vik")
    assert other.get("/").status_code == 200
    console.store.remove_user("vik")
    assert other.get("/").status_code == 303
    console.clock.now_ms += 12 * 3600 * 1000  # sessions end after 12 h
    assert console.login().get("/").status_code == 200
    late = console.login()
    console.clock.now_ms += 12 * 3600 * 1000 + 1
    assert late.get("/").status_code == 303


def test_a_password_changed_while_a_login_is_checked_starts_no_session(
        console: Console) -> None:
    """`users add --replace` (a stolen password) ends every session: also the one a login
    checked against the old hash was about to start, a check (Argon2) being slow."""
    import asyncio  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from starlette.requests import Request  # noqa: PLC0415

    def run(coroutine: Any) -> Any:
        with ThreadPoolExecutor(1) as thread:  # its own loop (playwright's may be running)
            return thread.submit(asyncio.run, coroutine).result(timeout=60)

    (login,) = (route for route in console.app.routes
                if isinstance(route, Route) and route.path == "/login")
    pages = login.endpoint.__self__  # the console's handlers
    checked = console.store.user("olga")  # what the login read before its check
    assert checked is not None
    console.store.add_user("olga", role="operator", password_hash=hash_password("new " * 4),
                           at_ms=NOW, replace=True)
    request = Request({"type": "http", "method": "POST", "path": "/login", "headers": [],
                       "query_string": b"", "scheme": "http", "server": ("hub", 80)})
    answer = run(pages._start_session(request, checked, None, "/"))
    assert answer.status_code == 401 and SESSION_COOKIE not in answer.headers.get(
        "set-cookie", "")
    renewed = run(pages._start_session(request, checked, hash_password(PASSWORD), "/"))
    assert renewed.status_code == 401  # nor is the old password put back
    assert console.store.user("olga").password_hash != checked.password_hash  # type: ignore[union-attr]
    console.store.remove_user("olga")
    assert run(pages._start_session(request, checked, None, "/")).status_code == 401
    assert console.store.user("olga") is None


def test_a_login_that_renews_a_weak_hash_keeps_the_users_other_sessions(
        console: Console) -> None:
    """The same password, stored with today's parameters: a nurse's other phone stays in."""
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(PASSWORD)
    console.store.add_user("olga", role="operator", password_hash=weak, at_ms=NOW, replace=True)
    console.store.start_session(token_hash("phone-token"), user="olga", csrf="c", at_ms=NOW,
                                expires_ms=NOW + 3_600_000)  # signed in while the hash is weak
    phone = console.client(cookies={SESSION_COOKIE: "phone-token"})
    assert phone.get("/").status_code == 200
    console.login()  # another device: this login renews the hash
    renewed = console.store.user("olga")
    assert renewed is not None and renewed.password_hash != weak
    assert phone.get("/").status_code == 200  # still signed in, not sent to /login


def test_device_text_is_shown_as_text_never_as_markup(console: Console) -> None:
    stamp = Stamper(gateway="gw-1", device="fall-1")
    store_event(console.store, Stamper(gateway="gw-1"), "provision",
                {"action": "added", "kind": "gateway", "labels": {"site": HOSTILE}}, NOW - 5000)
    store_event(console.store, stamp, "status",
                {"state": "degraded", "battery_pct": 9, "firmware": HOSTILE}, NOW - 4000)
    incident_id = _incident(console.store, summary=f"CARE ALARM {HOSTILE}")
    console.store.append(IncomingBatch(accepted=(), rejected=[(Rejected(
        topic="careflow/v1/gw-1/x/status", code="schema", reason=HOSTILE,
        payload=b"\x00\xff" + HOSTILE.encode()), NOW)]))
    client = console.login()
    pages = {path: client.get(path) for path in (
        "/", "/incidents", f"/incidents/{incident_id}", "/devices/gw-1/fall-1", "/deadletters",
        "/health")}
    for path, page in pages.items():
        assert page.status_code == 200, path
        assert "<script>" not in page.text and "<img" not in page.text, path
    for path in ("/incidents", f"/incidents/{incident_id}", "/devices/gw-1/fall-1",
                 "/deadletters", "/health"):
        assert "&lt;script&gt;" in pages[path].text, path
    assert "&lt;script&gt;" in pages["/"].text  # the site's name
    assert "\\x00" in pages["/deadletters"].text  # control bytes made visible
    assert "9%" in pages["/"].text and "badge offline" not in pages["/"].text
    assert "cannot be queued since" in pages["/health"].text
    assert "Rule quieted" in pages["/health"].text
    assert "battery-low muted until 2026-11-30 14:00 UTC by ana: &lt;script&gt;" in pages[
        "/health"].text
    assert f'href="/incidents/{incident_id}"' in pages["/devices/gw-1/fall-1"].text


def test_the_fleet_groups_devices_by_site_problems_first(console: Console) -> None:
    gw = Stamper(gateway="gw-1")
    store_event(console.store, gw, "provision",
                {"action": "added", "kind": "gateway", "labels": {"site": "Elm House"}},
                NOW - 600_000)
    store_event(console.store, gw, "heartbeat", {"interval_s": 60}, NOW - 10_000)
    store_event(console.store, Stamper(gateway="gw-2"), "heartbeat", {"interval_s": 60},
                NOW - 500_000)
    page = console.login().get("/").text
    elm, unassigned = page.index("Elm House"), page.index("unassigned")
    assert elm < unassigned
    assert "1 online" in page[elm:unassigned] and "1 offline" in page[unassigned:]
    assert "no heartbeat for 500s" in page


def test_the_fleet_learns_sites_from_new_provisions_only_never_scanning_the_whole_log(
        console: Console) -> None:
    """The event log has no index by type: a page reading every provision scanned millions of
    rows while holding the web's store connection, which the one-tap links wait for."""
    gw = Stamper(gateway="gw-1")
    store_event(console.store, gw, "provision",
                {"action": "added", "kind": "gateway", "labels": {"site": "Elm House"}},
                NOW - 600_000)
    client = console.login()
    assert "Elm House" in client.get("/").text
    store_event(console.store, gw, "provision",
                {"action": "added", "kind": "gateway", "labels": {"site": "Oak House"}},
                NOW - 500_000)
    store_event(console.store, Stamper(gateway="gw-1", device="fall-1"), "status",
                {"state": "ok"}, NOW - 400_000)
    read: list[str] = []
    console.store._conn.set_trace_callback(read.append)
    try:
        fleet, device = client.get("/").text, client.get("/devices/gw-1/fall-1").text
    finally:
        console.store._conn.set_trace_callback(None)
    assert "Oak House" in fleet and "Elm House" not in fleet
    assert "Oak House" in device
    scans = [sql for sql in read if "provision" in sql]
    assert scans and all(re.search(r"pos > \d+ AND pos <= \d+", sql) for sql in scans), scans
    assert all(int(m[1]) > 0 for sql in scans if (m := re.search(r"pos > (\d+)", sql))), scans


def test_a_devices_page_lists_its_active_incidents_however_many_others_are_active(
        console: Console) -> None:
    """In an outage hundreds of incidents are active at once: the device's own must show."""
    store_event(console.store, Stamper(gateway="gw-1", device="fall-1"), "status",
                {"state": "ok"}, NOW - 5000)
    incident_id = _incident(console.store)
    for n in range(501):  # newer, of other devices
        assert console.store.open_incident(rule="device-silent", gateway="gw-2",
                                           device=f"d{n}", severity="warning",
                                           summary="silent", detail="", at_ms=NOW,
                                           notify=[]) is not None
    page = console.login().get("/devices/gw-1/fall-1").text
    assert f'href="/incidents/{incident_id}"' in page


def test_unknown_incidents_and_devices_are_clear_pages(console: Console) -> None:
    client = console.login()
    assert client.get("/incidents/999").status_code == 404
    assert client.get("/devices/gw-9/x").status_code == 404
    csrf = csrf_of(client.get("/").text)
    gone = client.post("/incidents/999/acknowledge", data={"csrf": csrf})
    assert gone.status_code == 404 and "There is no incident 999" in gone.text
    assert client.post("/incidents/1/explode", data={"csrf": csrf}).status_code == 404
    huge = 2**63  # more than SQLite's integers: a clear page, not a server error
    assert client.get(f"/incidents/{huge}").status_code == 404
    assert client.post(f"/incidents/{huge}/acknowledge",
                       data={"csrf": csrf, "seen": "1"}).status_code == 404


def test_cookies_are_secure_behind_https(tmp_path: Path) -> None:
    for made in _console(tmp_path, CAREFLOW_PUBLIC_URL="https://care.example.org"):
        client = made.client(base_url="https://care.example.org")
        form = client.get("/login")
        assert "Secure" in form.headers["set-cookie"]
        done = client.post("/login", data={"name": "olga", "password": PASSWORD,
                                           "csrf": csrf_of(form.text)})
        assert done.status_code == 303
        session = next(c for c in done.headers.get_list("set-cookie")
                       if c.startswith(SESSION_COOKIE))
        assert "Secure" in session and "HttpOnly" in session and "SameSite=lax" in session


def test_behind_a_trusted_proxy_the_header_names_the_user(tmp_path: Path) -> None:
    for made in _console(tmp_path, CAREFLOW_AUTH_HEADER="X-Remote-User"):
        incident_id = _incident(made.store)
        client = made.client()
        assert client.get("/").status_code == 401  # the proxy named nobody
        stranger = client.get("/", headers={"X-Remote-User": "mallory"})
        assert stranger.status_code == 403 and "careflow users add mallory" in stranger.text
        viewer = client.get(f"/incidents/{incident_id}", headers={"X-Remote-User": "vik"})
        assert viewer.status_code == 200 and "Log out" not in viewer.text
        page = client.get(f"/incidents/{incident_id}", headers={"X-Remote-User": "olga"})
        csrf = csrf_of(page.text)
        assert client.post(f"/incidents/{incident_id}/acknowledge", data={"csrf": csrf},
                           headers={"X-Remote-User": "vik"}).status_code == 403
        assert client.post(f"/incidents/{incident_id}/acknowledge",
                           headers={"X-Remote-User": "olga"}).status_code == 403  # no token
        done = client.post(f"/incidents/{incident_id}/acknowledge",
                           data={"csrf": csrf, "seen": "1"}, headers={"X-Remote-User": "olga"})
        assert done.status_code == 303
        assert made.store.incident_actions(incident_id)[0].by == "olga"
        for twice in ([("X-Remote-User", "olga"), ("X-Remote-User", "vik")],
                      [("x-remote-user", "vik"), ("X-REMOTE-USER", "olga")]):
            doubled = client.get("/", headers=twice)  # a client's own and the proxy's
            assert doubled.status_code == 400 and "more than once" in doubled.text
        assert client.get("/", headers={"X-Remote-User": " "}).status_code == 401
        assert client.get("/", headers={"x-REMOTE-user": "vik"}).status_code == 200
        login = client.post("/login", data={"name": "olga", "password": PASSWORD})
        assert SESSION_COOKIE not in login.headers.get("set-cookie", "")  # no passwords here


def test_a_body_longer_than_any_form_is_refused_unread(console: Console) -> None:
    client = console.login()
    csrf = csrf_of(client.get("/").text)
    incident_id = _incident(console.store)
    huge = client.post(f"/incidents/{incident_id}/acknowledge",
                       data={"csrf": csrf, "pad": "x" * 20_000})
    assert huge.status_code == 413
    assert console.store.incident(incident_id).state == "open"  # type: ignore[union-attr]
    assert console.client().post("/login", data={"name": "x" * 20_000}).status_code == 413


def test_a_proxy_header_on_a_public_address_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for _ in _console(tmp_path, CAREFLOW_AUTH_HEADER="X-Remote-User",
                      CAREFLOW_HTTP_LISTEN="0.0.0.0:0"):
        assert "listen only where the proxy alone reaches the hub" in caplog.text
    caplog.clear()
    for _ in _console(tmp_path / "again", CAREFLOW_AUTH_HEADER="X-Remote-User"):
        assert "CAREFLOW_AUTH_HEADER" not in caplog.text


def _flood(console: Console, logins: list[tuple[str, str, str]]) -> list[int]:
    """POST these (client address, name, password) logins all at once; their statuses."""
    import asyncio  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    import httpx2  # noqa: PLC0415

    async def flood() -> list[int]:
        clients = {address: httpx2.AsyncClient(transport=httpx2.ASGITransport(
            app=console.app, client=(address, 40000)), base_url="http://hub")
            for address, _, _ in logins}
        try:
            tokens = {address: csrf_of((await client.get("/login")).text)
                      for address, client in clients.items()}
            answers = await asyncio.gather(*(
                clients[address].post("/login", data={"name": name, "password": password,
                                                      "csrf": tokens[address]})
                for address, name, password in logins))
        finally:
            for client in clients.values():
                await client.aclose()
        return [answer.status_code for answer in answers]

    with ThreadPoolExecutor(1) as thread:  # its own event loop (playwright's may be running)
        return thread.submit(asyncio.run, flood()).result(timeout=120)


def test_a_flood_of_logins_waits_its_turn_a_few_at_a_time_or_is_told_to_come_back(
        console: Console) -> None:
    """Argon2 takes 64 MiB a check: forty at once would take 2.5 GB of the hub's memory."""
    statuses = _flood(console, [(f"10.0.{n}.1", f"user{n}", "wrong") for n in range(40)])
    assert statuses.count(401) <= 2 + 16 and statuses.count(503) >= 40 - 2 - 16
    assert set(statuses) == {401, 503}


def test_one_client_flooding_the_login_cannot_keep_an_operator_out(console: Console) -> None:
    """The queue of password checks is shared: one address holds at most two places in it,
    so an operator logging in during an emergency is not told to come back later."""
    statuses = _flood(console, [*(("203.0.113.9", f"user{n}", "wrong") for n in range(40)),
                                ("10.1.1.1", "olga", PASSWORD)])
    assert statuses[-1] == 303
    assert statuses[:-1].count(401) <= 2 and set(statuses[:-1]) == {401, 503}
