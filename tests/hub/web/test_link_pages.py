"""The one-tap link pages (Starlette's TestClient over a real SQLite store): GET shows and
changes nothing, only a POST with the page's CSRF field acts, once, and lands in the timeline."""

from __future__ import annotations

import re
import threading
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient

from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.web.app import WebDeps, create_app
from careflow.hub.web.link_pages import MAX_NAME, SILENCE_MS, act, typed_name
from careflow.hub.web.links import LinkAction, LinkClaim, csrf_token, sign
from tests.conftest import make_settings

KEY = b"k" * 64
NOW = 1_800_000_000_000
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
HIDDEN = re.compile(r'<input type="hidden" name="([a-z]+)" value="([^"]*)">')


def fields(page: str) -> dict[str, str]:
    """The hidden fields of a link's page, which its button posts."""
    found = dict(HIDDEN.findall(page))
    assert "csrf" in found, page
    return found


class Web:
    """The web app over a store with one open care alarm, at a fixed time."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(tmp_path / "db")
        incident = self.store.open_incident(
            rule="care-alarm", gateway="gw-1", device="fall-1", severity="critical",
            summary="CARE ALARM fall-1", detail="fall detected", at_ms=NOW - 300_000)
        assert incident is not None
        self.incident = incident
        self.wakes = 0
        self.now_ms = NOW
        deps = WebDeps(settings=make_settings(tmp_path / "data", None), store=self.store,
                       link_key=KEY, readiness=dict, health=dict, now_ms=lambda: self.now_ms,
                       wake_sender=self._wake)
        self.client = TestClient(create_app(deps))

    def _wake(self) -> None:
        self.wakes += 1

    def link(self, action: LinkAction = LinkAction.ACKNOWLEDGE, *, link_id: str = "L" * 16,
             expires_ms: int = NOW + 3_600_000, incident: int | None = None) -> str:
        token = sign(KEY, incident_id=incident or self.incident, action=action,
                     channel="oncall", expires_ms=expires_ms, link_id=link_id)
        return f"/l/{token}"

    def confirm(self, path: str, name: str = "") -> tuple[int, str]:
        """Open the link's page and press its button, as a person does."""
        page = self.client.get(path)
        assert page.status_code == 200, page.text
        answer = self.client.post(path, data={**fields(page.text), "name": name})
        return answer.status_code, answer.text


@pytest.fixture
def web(tmp_path: Path) -> Web:
    return Web(tmp_path)


def test_it_shows_what_a_link_will_do_and_a_get_changes_nothing(web: Web) -> None:
    for _ in range(3):  # a mail scanner, a chat preview, the person
        page = web.client.get(web.link())
        assert page.status_code == 200
    assert "Acknowledge?" in page.text and "CARE ALARM fall-1" in page.text
    assert "gw-1 / fall-1" in page.text and "5 min ago" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-robots-tag"].startswith("noindex")
    assert page.headers["referrer-policy"] == "no-referrer"
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "open"
    assert web.store.link_spent("L" * 16) is None
    assert web.store.incident_actions(web.incident) == [] and web.wakes == 0


def test_it_acknowledges_once_and_records_who_by_which_link(web: Web) -> None:
    status, text = web.confirm(web.link(), name="  Nurse\x00 Kari ")
    assert status == 200 and "Acknowledged: incident" in text
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "acknowledged"
    assert incident.acknowledged_by == "Nurse Kari" and incident.acknowledged_ms == NOW
    (entry,) = web.store.incident_actions(web.incident)
    assert (entry.action, entry.by, entry.via, entry.at_ms) == (
        "acknowledge", "Nurse Kari", "link", NOW)
    assert entry.detail == f"link {'L' * 16} sent to oncall"
    assert web.wakes == 1
    again = web.client.get(web.link())
    assert again.status_code == 410 and "already used" in again.text


def test_it_names_the_channel_when_no_name_is_typed(web: Web) -> None:
    web.confirm(web.link(), name=" \u200b\t")  # nothing visible typed
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.acknowledged_by == "oncall"
    (entry,) = web.store.incident_actions(web.incident)
    assert (entry.by, entry.via) == ("oncall", "link")
    assert typed_name("x" * 500, "oncall") == "x" * 60


@given(st.text(max_size=300))
def test_a_typed_name_is_one_short_line_that_reads_as_it_shows(given_name: str) -> None:
    """Shown in the timeline, the console, the CLI and later messages ("the previous raise was
    acknowledged by ..."): no control or invisible formatting characters (a right-to-left
    override makes one name read as another's), at most MAX_NAME characters, never empty."""
    name = typed_name(given_name, "oncall")
    assert 0 < len(name) <= MAX_NAME and name == name.strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name), name
    assert typed_name("\u202eNurse\u200b Kari\u2066 ", "oncall") == "Nurse Kari"


