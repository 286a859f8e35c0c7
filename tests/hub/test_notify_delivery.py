"""Delivery under load and failure: per-channel senders, digests, cancelled reminders, the
channel's own reason for a failure, and critical notifications that are never given up.

Real peers throughout: an SMTP server (aiosmtpd) and HTTP receivers on loopback; the store is
the real SQLite store.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import subprocess
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st

from careflow.core import clock
from careflow.core.errors import StoreError, TransportError
from careflow.hub.alerting import apprise_transport
from careflow.hub.alerting.apprise_transport import (
    AppriseTransport,
    MessageLimits,
    failure_from_log,
    url_secrets,
)
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import (
    FAILING_AFTER_ATTEMPTS,
    MAX_ATTEMPTS,
    MAX_DIGEST,
    NOTIFICATION_OVERDUE_MS,
    NotificationSender,
    avoid_failing,
    cancel_reason,
    combine,
    digest_order,
    fitting,
    gives_up,
    load_channels,
)
from careflow.hub.alerting.rules import load_rules
from careflow.hub.app import HubService
from careflow.hub.store.interface import MAX_GROUP_CLAIM
from careflow.hub.store.records import Incident, Notification
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import JsonReceiver, careflow_cmd, free_port, make_settings, wait_until
from tests.hub.conftest import Mailbox


class RefusingMailbox:
    """A real SMTP server that refuses every recipient: 550 unknown user."""

    def __init__(self) -> None:
        class Handler:
            async def handle_RCPT(self, _server: Any, _session: Any, _envelope: Any,  # noqa: N802
                                  address: str, _options: Any) -> str:
                return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def url(self) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=careflow@example.org&to=nobody@example.org"

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def receiver() -> Any:
    peer = JsonReceiver(hold_path="/slow")
    yield peer
    peer.close()


def open_alarm(store: SqliteStore, n: int, channel: str, *, severity: str = "critical",
               at_ms: int = 1) -> int:
    incident = store.open_incident(
        rule="care-alarm" if severity == "critical" else "battery-low", gateway=f"gw-{n}",
        device=f"fall-{n}", severity=severity, summary=f"CARE ALARM fall-{n}", detail="fall",
        at_ms=at_ms, notify=[(channel, f"[{severity.upper()}] CARE ALARM fall-{n}",
                              f"What: fall\nWhere: gw-{n} / fall-{n}")])
    assert incident is not None
    return incident


def the_note(store: SqliteStore, incident_id: int) -> Notification:
    (note,) = [n for n in store.notifications(limit=1000) if n.incident_id == incident_id]
    return note


# -- 14: one channel never delays another; a burst is one digest ---------------------------------


def test_it_delivers_on_one_channel_while_another_channel_holds_its_answer(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    channels = load_channels({
        "CAREFLOW_CHANNEL_OPS": receiver.url("/slow", "?rto=60"),  # answers only when released
        "CAREFLOW_CHANNEL_ONCALL": receiver.url("/fast"),
    })
    store = SqliteStore(tmp_path / "db")
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    sender.start()
    try:
        warning = open_alarm(store, 1, "ops", severity="warning")
        sender.wake()
        wait_until(lambda: receiver.to("/slow"), what="the slow channel receiving")
        alarm = open_alarm(store, 2, "oncall")
        sender.wake()
        wait_until(lambda: receiver.to("/fast"), timeout_s=10,
                   what="the other channel's alarm while the slow one still holds its answer")
        assert the_note(store, warning).state == "sending"  # still in the slow channel's hands
        receiver.release.set()
        wait_until(lambda: the_note(store, warning).state == "sent"
                   and the_note(store, alarm).state == "sent", what="both recorded")
    finally:
        sender.stop()


def test_it_mails_twelve_simultaneous_alarms_as_one_digest_critical_first(
    tmp_path: Path,
) -> None:
    mailbox = Mailbox(free_port())
    mailbox.start()
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": f"mailto://127.0.0.1:{mailbox.port}"
                                                         "?from=careflow@example.org"
                                                         "&to=oncall@example.org"})
    store = SqliteStore(tmp_path / "db")
    warning = open_alarm(store, 99, "oncall", severity="warning")  # queued first, sent last
    alarms = [open_alarm(store, n, "oncall") for n in range(12)]
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    sender.start()
    try:
        wait_until(lambda: len(store.notifications(states=("sent",))) == 13, timeout_s=15,
                   what="all thirteen recorded as sent")
    finally:
        sender.stop()
        mailbox.stop()
    (raw,) = mailbox.messages
    mail = mail_text(raw)
    assert "[13 alerts] several sources" in mail
    positions = [mail.index(f"Ref: careflow-n{the_note(store, i).id}\n") for i in alarms]
    assert positions == sorted(positions)  # each alarm with its own ref, oldest first
    assert mail.index("[WARNING] CARE ALARM fall-99") > positions[-1]
    ids = sorted(the_note(store, i).id for i in [warning, *alarms])
    assert "Ref: careflow-" + "+".join(f"n{i}" for i in ids) in mail


def test_it_splits_a_digest_longer_than_the_channel_takes_into_messages_that_fit(
    tmp_path: Path,
) -> None:
    """Like Discord (2,000 characters), a channel refuses a message longer than its limit
    (Apprise's for the json plugin: 32,768) with a 400: fifty long alarms due at once must go
    out in messages that fit, every one of them, not as one message refused for ever."""
    limited = JsonReceiver(max_chars=32_768)
    try:
        channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": limited.url("/oncall")})
        store = SqliteStore(tmp_path / "db")
        for n in range(50):
            store.open_incident(rule="care-alarm", gateway=f"gw-{n}", device=f"fall-{n}",
                                severity="critical", summary=f"fall-{n}", detail="fall", at_ms=1,
                                notify=[("oncall", f"[CRITICAL] CARE ALARM fall-{n}.",
                                         "What: fall\n" + "x" * 1000)])
        sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
        while sender.deliver_due(now_ms=10):
            pass
    finally:
        limited.close()
    messages = [body["message"] for body in limited.to("/oncall")]
    assert len(messages) > 1 and all(len(m) <= 32_768 for m in messages)
    for n in range(50):
        assert sum(f"CARE ALARM fall-{n}." in m for m in messages) == 1, n
    assert len(store.notifications(states=("sent",))) == 50


@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=0, max_value=5000))
def test_it_puts_the_most_that_fit_in_a_message_and_always_at_least_one(
    count: int, fit: int,
) -> None:
    assert fitting(count, lambda n: n <= fit) == max(1, min(count, fit))


@given(st.text(max_size=3000), st.text(max_size=3000),
       st.integers(min_value=200, max_value=40_000), st.integers(min_value=0, max_value=300),
       st.booleans())
def test_it_shortens_one_long_notification_to_fit_keeping_its_ref(
    title: str, body: str, body_max: int, title_max: int, title_in_body: bool,
) -> None:
    limits = MessageLimits(body_max=body_max, title_max=title_max, title_in_body=title_in_body)
    tail = "\n\nRef: careflow-n123456"
    short_title, short_body = limits.shorten(title, body + tail, tail=tail)
    assert limits.fits(short_title, short_body) and short_body.endswith(tail)
    assert limits.fits(limits.title(title), "")


def test_it_claims_no_more_than_a_digest_even_for_a_gateway_with_thousands_held(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    """A gateway's group brings along its held notifications; unbounded, a group of 2,000 was
    claimed row by row (2,000 commits, 5 s here) under the lock every channel's sender shares,
    in every round, holding up the care alarms of every other channel. Bounded, in one commit,
    and every one delivered all the same."""
    store = SqliteStore(tmp_path / "db")
    many = MAX_DIGEST + MAX_GROUP_CLAIM + 100
    for n in range(many):
        store.open_incident(rule="battery-low", gateway="gw-1", device=f"d-{n}",
                            severity="warning", summary=f"battery d-{n}", detail="low", at_ms=1,
                            notify=[("ops", f"[WARNING] battery d-{n}.", "low")])
    claimed = store.claim_notifications(now_ms=10, limit=MAX_DIGEST, channel="ops")
    assert MAX_DIGEST <= len(claimed) <= MAX_DIGEST + MAX_GROUP_CLAIM
    assert store.release_claimed_notifications("ops") == len(claimed)
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": receiver.url("/ops")})
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    while sender.deliver_due(now_ms=10):
        pass
    messages = [body["message"] for body in receiver.to("/ops")]
    for n in range(many):
        assert sum(f"battery d-{n}." in m for m in messages) == 1, n
    assert store.count_notifications(states=("sent",)) == many


def test_it_claims_a_care_alarm_before_older_warnings_of_its_channel(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    """More warnings due than one claim takes, then a care alarm: the alarm goes in the next
    message, not after every older warning has gone out."""
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall")})
    store = SqliteStore(tmp_path / "db")
    for n in range(MAX_DIGEST + 20):
        open_alarm(store, 100 + n, "oncall", severity="warning")
    alarm = open_alarm(store, 1, "oncall")
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    sender.deliver_due(now_ms=10)
    (first,) = receiver.to("/oncall")
    assert "[CRITICAL] CARE ALARM fall-1;" in first["title"]  # first in the digest
    assert the_note(store, alarm).state == "sent"


def mail_text(raw: str) -> str:
    """Subject and plain-text body of a mail as the SMTP server received it."""
    message = email.message_from_string(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    body = message.get_body(preferencelist=("plain", "html"))
    assert body is not None
    return f"{message['subject']}\n{body.get_content()}".replace("\r\n", "\n")


def note(n: int, *, incident: int | None = None, kind: str = "firing", group: str = "gw-1",
         title: str | None = None) -> Notification:
    return Notification(id=n, incident_id=incident or n, channel="oncall", kind=kind,
                        title=title or f"t{n}", body=f"b{n}", state="sending", attempts=0,
                        next_attempt_ms=0, last_error=None, created_ms=0, sent_ms=None,
                        group_key=group)


def test_it_orders_a_digest_critical_first_then_by_age() -> None:
    notes = [note(1), note(2), note(3), note(4)]
    severity = {1: "warning", 2: "critical", 3: "info", 4: "critical"}
    assert [n.id for n in digest_order(notes, severity)] == [2, 4, 1, 3]


def test_it_names_the_gateway_only_when_a_digest_has_one() -> None:
    assert combine([note(1), note(2)])[0].startswith("[2 alerts] gw-1: t1; t2")
    title, body = combine([note(1), note(2, group="gw-2")])
    assert title.startswith("[2 alerts] several sources")
    assert "--- t1\nb1\nRef: careflow-n1" in body and "--- t2\nb2\nRef: careflow-n2" in body
    assert combine([note(1)]) == ("t1", "b1")


# -- 15: a reminder of an incident acknowledged or resolved meanwhile is cancelled ---------------


def test_it_cancels_a_reminder_whose_incident_was_acknowledged_before_it_went_out(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall"),
                              "CAREFLOW_CHANNEL_OPS": receiver.url("/ops")})
    store = SqliteStore(tmp_path / "careflow.db")  # where `careflow notify list` looks
    sender = NotificationSender(SqliteStore(tmp_path / "careflow.db"), channels)
    acked = open_alarm(store, 1, "oncall")
    resolved = open_alarm(store, 2, "oncall")
    assert sender.deliver_due(now_ms=10) == 2
    for incident in (acked, resolved):  # the escalation step is queued ...
        assert store.escalate_incident(incident, sent_before=0, at_ms=20, notify=[
            ("ops", "[CRITICAL] NOT ACKNOWLEDGED: CARE ALARM", "escalated")])
    store.acknowledge_incident(acked, by="kari", at_ms=30)  # ... then someone has it
    store.resolve_incident(resolved, by="ola", at_ms=30)
    assert sender.deliver_due(now_ms=40) == 2
    assert receiver.to("/ops") == []
    cancelled = store.notifications(states=("cancelled",))
    assert {n.incident_id for n in cancelled} == {acked, resolved}
    reasons = {n.incident_id: n.last_error or "" for n in cancelled}
    assert "acknowledged by kari" in reasons[acked] and "resolved by ola" in reasons[resolved]
    listed = subprocess.run(careflow_cmd("notify", "list", "--state", "cancelled", "--json",
                                         "--data-dir", str(tmp_path)),
                            check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in listed.splitlines() if line.strip()]
    assert {row["state"] for row in rows} == {"cancelled"} and len(rows) == 2
    assert any("acknowledged by kari" in row["last_error"] for row in rows)


def incident(state: str) -> Incident:
    return Incident(id=7, rule="r", gateway="g", device="d", severity="critical", state=state,
                    summary="s", detail="d", triggered_ms=0, acknowledged_ms=None,
                    acknowledged_by="kari" if state == "acknowledged" else None,
                    resolved_ms=None, resolved_by="ola" if state == "resolved" else None)


@pytest.mark.parametrize(("kind", "state", "cancelled"), [
    ("escalation", "open", False), ("escalation", "acknowledged", True),
    ("escalation", "resolved", True), ("firing", "acknowledged", False),
    ("firing", "resolved", False), ("resolved", "resolved", False),
])
def test_it_cancels_only_reminders_of_incidents_someone_has(kind: str, state: str,
                                                            cancelled: bool) -> None:
    assert (cancel_reason(note(1, incident=7, kind=kind), incident(state)) is not None) \
        == cancelled


# -- 16: the channel's reason; permanent errors stop at once; criticals are never abandoned --------


def test_it_fails_at_once_with_the_smtp_reply_and_alerts_on_another_channel(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    refusing = RefusingMailbox()
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": refusing.url(),
                              "CAREFLOW_CHANNEL_OPS": receiver.url("/ops")})
    (tmp_path / "r.yaml").write_text("rules: []\n")
    store = SqliteStore(tmp_path / "db")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), channels)
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    try:
        alarm = open_alarm(store, 1, "oncall")
        assert sender.deliver_due(now_ms=10) == 1
    finally:
        refusing.stop()
    failed = the_note(store, alarm)
    # permanent: no quick second attempt, counted as failing at once; a care alarm of an open
    # incident is kept all the same (retried at the longest backoff until the channel is fixed)
    assert (failed.state, failed.attempts) == ("pending", MAX_ATTEMPTS)
    assert failed.next_attempt_ms >= 10 + 300_000
    assert "SMTP 550" in (failed.last_error or "")
    assert "nobody@example.org" in (failed.last_error or "")
    assert store.failing_channels().keys() == {"oncall"}
    stage.check_self({"hub-notifications-failing": "1 notification failed"}, now_ms=20)
    (self_alert,) = [n for n in store.notifications() if n.incident_id != alarm]
    assert self_alert.channel == "ops"  # critical goes to oncall by default, which fails
    assert sender.deliver_due(now_ms=30) == 1
    (told,) = receiver.to("/ops")
    assert "hub-notifications-failing" in told["title"]


def test_it_fails_at_once_with_the_http_status_on_401(tmp_path: Path) -> None:
    refusing = JsonReceiver(status=401)
    try:
        channels = load_channels({"CAREFLOW_CHANNEL_OPS": refusing.url("/hook/s3cr3t-token")})
        store = SqliteStore(tmp_path / "db")
        warning = open_alarm(store, 1, "ops", severity="warning")
        sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
        assert sender.deliver_due(now_ms=10) == 1
    finally:
        refusing.close()
    failed = the_note(store, warning)
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert (failed.last_error or "").startswith("HTTP 401")
    assert "s3cr3t-token" not in (failed.last_error or "")  # a URL token stays out of the store


def test_it_keeps_retrying_a_critical_notification_while_its_incident_is_open(
    tmp_path: Path,
) -> None:
    nobody = f"json://127.0.0.1:{free_port()}/x"  # nothing listens: connection refused
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": nobody, "CAREFLOW_CHANNEL_OPS": nobody})
    store = SqliteStore(tmp_path / "db")
    alarm = open_alarm(store, 1, "oncall")
    warning = open_alarm(store, 2, "ops", severity="warning")
    sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    for _ in range(MAX_ATTEMPTS + 3):  # each time, when the latest retry is due
        sender.deliver_due(now_ms=max(n.next_attempt_ms for n in store.notifications()))
    kept = the_note(store, alarm)
    assert (kept.state, kept.attempts) == ("pending", MAX_ATTEMPTS + 3)
    assert "Connection refused" in (kept.last_error or "")
    assert the_note(store, warning).state == "failed"
    assert the_note(store, warning).attempts == MAX_ATTEMPTS
    assert store.count_notifications(states=("pending",), min_attempts=MAX_ATTEMPTS) == 1
    store.resolve_incident(alarm, by="ola", at_ms=20)
    sender.deliver_due(now_ms=kept.next_attempt_ms)  # resolved: an ordinary notification again
    assert the_note(store, alarm).state == "failed"


def test_it_keeps_a_critical_alarm_through_a_refusal_that_looks_permanent(
    tmp_path: Path,
) -> None:
    """A 404 from a flaky proxy (or a 401 while a token is rotated) must not lose a care alarm:
    it is kept while its incident is open, counted for the self-alert at once, and goes out
    when the channel answers again."""
    proxy = JsonReceiver(status=404)
    try:
        channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": proxy.url("/oncall")})
        store = SqliteStore(tmp_path / "db")
        alarm = open_alarm(store, 1, "oncall")
        sender = NotificationSender(SqliteStore(tmp_path / "db"), channels)
        assert sender.deliver_due(now_ms=10) == 1
        kept = the_note(store, alarm)
        assert kept.state == "pending" and (kept.last_error or "").startswith("HTTP 404")
        assert store.count_notifications(states=("pending",), min_attempts=MAX_ATTEMPTS) == 1
        proxy.status = 200  # the proxy works again
        assert sender.deliver_due(now_ms=kept.next_attempt_ms) == 1
    finally:
        proxy.close()
    assert the_note(store, alarm).state == "sent"
    assert len(proxy.to("/oncall")) == 2


def test_it_tells_another_channel_soon_when_a_care_alarm_cannot_get_through(
    tmp_path: Path,
) -> None:
    """The oncall channel is down (connection refused): counting only notifications past
    MAX_ATTEMPTS, the hub said so after ten attempts, 8.5 minutes of backoff, while a care
    alarm went nowhere and the ops channel worked. A critical one counts after three."""
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    nobody = f"json://127.0.0.1:{free_port()}/x"
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": nobody})
    alarm = open_alarm(store, 1, "oncall")
    sender = NotificationSender(SqliteStore(settings.db_path), channels)
    for _ in range(FAILING_AFTER_ATTEMPTS):
        sender.deliver_due(now_ms=the_note(store, alarm).next_attempt_ms)
    assert the_note(store, alarm).attempts == FAILING_AFTER_ATTEMPTS < MAX_ATTEMPTS
    problem = service._self_problems().get("hub-notifications-failing", "")
    assert "oncall: the channel did not take the message" in problem
    store.close()


def test_it_tells_another_channel_when_a_channels_sender_is_stuck(tmp_path: Path) -> None:
    """A channel's sender that cannot get to its notifications (a store error every round, a
    plugin that hangs, a dead thread) never records an attempt: without a check of what is
    overdue, a care alarm waited there unsent and nothing said so."""
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    now_ms = clock.now_ms()
    alarm = open_alarm(store, 1, "oncall", at_ms=now_ms - NOTIFICATION_OVERDUE_MS - 1000)
    assert "hub-notifications-failing" not in service._self_problems()  # it just started
    service._started_ms -= NOTIFICATION_OVERDUE_MS  # up for a while, and still not sent
    problem = service._self_problems().get("hub-notifications-failing", "")
    assert "oncall: 1 notification(s) due" in problem
    assert the_note(store, alarm).attempts == 0  # no sender ever got to it
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                              "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"})
    (tmp_path / "r.yaml").write_text("rules: []\n")
    stage = AlertStage(store, load_rules([tmp_path / "r.yaml"]), channels)
    stage.check_self({"hub-notifications-failing": problem}, now_ms=now_ms)
    (self_alert,) = [n for n in store.notifications() if n.incident_id != alarm]
    assert self_alert.channel == "ops"  # not through the stuck one
    store.close()


def test_it_tells_again_when_another_channel_starts_failing_under_an_old_self_alert(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    """A warning failed for good once keeps hub-notifications-failing open (the count of failed
    ones never shrinks), and someone acknowledged it. Later the oncall channel fails for a care
    alarm: that must be said again, not hidden under the old acknowledged incident."""
    settings = make_settings(tmp_path / "data", "mqtt://127.0.0.1:1")  # never connected here
    store = SqliteStore(settings.db_path)
    service = HubService(settings, store)
    (tmp_path / "r.yaml").write_text("rules: []\n")
    rules = load_rules([tmp_path / "r.yaml"])
    refusing = JsonReceiver(status=401)
    try:  # then: the ops webhook refuses a warning for good; oncall hears of it
        before = load_channels({"CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall"),
                                "CAREFLOW_CHANNEL_OPS": refusing.url("/ops")})
        old = open_alarm(store, 1, "ops", severity="warning")
        sender = NotificationSender(SqliteStore(settings.db_path), before)
        sender.deliver_due(now_ms=10)
        assert the_note(store, old).state == "failed"
        AlertStage(store, rules, before).check_self(service._self_problems(), now_ms=20,
                                                    again=service._self_news())
        sender.deliver_due(now_ms=max(n.next_attempt_ms for n in store.notifications()))
    finally:
        refusing.close()
    (told,) = receiver.to("/oncall")
    assert "hub-notifications-failing" in told["title"]
    (self_incident,) = [i for i in store.incidents(limit=10) if i.gateway != "gw-1"]
    assert store.acknowledge_incident(self_incident.id, by="kari", at_ms=30)

    # now: ops is fixed (a warning goes through), the oncall channel is down for a care alarm
    nobody = f"json://127.0.0.1:{free_port()}/x"
    after = load_channels({"CAREFLOW_CHANNEL_ONCALL": nobody,
                           "CAREFLOW_CHANNEL_OPS": receiver.url("/ops")})
    sender = NotificationSender(SqliteStore(settings.db_path), after)
    open_alarm(store, 3, "ops", severity="warning", at_ms=40)
    alarm = open_alarm(store, 2, "oncall", at_ms=40)
    for _ in range(FAILING_AFTER_ATTEMPTS):
        sender.deliver_due(now_ms=the_note(store, alarm).next_attempt_ms)
    AlertStage(store, rules, after).check_self(service._self_problems(), now_ms=50,
                                               again=service._self_news())
    sender.deliver_due(now_ms=the_note(store, alarm).next_attempt_ms - 1)
    said = [b for b in receiver.to("/ops") if "hub-notifications-failing" in b["title"]]
    assert said and "oncall" in said[-1]["message"], receiver.to("/ops")
    store.close()


@pytest.mark.parametrize(("attempts", "permanent", "critical_open", "final"), [
    (1, True, True, False), (1, True, False, True), (MAX_ATTEMPTS - 1, False, False, False),
    (MAX_ATTEMPTS, False, False, True), (MAX_ATTEMPTS * 100, False, True, False),
])
def test_it_gives_up_only_on_permanent_errors_or_spent_attempts(
    attempts: int, permanent: bool, critical_open: bool, final: bool,
) -> None:
    assert gives_up(attempts=attempts, permanent=permanent, critical_open=critical_open) == final


@pytest.mark.parametrize(("lines", "reason", "permanent"), [
    (["Failed to send JSON POST notification: Unauthorized, error=401."], "HTTP 401", True),
    (["Failed to send JSON POST notification: Not Found, error=404."], "HTTP 404", True),
    (["Failed to send JSON POST notification: Too Many Requests, error=429."], "HTTP 429", False),
    (["Failed to send JSON POST notification: Bad Gateway, error=502."], "HTTP 502", False),
    (["Socket Exception: (535, b'5.7.8 Authentication credentials invalid')"],
     "SMTP 535 5.7.8 Authentication credentials invalid", True),
    (["SMTP recipient a@b.org was refused: 550 b'5.1.1 unknown'"], "SMTP 550 5.1.1 unknown", True),
    (["Socket Exception: (421, b'4.7.0 Try again later')"], "SMTP 421 4.7.0 Try again later",
     False),
    (["Socket Exception: [Errno 111] Connection refused"], "the channel did not take", False),
    (["Socket Exception: timed out"], "the channel did not take", False),
    ([], "the channel did not take the message", False),
])
def test_it_reads_the_reason_and_its_permanence_from_apprise_log_lines(
    lines: list[str], reason: str, permanent: bool,
) -> None:
    error = failure_from_log(lines)
    assert str(error).startswith(reason) and error.permanent == permanent


@given(st.lists(st.text(max_size=300), max_size=8),
       st.text(st.characters(blacklist_characters="*"), min_size=6, max_size=40))
def test_it_never_fails_on_any_log_and_never_keeps_a_secret(lines: list[str],
                                                            secret: str) -> None:
    error = failure_from_log([*lines, f"url: https://x.org/{secret}"], secrets=[secret])
    assert len(str(error)) <= 600
    assert secret not in str(error)


def test_it_treats_url_tokens_and_passwords_as_secrets_but_not_hosts_or_recipients() -> None:
    secrets = url_secrets("mailtos://user:hunter2pass@smtp.example.org?to=oncall@example.org")
    assert "hunter2pass" in secrets and "smtp.example.org" not in secrets
    assert "oncall" not in secrets
    assert "abc123token" in url_secrets("discord://1234567/abc123token")


@pytest.mark.parametrize(("url", "secret"), [
    ("json://hooks.example.org/careflow?+Authorization=Bearer%20s3cr3tt0ken", "s3cr3tt0ken"),
    ("json://hooks.example.org/careflow?+Authorization=Bearer+s3cr3tt0ken", "s3cr3tt0ken"),
    ("mailtos://oncall:s3cr3t%2Ft0ken@smtp.example.org?to=oncall@example.org", "s3cr3t/t0ken"),
])
def test_it_keeps_a_token_out_of_the_reason_as_the_server_echoes_it_decoded(
    url: str, secret: str,
) -> None:
    """A header value or password is %-encoded in the URL, but a server's answer (Response
    Details) shows it decoded: redacting only the URL's spelling let the token through."""
    echoed = f"Response Details:\r\n{{'Authorization': 'Bearer {secret}', 'pass': '{secret}'}}"
    assert secret not in str(failure_from_log([echoed], secrets=url_secrets(url)))


