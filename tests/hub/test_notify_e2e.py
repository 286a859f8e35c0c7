"""Incidents reach people: a real SMTP server (aiosmtpd) and a real HTTP webhook receiver."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import NotificationSender, load_channels, retry_delay_ms
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import (
    HttpReceiver,
    Mosquitto,
    RunningHub,
    free_port,
    make_settings,
    wait_until,
)
from tests.hub.conftest import Mailbox, publish
from tests.hub.test_alerting_e2e import RULES

pytestmark = pytest.mark.broker


def test_it_notifies_by_channel_and_delivers_after_an_smtp_outage(
    mosquitto: Mosquitto, tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    hook_url = f"json://127.0.0.1:{http_receiver.port}/careflow"
    mail_port = free_port()
    mailbox = Mailbox(mail_port)  # not started yet: the SMTP server is down at first
    channels = load_channels({
        "CAREFLOW_CHANNEL_OPS": hook_url,
        "CAREFLOW_CHANNEL_ONCALL": f"mailto://127.0.0.1:{mail_port}?from=careflow@example.org"
                                   "&to=oncall@example.org",
    })
    (tmp_path / "rules.yaml").write_text(RULES.replace("kind: event\n", "kind: event\n"
                                                       "    severity: critical\n"))
    settings = make_settings(tmp_path / "data", mosquitto.url)
    hub = RunningHub(settings, load_rules([tmp_path / "rules.yaml"]), channels=channels)
    assert hub.alerts is not None and hub.sender is not None
    hub.alerts.group_wait_ms = 1500  # short, so the test need not wait 30 s
    sender = hub.sender
    hub.start()
    try:
        doors = [Stamper(gateway="gw-n", device=f"door-{n}") for n in range(3)]
        fall = Stamper(gateway="gw-n", device="fall-1")
        publish(mosquitto, [*(d.stamp("status", {"state": "degraded", "battery_pct": 9})
                              for d in doors),
                            fall.stamp("alert", {"kind": "fall", "state": "raised"})])
        wait_until(lambda: http_receiver.bodies, what="the ops webhook")
        time.sleep(2)  # longer than the group wait: nothing else may follow
        # three battery alerts of gw-n, one message (and, if the care alarm's email failed
        # three times by then, the hub saying so: hub-notifications-failing)
        (grouped,) = [b for b in http_receiver.bodies if "careflow hub:" not in b["title"]]
        assert grouped["title"].startswith("[3 alerts] gw-n")
        assert all(f"door-{n}" in grouped["message"] for n in range(3))
        wait_until(lambda: sender.store.notifications(states=("pending",))
                   and sender.store.notifications(states=("pending",))[0].attempts >= 1,
                   what="a failed email attempt while SMTP is down")
        mailbox.start()
        wait_until(lambda: len(mailbox.messages) == 1, timeout_s=20,
                   what="the email once SMTP is back")
        assert "CARE ALARM" in mailbox.messages[0] or "care-alarm" in mailbox.messages[0]
        assert "fall-1" in mailbox.messages[0]
        # the sender records the delivery just after the SMTP server took it
        wait_until(lambda: {n.channel for n in sender.store.notifications(states=("sent",))}
                   == {"ops", "oncall"}, what="both deliveries recorded")
        wait_until(lambda: not sender.store.notifications(states=("pending", "sending",
                                                                  "failed")),
                   what="nothing left to send (the hub's own alert, if any, resolved)")
    finally:
        hub.stop()
        mailbox.stop()


def test_it_backs_off_exponentially_with_a_cap() -> None:
    assert [retry_delay_ms(n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]
    assert retry_delay_ms(30) == 300_000


def test_it_refuses_to_start_when_a_route_has_no_channel(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    store = SqliteStore(tmp_path / "db")
    ops_only = load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x"})
    rules = load_rules([tmp_path / "r.yaml"])
    with pytest.raises(Exception, match="CAREFLOW_CHANNEL_ONCALL"):
        AlertStage(store, rules, ops_only)


def test_it_rejects_a_channel_url_apprise_cannot_use() -> None:
    with pytest.raises(Exception, match="CAREFLOW_CHANNEL_OPS"):
        load_channels({"CAREFLOW_CHANNEL_OPS": "bogus://nothing"})




def test_it_delivers_once_what_a_killed_hub_had_written_or_claimed(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """The crash windows of the outbox: written but not claimed, and claimed but not sent.

    A hub process killed in either window leaves the row behind; the next hub's sender releases
    what was claimed and delivers each notification once (tested on the real store and a real
    HTTP receiver; a SIGKILL cannot be aimed between two statements reliably).
    """
    store = SqliteStore(tmp_path / "db")
    channels = load_channels({"CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{http_receiver.port}/x",
                              "CAREFLOW_CHANNEL_ONCALL": f"json://127.0.0.1:{http_receiver.port}/y"})
    for n in range(2):
        store.open_incident(rule="battery-low", gateway=f"gw-{n}", device="d", severity="warning",
                            summary=f"battery d{n}", detail="5 %", at_ms=1,
                            notify=[("ops", f"battery d{n}", "body")])
    (claimed,) = store.claim_notifications(now_ms=10, limit=1)  # then the hub "dies"
    assert claimed.state == "sending"
    restarted = NotificationSender(SqliteStore(tmp_path / "db"), channels)
    restarted.start()
    try:
        wait_until(lambda: len(store.notifications(states=("sent",))) == 2, what="recorded")
    finally:
        restarted.stop()
    # both due at once on one channel: one digest or two messages, each notification in one
    refs = [body["message"].rsplit("Ref: careflow-", 1)[1].strip().split("+")
            for body in http_receiver.bodies]
    assert sorted(ref for message in refs for ref in message) == ["n1", "n2"]
    assert "battery d0" in str(http_receiver.bodies) and "battery d1" in str(http_receiver.bodies)