def test_it_refuses_a_post_without_the_pages_csrf_field(web: Web) -> None:
    path = web.link()
    other_link = web.link(link_id="M" * 16)
    for data in ({}, {"csrf": ""}, {"csrf": "x" * 22},
                 {"csrf": csrf_token(KEY, other_link.rsplit("/", 1)[1])}):
        answer = web.client.post(path, data=data)
        assert answer.status_code == 403 and "Nothing was changed" in answer.text
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "open"
    assert web.store.link_spent("L" * 16) is None


def test_it_refuses_an_oversized_or_unframed_post(web: Web) -> None:
    path = web.link()
    (csrf,) = CSRF.findall(web.client.get(path).text)
    huge = web.client.post(path, data={"csrf": csrf, "name": "x" * 10_000})
    assert huge.status_code == 413
    unframed = web.client.post(path, content=iter([f"csrf={csrf}".encode()]),
                               headers={"content-type": "application/x-www-form-urlencoded"})
    assert unframed.status_code == 413  # chunked: no length to check before reading
    assert web.store.link_spent("L" * 16) is None


def test_it_refuses_a_reused_link_and_changes_nothing_more(web: Web) -> None:
    path = web.link(LinkAction.RESOLVE)
    form = fields(web.client.get(path).text)
    assert web.client.post(path, data=form).status_code == 200
    answer = web.client.post(path, data={**form, "name": "someone else"})
    assert answer.status_code == 409 and "already resolved" in answer.text
    assert len(web.store.incident_actions(web.incident)) == 1


def test_it_refuses_to_acknowledge_what_someone_else_has_and_leaves_the_link_unspent(
    web: Web,
) -> None:
    path = web.link()
    form = fields(web.client.get(path).text)
    web.store.acknowledge_incident(web.incident, by="nurse-ola", at_ms=NOW)
    answer = web.client.post(path, data=form)
    assert answer.status_code == 409
    assert "already acknowledged" in answer.text and "nurse-ola" in answer.text
    assert web.store.link_spent("L" * 16) is None  # the transaction was rolled back
    assert web.store.incident_actions(web.incident) == []
    resolve = web.link(LinkAction.RESOLVE, link_id="R" * 16)
    assert web.confirm(resolve)[0] == 200  # an acknowledged incident can still be resolved


def test_it_silences_the_incidents_rule_for_its_source_for_two_hours(web: Web) -> None:
    battery = web.store.open_incident(
        rule="battery-low", gateway="gw-1", device="bed-[2]", severity="warning",
        summary="battery low bed-[2]", detail="12 %", at_ms=NOW - 60_000)
    assert battery is not None
    status, text = web.confirm(web.link(LinkAction.SILENCE, incident=battery), name="tech-anne")
    assert status == 200 and "Silenced" in text
    (silence,) = web.store.silences(active_at_ms=NOW)
    assert (silence.rule, silence.gateway, silence.device) == ("battery-low", "gw-1",
                                                               "bed-[[]2]")
    assert (silence.starts_ms, silence.ends_ms) == (NOW, NOW + SILENCE_MS)
    assert silence.created_by == "tech-anne" and "sent to oncall" in silence.comment
    (entry,) = web.store.incident_actions(battery)
    assert entry.action == "silence"


def test_it_will_not_silence_a_care_alarm_from_a_link(web: Web) -> None:
    """A silence of a care alarm (a critical incident) would hold its escalation with no one
    having it, and hide the device's next raise, a new emergency, for two hours: a link only
    acknowledges or resolves one (a silence for maintenance is `careflow silences add`)."""
    path = web.link(LinkAction.SILENCE)
    page = web.client.get(path)
    assert page.status_code == 403 and "cannot be silenced from a link" in page.text
    assert not CSRF.findall(page.text)  # no button to press
    answer = web.client.post(path, data={"csrf": csrf_token(KEY, path[3:]), "seen": "1"})
    assert answer.status_code == 403 and "Nothing was changed" in answer.text
    assert web.store.silences(active_at_ms=NOW) == []
    assert web.store.link_spent("L" * 16) is None
    assert web.store.incident_actions(web.incident) == []
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "open"
    # nor once it is over: the device's next raise is a new emergency
    web.store.resolve_incident(web.incident, by="nurse-kari", at_ms=NOW)
    answer = web.client.post(path, data={"csrf": csrf_token(KEY, path[3:]), "seen": "1"})
    assert answer.status_code == 403 and web.store.silences(active_at_ms=NOW) == []


@pytest.mark.parametrize(("path", "status", "says"), [
    ("/l/garbage", 403, "not valid"),
    ("/l/" + "x" * 60_000, 403, "not valid"),  # httpx sends up to 64 KiB
    ("/l/%C3%B6%00%FF", 403, "not valid"),
])
def test_it_refuses_garbage_links(web: Web, path: str, status: int, says: str) -> None:
    for method in ("GET", "POST"):
        answer = web.client.request(method, path)
        assert answer.status_code == status and says in answer.text
        assert answer.headers["cache-control"] == "no-store"