def test_it_routes_the_self_alert_around_failing_channels() -> None:
    assert avoid_failing(("oncall",), failing={"oncall"}, configured=("oncall", "ops")) == ("ops",)
    assert avoid_failing(("oncall", "ops"), failing={"oncall"}, configured=("oncall", "ops")) \
        == ("ops",)
    assert avoid_failing(("oncall",), failing=set(), configured=("oncall", "ops")) == ("oncall",)
    assert avoid_failing(("oncall",), failing={"oncall", "ops"},
                         configured=("oncall", "ops")) == ("oncall",)


# -- the edges: unknown channels, a store error mid-send, `careflow notify test` -----------------


def test_it_fails_a_notification_for_a_channel_that_is_not_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x"})
    store = SqliteStore(tmp_path / "db")
    ghost = open_alarm(store, 1, "ghost", severity="warning")  # a channel removed, a restart
    sender = NotificationSender(store, channels)
    with caplog.at_level(logging.ERROR, logger="careflow.hub.alerting.notify"):
        assert sender.deliver_due(now_ms=10) == 1
    failed = the_note(store, ghost)
    assert failed.state == "failed" and "CAREFLOW_CHANNEL_GHOST" in (failed.last_error or "")
    # failed for good like any other, and logged as a permanent refusal is
    assert [r.message for r in caplog.records] == ["notification failed for good"]


