"""One-tap links in the messages: signed for the channel at send time, in email text and HTML
(a real aiosmtpd), kept when a message is shortened, a WhatsApp template's parameter."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest
from apprise.plugins.seven import NotifySeven
from apprise.plugins.whatsapp import NotifyWhatsApp

from careflow.core.errors import ConfigError
from careflow.hub.alerting.notify import CLI_HINT, NotificationSender, load_channels, render
from careflow.hub.app import build_hub
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.web.links import LinkAction, LinkClaim, LinkSigner, verify
from tests.conftest import HttpReceiver, free_port, make_settings
from tests.hub.conftest import Mailbox

KEY = b"k" * 64
BASE = "https://care.example.org"
LINK = re.compile(r"(Acknowledge|Resolve|Silence 2 h): (https://care\.example\.org/l/\S+)")


def alarm(store: SqliteStore, channel: str, *, n: int = 1, detail: str = "fall detected") -> int:
    """A care alarm, its firing notification rendered as the alert stage renders it."""
    title, body = render(kind="firing", severity="critical", summary=f"CARE ALARM fall-{n}",
                         detail=detail, gateway=f"gw-{n}", device=f"fall-{n}", since_ms=1,
                         runbook=None)
    incident = store.open_incident(rule="care-alarm", gateway=f"gw-{n}", device=f"fall-{n}",
                                   severity="critical", summary=f"CARE ALARM fall-{n}",
                                   detail=detail, at_ms=1, notify=[(channel, title, body)])
    assert incident is not None
    return incident


def claims(text: str, now_ms: int = 10) -> dict[str, LinkClaim]:
    """The links in ``text`` by label, each verified."""
    found = {}
    for label, url in LINK.findall(text):
        claim = verify(KEY, url.rsplit("/", 1)[1], now_ms=now_ms)
        assert isinstance(claim, LinkClaim), (label, claim)
        found[label] = claim
    return found


def test_it_mails_signed_links_in_the_text_and_as_html_links(tmp_path: Path) -> None:
    mailbox = Mailbox(free_port())
    mailbox.start()
    try:
        channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": f"mailto://127.0.0.1:{mailbox.port}"
                                  "?from=careflow@example.org&to=oncall@example.org"})
        store = SqliteStore(tmp_path / "db")
        incident = alarm(store, "oncall")
        sender = NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=3600))
        assert sender.deliver_due(now_ms=10) == 1
    finally:
        mailbox.stop()
    (raw,) = mailbox.messages
    message = email.message_from_string(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    text_body, html_body = text.get_content(), html.get_content()
    found = claims(text_body)
    assert {label: (c.incident_id, c.action, c.channel) for label, c in found.items()} == {
        "Acknowledge": (incident, LinkAction.ACKNOWLEDGE, "oncall"),
        "Resolve": (incident, LinkAction.RESOLVE, "oncall")}  # no silence for a care alarm
    assert found["Acknowledge"].expires_ms == 3_600_000  # 10 ms + 1 h, in whole seconds
    for label, url in LINK.findall(text_body):  # the same link, a button in the HTML
        assert re.search(rf'<a href="{re.escape(url)}" style="[^"]*">{label}</a>', html_body)
    assert "careflow incidents" not in text_body and "CARE ALARM fall-1" in html_body
    assert "Ref: careflow-n1" in text_body


def test_it_leaves_links_out_of_resolutions_and_says_how_without_the_web(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/"})
    store = SqliteStore(tmp_path / "db")
    first = alarm(store, "ops")
    NotificationSender(store, channels).deliver_due(now_ms=10)  # the web is off: no links
    title, body = render(kind="resolved", severity="critical", summary="CARE ALARM fall-1",
                         detail="cleared", gateway="gw-1", device="fall-1", since_ms=1,
                         runbook=None)
    store.resolve_incidents(rule="care-alarm", gateway="gw-1", device="fall-1", at_ms=20,
                            by="careflow", notify=[("ops", title, body)])
    NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=60)).deliver_due(
        now_ms=30)
    without_web, resolved = (b["message"] for b in http_receiver.bodies)
    assert f"Acknowledge: careflow incidents ack {first}" in without_web
    assert CLI_HINT not in without_web and "/l/" not in without_web
    assert "[RESOLVED]" in http_receiver.bodies[1]["title"] and "/l/" not in resolved


def test_it_keeps_the_links_when_it_shortens_a_message_for_a_small_channel(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """Mattermost takes 4,000 characters (its incoming webhook: a local HTTP receiver)."""
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": f"mmost://127.0.0.1:{http_receiver.port}/"
                                                      "abcdefghijklmnop"})
    store = SqliteStore(tmp_path / "db")
    long_one = alarm(store, "ops", n=1, detail="x" * 9000)
    sender = NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=60))
    sender.deliver_due(now_ms=10)
    two = [alarm(store, "ops", n=n) for n in (2, 3)]
    sender.deliver_due(now_ms=10)
    shortened, digest = (b["text"] for b in http_receiver.bodies)
    assert len(shortened) <= 4000 and "\u2026" in shortened
    assert {c.incident_id for c in claims(shortened).values()} == {long_one}
    assert len(claims(shortened)) == 2 and shortened.endswith(f"Ref: careflow-n{long_one}")
    # a digest: each alarm with its own links
    digest_links = [claims(section) for section in digest.split("--- ")[1:]]
    assert [{c.incident_id for c in found.values()} for found in digest_links] == [
        {two[0]}, {two[1]}]
    assert all(len(found) == 2 for found in digest_links)


def test_it_offers_a_silence_link_for_a_warning_but_never_for_a_care_alarm(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """A care alarm silenced from a link would hide the device's next raise for two hours
    (see test_link_pages): its messages offer acknowledge and resolve only."""
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/"})
    store = SqliteStore(tmp_path / "db")
    title, body = render(kind="firing", severity="warning", summary="battery low bed-2",
                         detail="12 %", gateway="gw-1", device="bed-2", since_ms=1,
                         runbook=None)
    battery = store.open_incident(rule="battery-low", gateway="gw-1", device="bed-2",
                                  severity="warning", summary="battery low bed-2",
                                  detail="12 %", at_ms=1, notify=[("ops", title, body)])
    care = alarm(store, "ops", n=2)
    sender = NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=60))
    sender.deliver_due(now_ms=10)
    (digest,) = (b["message"] for b in http_receiver.bodies)
    found = [{label: c.incident_id for label, c in claims(section).items()}
             for section in digest.split("--- ")[1:]]
    assert found == [{"Acknowledge": care, "Resolve": care},  # critical first
                     {"Acknowledge": battery, "Resolve": battery, "Silence 2 h": battery}]


def test_it_keeps_a_care_alarm_readable_on_a_channel_too_small_for_its_links(
    tmp_path: Path, http_receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SMS takes 160 characters: links that would leave no room for what and where are left
    out (the message says how to acknowledge with the CLI instead), so the alarm still reads as
    it did and fits. seven.io's address points at a local HTTP receiver."""
    monkeypatch.setattr(NotifySeven, "notify_url", f"http://127.0.0.1:{http_receiver.port}/sms")
    channels = load_channels({"CAREFLOW_CHANNEL_SMS": "seven://abcdefghijklmnop/4799999999"})
    store = SqliteStore(tmp_path / "db")
    alarm(store, "sms", n=3)
    NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=60)).deliver_due(
        now_ms=10)
    (sms,) = (body["text"] for _method, _path, body, _at in http_receiver.requests)
    assert len(sms) <= 160, sms
    assert "Where: gateway gw-3, device fall-3" in sms and sms.endswith("Ref: careflow-n1")


