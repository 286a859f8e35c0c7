"""The acceptance test of the one-tap links, end to end with real peers: a care alarm published
to Mosquitto, a hub (build_hub) mailing a real SMTP server (aiosmtpd), Debian's chromium
opening the link from the email on a phone-sized screen and confirming."""

from __future__ import annotations

import email
import email.policy
import re
import time
import urllib.request
from pathlib import Path

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.notify import load_channels
from careflow.hub.alerting.rules import load_rules
from tests.conftest import (
    PHONE,
    Mosquitto,
    RunningHub,
    free_port,
    make_settings,
    screenshot,
    wait_until,
)
from tests.hub.conftest import Mailbox, publish

pytestmark = pytest.mark.broker

STEP_S = 10  # the escalation step the person's acknowledgement must stop
RULES = f"""
rules:
  - name: care-alarm
    kind: event
    type: alert
    where: {{state: raised}}
    severity: critical
    summary: "CARE ALARM {{device}}"
escalation:
  - severity: critical
    steps:
      - after: {STEP_S}s
        channels: [backup]
"""
BUTTON = re.compile(r'<a href="([^"]+)" style="[^"]*">(Acknowledge|Resolve|Silence 2 h)</a>')


def _mail_to(mailbox: Mailbox, address: str) -> list[email.message.EmailMessage]:
    parsed = [email.message_from_string(raw, policy=email.policy.default)
              for raw in mailbox.messages]
    return [m for m in parsed if isinstance(m, email.message.EmailMessage)
            and address in str(m["To"])]


def _links(message: email.message.EmailMessage) -> dict[str, str]:
    """The links of the email's HTML part (what a person taps), by the label before each,
    checked against its plain-text part."""
    html, text = (message.get_body(preferencelist=(kind,)) for kind in ("html", "plain"))
    assert html is not None and text is not None
    html_body, text_body = html.get_content(), text.get_content()
    links = {label: url for url, label in BUTTON.findall(html_body)}
    for label, url in links.items():
        assert f"{label}: {url}" in text_body
    return links


def _fetch(url: str) -> tuple[int, str]:
    """A plain GET, as a mail scanner or a chat preview fetches a link."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_a_carer_acknowledges_a_care_alarm_from_the_emailed_link_and_escalation_stops(
    tmp_path: Path, mosquitto: Mosquitto, page_at: object,
) -> None:
    mailbox = Mailbox(free_port())
    mailbox.start()
    smtp = f"mailto://127.0.0.1:{mailbox.port}?from=careflow@example.org"
    channels = load_channels({f"CAREFLOW_CHANNEL_{name.upper()}": f"{smtp}&to={name}@example.org"
                              for name in ("oncall", "backup", "ops")})
    (tmp_path / "rules.yaml").write_text(RULES)
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url),
                     load_rules([tmp_path / "rules.yaml"]), channels=channels, web=True).start()
    try:
        assert hub.hub.web is not None
        publish(mosquitto, [Stamper(gateway="gw-7", device="fall-3").stamp(
            "alert", {"kind": "fall", "state": "raised"})])
        wait_until(lambda: _mail_to(mailbox, "oncall@"), what="the care alarm's email")
        (alarm,) = _mail_to(mailbox, "oncall@")
        assert "CARE ALARM fall-3" in str(alarm["Subject"])
        links = _links(alarm)
        assert set(links) == {"Acknowledge", "Resolve"}  # a care alarm: no silence
        assert all(url.startswith(f"{hub.hub.web.url}/l/") for url in links.values())
        (incident,) = hub.store.incidents()
        assert incident.state == "open" and incident.next_due_ms is not None  # a step is due

        # mail scanners and previews fetch every link: nothing may change
        for url in links.values():
            status, page = _fetch(url)
            assert status == 200 and "Nothing happens until you press the button" in page
        assert hub.store.incident(incident.id) == incident
        assert hub.store.incident_actions(incident.id) == []

        # the carer reads the email (its HTML part) and taps the acknowledge link in it
        page = page_at(PHONE)  # type: ignore[operator]
        html = alarm.get_body(preferencelist=("html",))
        assert html is not None
        page.set_content(html.get_content())
        screenshot(page, "link-email-phone")
        with page.expect_navigation() as navigation:
            page.get_by_role("link", name="Acknowledge", exact=True).click()
        answer = navigation.value
        assert answer.url == links["Acknowledge"]
        assert answer.status == 200 and answer.headers["cache-control"] == "no-store"
        assert page.get_by_role("heading", name="Acknowledge?").is_visible()
        assert page.get_by_text("gw-7 / fall-3").is_visible()
        page.get_by_label("Your name").fill("Nurse Kari")
        screenshot(page, "link-confirm-phone")
        page.get_by_role("button", name="Acknowledge").click()
        page.get_by_role("status").wait_for()
        assert "Acknowledged: incident" in page.get_by_role("status").inner_text()
        screenshot(page, "link-done-phone")

        acked = hub.store.incident(incident.id)
        assert acked is not None and acked.state == "acknowledged"
        assert acked.acknowledged_by == "Nurse Kari"
        assert acked.acknowledged_ms is not None
        assert acked.acknowledged_ms < incident.triggered_ms + STEP_S * 1000, \
            "acknowledged after the step was due: this run proves nothing about stopping it"
        (entry,) = hub.store.incident_actions(incident.id)
        assert (entry.action, entry.by, entry.via) == ("acknowledge", "Nurse Kari", "link")
        assert entry.detail.endswith("sent to oncall")

        # the same link again, and a tampered one: refused, with a page that says so
        again = page.goto(links["Acknowledge"])
        assert again.status == 410 and page.get_by_text("This link was already used").is_visible()
        assert page.get_by_text("acknowledged by Nurse Kari").is_visible()  # who has it
        screenshot(page, "link-refused-used-phone")
        token = links["Resolve"].rsplit("/", 1)[1]
        tampered = links["Resolve"][:-len(token)] + token.replace(".r.", ".a.", 1)
        refused = page.goto(tampered)
        assert refused.status == 403 and page.get_by_text("This link is not valid").is_visible()
        screenshot(page, "link-refused-tampered-phone")

        # the step would have gone out STEP_S after the alarm: it does not (a wait, not a poll:
        # what is checked is that nothing comes)
        deadline = incident.triggered_ms / 1000 + STEP_S + 2
        time.sleep(max(0.0, deadline - time.time()))
        assert _mail_to(mailbox, "backup@") == []
        assert [n.channel for n in hub.store.notifications(limit=100)] == ["oncall"]
        assert hub.store.incident_actions(incident.id) == [entry]  # nothing more changed
    finally:
        hub.stop()
        mailbox.stop()