def test_it_refuses_a_tampered_link_and_an_expired_one(web: Web) -> None:
    path = web.link()
    tampered = path.replace(f"/l/1.{web.incident}.a.", f"/l/1.{web.incident}.r.")
    assert web.client.get(tampered).status_code == 403
    expired = web.link(expires_ms=NOW - 1000, link_id="E" * 16)
    page = web.client.get(expired)
    assert page.status_code == 410 and "expired" in page.text
    web.now_ms = NOW + 3_600_000  # the first link's expiry: between the GET and the POST
    assert web.client.post(path, data={"csrf": csrf_token(KEY, path[3:]), "seen": "1"}
                           ).status_code == 410
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "open"


def test_it_never_lets_a_page_cover_a_raise_it_did_not_show(web: Web) -> None:
    """The care alarm is raised again (a new emergency) between opening an old link's page and
    pressing its button: the press acknowledges nothing; the page opened again shows the new
    raise, and then it may."""
    path = web.link()
    form = fields(web.client.get(path).text)
    assert web.store.raise_again(web.incident, at_ms=NOW + 1000, detail="fall detected again")
    web.now_ms = NOW + 2000
    answer = web.client.post(path, data={**form, "name": "Nurse Kari"})
    assert answer.status_code == 409 and "raised again" in answer.text
    assert "Nothing was changed" in answer.text
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "open"
    assert web.store.link_spent("L" * 16) is None and web.store.incident_actions(web.incident) == []
    for data in ({"csrf": form["csrf"]}, {"csrf": form["csrf"], "seen": "x"}):  # not its page
        assert web.client.post(path, data=data).status_code == 403
    page = web.client.get(path)
    assert "raised 2 times" in page.text and "fall detected again" in page.text
    status, _text = web.confirm(path, name="Nurse Kari")
    assert status == 200
    incident = web.store.incident(web.incident)
    assert incident is not None and incident.state == "acknowledged"


def test_an_old_link_of_an_alarm_raised_again_points_at_the_new_one_and_leaves_it_alone(
    web: Web,
) -> None:
    """Acknowledged, then raised again: a new incident follows (a new emergency). The first
    message's links act on none of it, and their page does not read as if it were over."""
    web.confirm(web.link(), name="Nurse Kari")
    new = web.store.supersede_incident(web.incident, at_ms=NOW + 1000, detail="fall again")
    assert new is not None
    for action, link_id in ((LinkAction.RESOLVE, "R" * 16), (LinkAction.ACKNOWLEDGE, "A" * 16)):
        path = web.link(action, link_id=link_id)
        page = web.client.get(path)
        assert page.status_code == 409 and "was raised again" in page.text
        assert f"incident {new} is open" in page.text and not CSRF.findall(page.text)
        answer = web.client.post(path, data={"csrf": csrf_token(KEY, path[3:]), "seen": "1"})
        assert answer.status_code == 409 and f"incident {new} is open" in answer.text
    follower = web.store.incident(new)
    assert follower is not None and follower.state == "open"
    assert web.store.incident_actions(new) == []


def test_two_taps_of_one_link_at_once_act_once_and_record_once(tmp_path: Path) -> None:
    """Two phones (or a double tap through two hub connections) pressing one link's button at
    the same moment: one acts, the others are refused, one timeline entry."""
    store = SqliteStore(tmp_path / "db")
    incident = store.open_incident(rule="care-alarm", gateway="gw-1", device="fall-1",
                                   severity="critical", summary="CARE ALARM", detail="fall",
                                   at_ms=NOW)
    assert incident is not None
    claim = LinkClaim(incident, LinkAction.RESOLVE, "oncall", NOW + 60_000, "L" * 16)
    connections = [SqliteStore(tmp_path / "db") for _ in range(4)]
    start = threading.Barrier(len(connections))
    statuses: list[int] = []

    def tap(connection: SqliteStore, n: int) -> None:
        start.wait()
        statuses.append(act(connection, claim, by=f"carer-{n}", now_ms=NOW, seen_raises=1).status)

    taps = [threading.Thread(target=tap, args=(c, n)) for n, c in enumerate(connections)]
    for thread in taps:
        thread.start()
    for thread in taps:
        thread.join()
    assert sorted(statuses) == [200, 409, 409, 409]
    (entry,) = store.incident_actions(incident)
    resolved = store.incident(incident)
    assert resolved is not None and resolved.resolved_by == entry.by


def test_it_says_when_the_incident_does_not_exist(web: Web) -> None:
    page = web.client.get(web.link(incident=9999))
    assert page.status_code == 404 and "No such incident" in page.text