WHATSAPP = "whatsapp://abc123token@1234567/+4799999999"


def test_it_gives_a_whatsapp_template_the_acknowledge_link_as_parameter_2(
    tmp_path: Path, http_receiver: HttpReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The WhatsApp Cloud API cannot run here: its address (a class attribute of Apprise's
    plugin) points at a local HTTP receiver, which gets the real request Apprise builds."""
    monkeypatch.setattr(NotifyWhatsApp, "notify_url",
                        f"http://127.0.0.1:{http_receiver.port}/{{fb_ver}}/{{phone_id}}/messages")
    channels = load_channels({"CAREFLOW_CHANNEL_FAMILY": WHATSAPP,
                              "CAREFLOW_CHANNEL_FAMILY_TEMPLATE": "careflow_alert",
                              "CAREFLOW_CHANNEL_FAMILY_TEMPLATE_LINK": "2"})
    assert set(channels) == {"family"}
    store = SqliteStore(tmp_path / "db")
    incident = alarm(store, "family")
    sender = NotificationSender(store, channels, links=LinkSigner(KEY, BASE, ttl_s=60))
    sender.deliver_due(now_ms=10)
    title, body = render(kind="resolved", severity="critical", summary="CARE ALARM fall-1",
                         detail="cleared", gateway="gw-1", device="fall-1", since_ms=1,
                         runbook=None)
    store.resolve_incidents(rule="care-alarm", gateway="gw-1", device="fall-1", at_ms=20,
                            by="careflow", notify=[("family", title, body)])
    sender.deliver_due(now_ms=30)

    firing, resolved = (body["template"]["components"][0]["parameters"]
                        for body in http_receiver.bodies)
    text, link = (p["text"] for p in firing)
    assert "\n" not in text and text.endswith("| Ref: careflow-n1")
    assert link.startswith(f"{BASE}/l/")
    claim = verify(KEY, link.rsplit("/", 1)[1], now_ms=10)
    assert isinstance(claim, LinkClaim)
    assert (claim.incident_id, claim.action, claim.channel) == (
        incident, LinkAction.ACKNOWLEDGE, "family")
    assert len(claims(text)) == 2  # and both in the message itself
    assert [p["text"] for p in resolved][1] == "-"  # a resolution has no link to give


@pytest.mark.parametrize("env", [
    {"CAREFLOW_CHANNEL_FAMILY_TEMPLATE": "careflow_alert",
     "CAREFLOW_CHANNEL_FAMILY_TEMPLATE_LINK": "3"},
    {"CAREFLOW_CHANNEL_FAMILY_TEMPLATE_LINK": "2"},
])
def test_it_refuses_a_template_link_parameter_it_cannot_fill(env: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="TEMPLATE_LINK"):
        load_channels({"CAREFLOW_CHANNEL_FAMILY": WHATSAPP, **env})


@pytest.mark.parametrize(("env", "base"), [
    ({"CAREFLOW_PUBLIC_URL": "https://care.example.org/"}, "https://care.example.org"),
    ({}, None),  # where the web listens: the port it was given (any free one here)
    ({"CAREFLOW_HTTP_LISTEN": "off"}, "no links"),
])
def test_the_hub_signs_the_links_it_sends_for_where_people_reach_its_web(
    tmp_path: Path, env: dict[str, str], base: str | None,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    hub = build_hub(make_settings(tmp_path / "data", "mqtt://127.0.0.1:9", **env), lock=None,
                    embedded_broker=False, channels=channels, provisioning=None,
                    influx_snapshots=False, deadman=False)
    try:
        assert hub.sender is not None
        signer = hub.sender.links
        if base == "no links":
            assert signer is None and hub.web is None
            return
        assert isinstance(signer, LinkSigner) and hub.web is not None
        assert signer.base_url == (base or hub.web.url) and not signer.base_url.endswith(":0")
        assert signer.ttl_s == 86_400
        assert signer.reachable == (base is not None)  # loopback: phones cannot open it
    finally:
        hub.close()


def test_links_that_phones_cannot_open_come_with_the_way_to_acknowledge_on_the_hub(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/"})
    store = SqliteStore(tmp_path / "db")
    first, second = alarm(store, "ops", n=1), alarm(store, "ops", n=2)
    loopback = LinkSigner(KEY, "http://127.0.0.1:8080", ttl_s=60, reachable=False)
    NotificationSender(store, channels, links=loopback).deliver_due(now_ms=10)
    (body,) = (b["message"] for b in http_receiver.bodies)
    assert f"On the hub: careflow incidents ack {first}" in body
    assert f"On the hub: careflow incidents ack {second}" in body
    assert body.count("http://127.0.0.1:8080/l/") == 4  # the links all the same: ack, resolve
