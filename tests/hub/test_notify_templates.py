"""WhatsApp message templates: the request Apprise sends carries the template.

The WhatsApp Cloud API cannot be reached here, and Apprise's WhatsApp plugin has no URL option
for another host: the test points the plugin instance's ``notify_url`` (a class attribute naming
graph.facebook.com) at a real local HTTP receiver, then asserts on the real request Apprise made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from careflow.core.errors import ConfigError
from careflow.hub.alerting.notify import NotificationSender, load_channels, template_text
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import HttpReceiver

WHATSAPP = "whatsapp://abc123token@1234567/+4799999999"


def test_it_sends_a_whatsapp_template_with_the_message_as_its_parameter(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    channels = load_channels({"CAREFLOW_CHANNEL_FAMILY": WHATSAPP,
                              "CAREFLOW_CHANNEL_FAMILY_TEMPLATE": "careflow_alert",
                              "CAREFLOW_CHANNEL_FAMILY_LANGUAGE": "nb"})
    assert set(channels) == {"family"}  # the settings are not channels of their own
    assert "template=careflow_alert" in channels["family"].url
    store = SqliteStore(tmp_path / "db")
    store.open_incident(rule="care-alarm", gateway="gw-1", device="fall-1", severity="critical",
                        summary="CARE ALARM fall-1", detail="fall", at_ms=1,
                        notify=[("family", "[CRITICAL] CARE ALARM fall-1",
                                 "What: CARE ALARM\nWhere: gw-1 / fall-1\n\n\tSince: now")])
    sender = NotificationSender(store, channels)
    plugin = sender._transports["family"].client[0]  # the seam named in the docstring
    plugin.notify_url = f"http://127.0.0.1:{http_receiver.port}/{{fb_ver}}/{{phone_id}}/messages"
    assert sender.deliver_due(now_ms=10) == 1

    ((method, path, body, _),) = http_receiver.requests
    assert (method, path) == ("POST", f"/{plugin.fb_graph_version}/1234567/messages")
    assert body["type"] == "template" and body["to"] == "+4799999999"
    assert body["template"]["name"] == "careflow_alert"
    assert body["template"]["language"] == {"code": "nb"}
    (parameter,) = body["template"]["components"][0]["parameters"]
    assert parameter["type"] == "text"
    assert parameter["text"] == ("[CRITICAL] CARE ALARM fall-1 | What: CARE ALARM Where: gw-1 / "
                                 "fall-1 Since: now | Ref: careflow-n1")
    assert store.notifications(states=("sent",))


def test_it_sends_a_burst_to_whatsapp_in_as_many_templates_as_it_takes_none_cut(
    tmp_path: Path, http_receiver: HttpReceiver,
) -> None:
    """A template parameter holds 1,024 characters: a digest of twelve alarms cut there would
    be recorded as sent while most alarms never reached anyone."""
    channels = load_channels({"CAREFLOW_CHANNEL_FAMILY": WHATSAPP,
                              "CAREFLOW_CHANNEL_FAMILY_TEMPLATE": "careflow_alert"})
    store = SqliteStore(tmp_path / "db")
    for n in range(12):
        store.open_incident(rule="care-alarm", gateway=f"gw-{n}", device=f"fall-{n}",
                            severity="critical", summary=f"CARE ALARM fall-{n}", detail="fall",
                            at_ms=1, notify=[("family", f"[CRITICAL] CARE ALARM fall-{n}.",
                                              "What: fall\nWhere: room " + "x" * 150)])
    sender = NotificationSender(store, channels)
    plugin = sender._transports["family"].client[0]  # the seam named in the docstring
    plugin.notify_url = f"http://127.0.0.1:{http_receiver.port}/{{fb_ver}}/{{phone_id}}/messages"
    while sender.deliver_due(now_ms=10):
        pass
    texts = [body["template"]["components"][0]["parameters"][0]["text"]
             for _, _, body, _ in http_receiver.requests]
    assert len(texts) > 1 and all(len(text) <= 1024 for text in texts)
    for n in range(12):
        assert sum(f"CARE ALARM fall-{n}." in text for text in texts) >= 1, n
    assert len(store.notifications(states=("sent",))) == 12


def test_it_cuts_a_template_parameter_to_1024_characters_keeping_the_ref() -> None:
    text = template_text("t", "x" * 5000, "careflow-n7")
    assert len(text) == 1024 and text.endswith(" | Ref: careflow-n7") and "\n" not in text


def test_it_refuses_a_template_on_a_channel_that_is_not_whatsapp() -> None:
    with pytest.raises(ConfigError, match="CAREFLOW_CHANNEL_OPS_TEMPLATE"):
        load_channels({"CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/x",
                       "CAREFLOW_CHANNEL_OPS_TEMPLATE": "careflow_alert"})