def test_it_keeps_a_care_alarm_for_a_channel_not_configured_until_it_is(
    tmp_path: Path, receiver: JsonReceiver,
) -> None:
    """A care alarm queued for a channel, then the hub restarted without that channel (a
    secret file not mounted yet, a rename): kept while its incident is open, counted for the
    self-alert, and sent once the channel is back."""
    store = SqliteStore(tmp_path / "db")
    alarm = open_alarm(store, 1, "oncall")
    without = NotificationSender(SqliteStore(tmp_path / "db"), load_channels(
        {"CAREFLOW_CHANNEL_OPS": receiver.url("/ops")}))
    assert without.deliver_due(now_ms=10) == 1
    kept = the_note(store, alarm)
    assert kept.state == "pending" and "CAREFLOW_CHANNEL_ONCALL" in (kept.last_error or "")
    assert store.count_notifications(states=("pending",), min_attempts=MAX_ATTEMPTS) == 1
    back = NotificationSender(SqliteStore(tmp_path / "db"), load_channels(
        {"CAREFLOW_CHANNEL_OPS": receiver.url("/ops"),
         "CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall")}))
    assert back.deliver_due(now_ms=kept.next_attempt_ms) == 1
    assert the_note(store, alarm).state == "sent" and len(receiver.to("/oncall")) == 1


class StoreThatFailsToRecord(SqliteStore):
    """A real store whose first writes of a delivery result fail (database locked)."""

    failures = 5

    def finish_notification(self, notification_id: int, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            msg = "cannot record a notification in the event store: database is locked"
            raise StoreError(msg)
        super().finish_notification(notification_id, **kwargs)


class StoreThatFailsBeforeSending(SqliteStore):
    """A real store whose first read of an incident at send time fails, after the claim."""

    failures = 1

    def incident(self, incident_id: int) -> Incident | None:
        if self.failures:
            self.failures -= 1
            msg = "cannot read the event store: database is locked"
            raise StoreError(msg)
        return super().incident(incident_id)


@pytest.mark.parametrize("failing_store", [StoreThatFailsToRecord, StoreThatFailsBeforeSending],
                         ids=["records-again-never-sends-again", "sends-what-was-left-claimed"])
def test_it_sends_a_care_alarm_exactly_once_through_store_errors_around_the_send(
    tmp_path: Path, receiver: JsonReceiver, failing_store: type[SqliteStore],
) -> None:
    """The store refuses to record the result five times (the message went out: it is
    recorded again, never sent again), or fails once after the claim, before the send (what
    it left claimed is sent): either way the care alarm goes out once, with its ref."""
    channels = load_channels({"CAREFLOW_CHANNEL_ONCALL": receiver.url("/oncall")})
    store = SqliteStore(tmp_path / "db")
    alarm = open_alarm(store, 1, "oncall")
    sender = NotificationSender(failing_store(tmp_path / "db"), channels)
    sender.start()
    try:
        wait_until(lambda: the_note(store, alarm).state == "sent", what="sent and recorded")
    finally:
        sender.stop()
    (once,) = receiver.to("/oncall")
    assert "Ref: careflow-n1" in once["message"]


def test_it_says_why_a_test_message_was_refused() -> None:
    refusing = JsonReceiver(status=401)
    try:
        result = subprocess.run(careflow_cmd("notify", "test", "ops"), capture_output=True,
                                text=True, check=False, env={
                                    **os.environ, "CAREFLOW_CHANNEL_OPS": refusing.url("/x")})
    finally:
        refusing.close()
    assert result.returncode != 0
    assert "HTTP 401" in result.stderr and "credentials" in result.stderr


def test_it_keeps_only_the_start_of_a_huge_answer_that_apprise_logs_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver answers a refusal with 20 MB, and Apprise's Rocket.Chat plugin logs the whole
    answer: the sender reads the reason from the start of it, not from all of it (the spy
    only watches what reaches the pure parser; the server and Apprise are real)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415

    huge = b"no " * 7_000_000

    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", str(len(huge)))
            self.end_headers()
            self.wfile.write(huge)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen: list[list[str]] = []

    def spy(lines: list[str], **kwargs: Any) -> TransportError:
        seen.append(list(lines))
        return failure_from_log(lines, **kwargs)

    monkeypatch.setattr(apprise_transport, "failure_from_log", spy)
    try:
        transport = AppriseTransport(
            f"rocket://careflow:hunter2pass@127.0.0.1:{server.server_address[1]}/#alerts")
        with pytest.raises(TransportError) as refused:
            transport.send("careflow test", "a message")
    finally:
        server.shutdown()
    assert str(refused.value).startswith("HTTP 401") and refused.value.permanent
    (lines,) = seen
    assert lines and sum(len(line) for line in lines) <= 50 * 16_000


def test_it_fails_a_notification_for_an_unknown_channel_behind_a_thousand_newer_ones(
    tmp_path: Path,
) -> None:
    """The check for unknown channels looked at the newest 1,000 pending notifications only:
    one queued before a burst on a working channel was never failed nor kept as such."""
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x"})
    store = SqliteStore(tmp_path / "db")
    ghost = open_alarm(store, 0, "ghost", severity="warning")
    incident = store.open_incident(
        rule="battery-low", gateway="gw-1", device="dev-1", severity="warning", summary="low",
        detail="low", at_ms=1, notify=[("ops", f"low {n}", "battery low") for n in range(1000)])
    assert incident is not None
    NotificationSender(store, channels).deliver_due(now_ms=10)
    (failed,) = [n for n in store.notifications(limit=2000) if n.incident_id == ghost]
    assert failed.state == "failed" and "CAREFLOW_CHANNEL_GHOST" in (failed.last_error or "")


def test_it_leaves_nothing_claimed_when_the_store_refuses_an_unknown_channels_failure(
    tmp_path: Path,
) -> None:
    """Nothing was sent, so what the check for unknown channels claimed is pending again when
    the store refuses the result: left 'sending' until a restart, it was neither failed nor
    counted as failing."""
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x"})
    store = SqliteStore(tmp_path / "db")
    ghost = open_alarm(store, 1, "ghost", severity="warning")
    refusing = StoreThatFailsToRecord(tmp_path / "db")
    refusing.failures = 1
    sender = NotificationSender(refusing, channels)
    with pytest.raises(StoreError):
        sender.deliver_due(now_ms=10)
    assert the_note(store, ghost).state == "pending"
    sender.deliver_due(now_ms=10)
    assert the_note(store, ghost).state == "failed"
