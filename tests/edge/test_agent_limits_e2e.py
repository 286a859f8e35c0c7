"""The agent under bad luck and hostile input, against a real Mosquitto and a real hub.

Spool entries it cannot read, a reading over the broker's packet limit, a care alarm the contract
refuses, and a backlog in front of a new alarm: the gateway stays on the air, the hub hears about
what was refused, and care alarms go first.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from careflow.core.config import parse_broker_url
from careflow.core.errors import ContractError
from careflow.core.mqtt import connect_blocking, make_client
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.edge.stamper import Stamper, new_event_id
from careflow.hub.alerting.rules import load_rules
from careflow.hub.store.records import EventFilter
from careflow.schemas.limits import MAX_EVENT_BYTES, MAX_MESSAGE_BYTES
from tests.conftest import Mosquitto, RunningHub, wait_until
from tests.edge.conftest import AgentThread, spool

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RULES = Path(__file__).parents[2] / "rules" / "default.yaml"


def config(mosquitto: Mosquitto, data_dir: Path, gateway: str, **kw: Any) -> AgentConfig:
    settings: dict[str, Any] = {"heartbeat_interval_s": 3600, "keepalive_s": 5,
                                "batch_linger_s": 0.1, "resend_after_s": 30,
                                "outbox_sync": "normal", **kw}
    return AgentConfig(gateway=gateway, broker=parse_broker_url(mosquitto.url),
                       data_dir=data_dir, **settings)


def errors(hub: RunningHub, gateway: str, code: str) -> list[dict[str, Any]]:
    return [dict(e.data) for e in hub.store.query(EventFilter(gateway=gateway, type="error"),
                                                   limit=1000) if e.data.get("code") == code]


def test_it_forwards_a_care_alarm_past_spool_entries_it_cannot_read(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    run_agent: Callable[[AgentConfig], AgentThread], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url)
    agent_dir = tmp_path / "gw-luck"
    entries = agent_dir / "spool"
    entries.mkdir(parents=True)
    (entries / "a-directory.jsonl").mkdir()
    (entries / "b-dangling.jsonl").symlink_to(entries / "nowhere")
    (entries / "c-undecodable.jsonl").write_bytes(b"\xff\xfe\x00\x00binary\x00\n\x89PNG\r\n")
    spool(agent_dir, "d-alarm", [{"device": "sos-1", "type": "alert",
                                  "data": {"kind": "sos", "state": "raised"}}])
    agent = run_agent(config(mosquitto, agent_dir, "gw-luck"))

    wait_until(lambda: hub.store.count(EventFilter(gateway="gw-luck", type="alert")) == 1
               or not agent.thread.is_alive(), what="the care alarm behind the bad entries")
    assert agent.thread.is_alive()
    assert hub.store.count(EventFilter(gateway="gw-luck", type="alert")) == 1
    wait_until(lambda: len(errors(hub, "gw-luck", "E_SPOOL_UNREADABLE")) == 2,
               what="both unreadable entries reported")
    assert sorted(d["file"] for d in errors(hub, "gw-luck", "E_SPOOL_UNREADABLE")) == [
        "a-directory.jsonl", "b-dangling.jsonl"]
    refused = errors(hub, "gw-luck", "E_EVENT_REFUSED")  # the undecodable file's two lines
    assert sorted(d["source"] for d in refused) == [
        "spool c-undecodable.jsonl line 1", "spool c-undecodable.jsonl line 2"]
    assert sorted(p.name for p in (entries / "quarantine").iterdir()) == [
        "a-directory.jsonl", "b-dangling.jsonl"]
    assert hub.store.dead_letter_count() == 0


def test_it_stays_on_the_air_with_readings_over_the_brokers_packet_limit(
    hub_factory: Callable[..., RunningHub], run_agent: Callable[[AgentConfig], AgentThread],
    tmp_path: Path,
) -> None:
    # Mosquitto closes the connection of a client that sends a packet over max_packet_size.
    # MAX_MESSAGE_BYTES of payload, plus room for the fixed header and the topic:
    workdir = tmp_path / "tight-broker"
    workdir.mkdir()
    broker = Mosquitto(workdir, max_packet_size=MAX_MESSAGE_BYTES + 512)
    broker.start()
    try:
        hub = hub_factory(broker.url)
        agent_dir = tmp_path / "gw-big"
        legacy = plant_a_legacy_oversized_event(agent_dir, "gw-big")
        blob = "r" * 20_000  # 100 of these are 2 MB: one batch by count, eleven by bytes
        spool(agent_dir, "a-readings", [
            {"device": f"cam-{i % 3}", "type": "status", "data": {"state": "ok", "n": i,
                                                                  "blob": blob}}
            for i in range(100)])
        spool(agent_dir, "b-huge", [{"device": "cam-1", "type": "status",
                                     "data": {"state": "ok", "image": "i" * 400_000}}])
        spool(agent_dir, "c-after", [{"device": "door-1", "type": "status",
                                      "data": {"state": "ok"}}])
        agent = run_agent(config(broker, agent_dir, "gw-big", heartbeat_interval_s=1))
        wait_until(lambda: agent.agent.connected, what="agent connected")
        first_connection = agent.agent._conn

        wait_until(lambda: hub.store.count(EventFilter(gateway="gw-big", type="status")) == 101,
                   timeout_s=30, what="all readings but the oversized one")
        wait_until(lambda: hub.store.count(EventFilter(gateway="gw-big",
                                                       type="heartbeat")) >= 3,
                   what="heartbeats keep getting through")
        wait_until(lambda: len(errors(hub, "gw-big", "E_EVENT_REFUSED")) == 2,
                   what="the oversized reading and the legacy event reported")
        reports = {d["source"]: d for d in errors(hub, "gw-big", "E_EVENT_REFUSED")}
        assert reports["spool b-huge.jsonl line 1"]["reason_code"] == "oversized"
        assert reports["spool b-huge.jsonl line 1"]["line_bytes"] > 400_000
        assert reports[f"outbox event {legacy}"]["reason_code"] == "oversized"
        assert agent.agent._conn == first_connection  # never dropped, never reconnected
        assert hub.store.dead_letter_count() == 0
        assert "exceeded maximum packet size" not in (workdir / "mosquitto.log").read_text()
        wait_until(lambda: agent.agent.outbox.size() == 0, what="outbox drained")
    finally:
        broker.stop()


def plant_a_legacy_oversized_event(agent_dir: Path, gateway: str) -> str:
    """An event an older agent (which knew no limits) left in the outbox: it must not poison
    every batch it is packed into after the upgrade."""
    agent_dir.mkdir(parents=True)
    from careflow.edge.outbox import Outbox  # noqa: PLC0415 - only to create the schema

    Outbox(agent_dir / "outbox.db", gateway=gateway, boot="old-boot").close()
    event = Stamper(gateway=gateway, device="cam-9", boot="old-boot").stamp(
        "status", {"state": "ok", "image": "o" * (MAX_EVENT_BYTES * 3)})
    with sqlite3.connect(agent_dir / "outbox.db") as conn:
        conn.execute("INSERT INTO outbox (id, type, device, boot, seq, body) "
                     "VALUES (?, 'status', 'cam-9', 'old-boot', 1, ?)",
                     (event["id"], json.dumps(event)))
    conn.close()
    return str(event["id"])


def test_the_hub_opens_an_incident_for_a_care_alarm_the_gateway_refused(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    run_agent: Callable[[AgentConfig], AgentThread], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url, rules=load_rules([RULES]))
    agent_dir = tmp_path / "gw-sos"
    spool(agent_dir, "a", [{"device": "sos-1", "type": "alert",
                            "data": {"kind": "SOS", "state": "raised", "location": "room 12"}}])
    run_agent(config(mosquitto, agent_dir, "gw-sos"))

    def refused_alarm_incidents() -> list[Any]:
        return [i for i in hub.store.incidents(states=("open",))
                if i.rule == "refused-care-alarm"]

    wait_until(lambda: bool(refused_alarm_incidents()), what="an incident for the refused alarm")
    [incident] = refused_alarm_incidents()
    assert incident.severity == "critical" and incident.gateway == "gw-sos"
    [report] = errors(hub, "gw-sos", "E_EVENT_REFUSED")
    assert report["refused_type"] == "alert" and report["refused_device"] == "sos-1"
    assert '"kind": "SOS"' in report["line"] and "kind" in report["reason"]



def test_the_hub_opens_an_incident_for_a_spool_entry_that_may_hold_care_alarms(
    mosquitto: Mosquitto, hub_factory: Callable[..., RunningHub],
    run_agent: Callable[[AgentConfig], AgentThread], tmp_path: Path,
) -> None:
    hub = hub_factory(mosquitto.url, rules=load_rules([RULES]))
    agent_dir = tmp_path / "gw-aside"
    entries = agent_dir / "spool"
    entries.mkdir(parents=True)
    (entries / "a-directory.jsonl").mkdir()
    (entries / "b-link.jsonl").symlink_to(tmp_path / "a-bridge-that-links.jsonl")
    run_agent(config(mosquitto, agent_dir, "gw-aside"))

    def incidents() -> list[Any]:
        return [i for i in hub.store.incidents(states=("open",))
                if i.rule == "spool-entry-unreadable"]

    wait_until(lambda: bool(incidents()), what="an incident for the entry set aside")
    wait_until(lambda: len(errors(hub, "gw-aside", "E_SPOOL_UNREADABLE")) == 2,
               what="both entries reported")
    [incident] = incidents()
    assert incident.severity == "critical" and incident.gateway == "gw-aside"


class Subscriber:
    """A real MQTT subscriber that records what the broker delivers, in order."""

    def __init__(self, mosquitto: Mosquitto, topic: str) -> None:
        url = parse_broker_url(mosquitto.url)
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = make_client(client_id=f"watch-{new_event_id()}", clean_session=True,
                                  url=url)
        self.client.on_message = self._record
        connect_blocking(self.client, url)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10)

    def _record(self, _client: paho.Client, _userdata: object,
                message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def events(self, start: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
        """(topic, events) of every event message from ``start`` on; presence left out."""
        with self._lock:
            messages = self.messages[start:]
        out = []
        for topic, payload in messages:
            if topic.endswith("/state"):
                continue
            value = json.loads(payload)
            out.append((topic, value if isinstance(value, list) else [value]))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_care_alarm_goes_out_before_a_backlog_of_heartbeats_also_after_an_outage(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    watcher = Subscriber(mosquitto, "careflow/v1/gw-q/#")
    agent = EdgeAgent(config(mosquitto, tmp_path / "gw-q", "gw-q"))
    backlog = 5_000  # more than one round of sending takes (20 batches of 100)
    for _ in range(backlog):
        agent.outbox.add("gw-q", "heartbeat", {"interval_s": 60})
    first = agent.add("sos-1", "alert", {"kind": "sos", "state": "raised"})
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: sum(len(events) for _, events in watcher.events()) >= backlog + 2,
                   timeout_s=60, what="the backlog and the alarm at the subscriber")
        topic, [alarm] = watcher.events()[0]
        assert topic == "careflow/v1/gw-q/sos-1/alert" and alarm["id"] == first["id"]

        # An outage: nothing was confirmed (no hub), so everything goes again on reconnect.
        wait_until(lambda: not agent._in_flight or all(
            info.is_published() for info, _, _ in agent._in_flight), what="all acknowledged")
        agent.cut_network()
        second = agent.add("fall-1", "alert", {"kind": "fall", "state": "raised"})
        before = len(watcher.messages)
        agent.restore_network()
        wait_until(lambda: sum(len(events) for _, events in watcher.events(before)) >= backlog + 3,
                   timeout_s=60, what="everything resent after the outage")
        resent = watcher.events(before)
        assert [events[0]["id"] for _, events in resent[:2]] == [first["id"], second["id"]]
        assert all(topic.endswith("/batch") for topic, _ in resent[2:])
    finally:
        agent.stop()
        runner.join(timeout=15)
        watcher.close()


def test_a_new_care_alarm_waits_behind_at_most_one_message_of_backlog_while_it_drains(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    watcher = Subscriber(mosquitto, "careflow/v1/gw-w/#")
    agent = EdgeAgent(config(mosquitto, tmp_path / "gw-w", "gw-w"))
    agent.start()
    try:
        wait_until(lambda: agent.connected, what="agent connected")
        agent.tick(with_host_health=False)  # its first heartbeat
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)  # a broker that takes nothing for a while
        try:
            for _ in range(5_000):
                agent.outbox.add("gw-w", "heartbeat", {"interval_s": 60})
            for _ in range(10):  # rounds of sending while nothing is acknowledged
                agent.tick(with_host_health=False)
            alarm = agent.add("sos-1", "alert", {"kind": "sos", "state": "raised"})
            agent.tick(with_host_health=False)
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)

        def alarm_seen() -> bool:
            agent.tick(with_host_health=False)
            return any(events[0]["id"] == alarm["id"] for _, events in watcher.events())

        wait_until(alarm_seen, what="the alarm at the subscriber")
        received = watcher.events()
        ahead = next(i for i, (_, events) in enumerate(received) if events[0]["id"] == alarm["id"])
        bytes_ahead = sum(len(json.dumps(events)) for _, events in received[:ahead])
        assert bytes_ahead <= 2 * MAX_MESSAGE_BYTES  # 5,000 heartbeats are ~1.7 MB
    finally:
        agent.shutdown()
        watcher.close()


def test_an_event_refused_at_stamping_is_reported_and_the_caller_told(tmp_path: Path) -> None:
    agent = EdgeAgent(AgentConfig(gateway="gw-code", broker=parse_broker_url("mqtt://127.0.0.1:9"),
                                  data_dir=tmp_path))
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(5_000):  # far beyond what json.dumps or pydantic can walk
        deep = {"n": deep}
    cases = [("cam-1", "status", {"state": "ok", "image": "i" * MAX_EVENT_BYTES}, "oversized"),
             ("cam-1", "status", {"state": "ok", "deep": deep}, "too_deep"),
             ("sos-1", "alert", {"kind": "SOS", "state": "raised"}, "schema")]
    for device, event_type, data, code in cases:
        with pytest.raises(ContractError) as refused:
            agent.add(device, event_type, data)
        assert refused.value.code == code
    reports = [json.loads(p.body)["data"]
               for p in agent.outbox.due(now_ms=0, resend_after_ms=0, limit=10)]
    assert [(r["code"], r["reason_code"], r["severity"]) for r in reports] == [
        ("E_EVENT_REFUSED", "oversized", "error"), ("E_EVENT_REFUSED", "too_deep", "error"),
        ("E_EVENT_REFUSED", "schema", "critical")]
    assert reports[2]["refused_device"] == "sos-1" and '"SOS"' in reports[2]["line"]
    agent.outbox.close()


def test_no_round_reads_the_outbox_while_the_broker_owes_both_lanes_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every PUBACK wakes a round; while both windows are full nothing can be sent, so reading
    up to two messages' worth of due events (and checking each) would be work thrown away."""
    agent = EdgeAgent(AgentConfig(gateway="gw-full", broker=parse_broker_url("mqtt://127.0.0.1:9"),
                                  data_dir=tmp_path))
    agent.outbox.add("gw-full", "heartbeat", {"interval_s": 60})
    for lane in (agent._in_flight, agent._alarms_in_flight):  # unacknowledged, not expired
        lane.append((paho.MQTTMessageInfo(1), MAX_MESSAGE_BYTES, time.monotonic()))
    reads: list[object] = []
    real_due = agent.outbox.due
    monkeypatch.setattr(agent.outbox, "due", lambda **kw: reads.append(kw) or real_due(**kw))
    agent._send_due()
    assert reads == []
    agent._in_flight.clear()  # room again: the next round reads what is due
    agent._send_due()
    assert len(reads) == 1
    agent.outbox.close()


def test_data_json_cannot_hold_is_refused_and_reported_not_a_type_error(tmp_path: Path) -> None:
    """Code on the gateway may pass what JSON has no word for (a set, bytes, a tuple as a key):
    that is a refusal like any other, reported to the hub, never a TypeError that skips it."""
    agent = EdgeAgent(AgentConfig(gateway="gw-code", broker=parse_broker_url("mqtt://127.0.0.1:9"),
                                  data_dir=tmp_path))
    cases: list[dict[Any, Any]] = [{"state": "raised", "kind": "fall", ("x", 1): 2},
                                   {"state": "raised", "kind": "fall", "zones": {1, 2}},
                                   {"state": "raised", "kind": "fall", "photo": b"\xff"}]
    for data in cases:
        with pytest.raises(ContractError):
            agent.add("fall-1", "alert", data)
    reports = [json.loads(p.body)["data"]
               for p in agent.outbox.due(now_ms=0, resend_after_ms=0, limit=10)]
    assert [(r["code"], r["severity"]) for r in reports] == [
        ("E_EVENT_REFUSED", "critical")] * len(cases)
    agent.outbox.close()


def test_a_flood_of_care_alarms_never_holds_the_gateways_heartbeat_back_more_than_a_message(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    """A hostile (or broken) sensor spams alarms while the broker is slow. Alarms go first, but
    the gateway's own heartbeat must still go out, or the hub declares the gateway offline (its
    liveness is its own events): it waits behind at most one message's worth of alarms, not
    the whole flood the MQTT client was handed (1.2 MB here)."""
    watcher = Subscriber(mosquitto, "careflow/v1/gw-f/#")
    agent = EdgeAgent(config(mosquitto, tmp_path / "gw-f", "gw-f"))
    agent.start()
    flood = 4_000
    try:
        wait_until(lambda: agent.connected, what="agent connected")
        agent.tick(with_host_health=False)  # its first heartbeat
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)  # a broker that takes nothing for a while
        try:
            for n in range(flood // 2):
                agent.outbox.add(f"sos-{n % 50}", "alert", {"kind": "sos", "state": "raised"})
            for _ in range(3):
                agent.tick(with_host_health=False)
            heartbeat = agent.outbox.add("gw-f", "heartbeat", {"interval_s": 60})
            for n in range(flood // 2):  # the flood goes on
                agent.outbox.add(f"sos-{n % 50}", "alert", {"kind": "sos", "state": "raised"})
            for _ in range(3):
                agent.tick(with_host_health=False)
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)

        def seen(event_id: str) -> Callable[[], bool]:
            def check() -> bool:
                agent.tick(with_host_health=False)
                return any(e["id"] == event_id for _, events in watcher.events() for e in events)
            return check

        wait_until(seen(heartbeat["id"]), timeout_s=60, what="the heartbeat at the subscriber")
        received = watcher.events()
        ahead = next(i for i, (_, events) in enumerate(received)
                     if any(e["id"] == heartbeat["id"] for e in events))
        alarms_ahead = [events for topic, events in received[:ahead] if topic.endswith("/alert")]
        assert sum(len(json.dumps(events)) for events in alarms_ahead) <= 2 * MAX_MESSAGE_BYTES

        def every_alarm_arrived() -> bool:
            agent.tick(with_host_health=False)
            ids = {e["id"] for topic, events in watcher.events() if topic.endswith("/alert")
                   for e in events}
            return len(ids) == flood

        wait_until(every_alarm_arrived, timeout_s=60, what="every alarm of the flood")
    finally:
        agent.shutdown()
        watcher.close()


def test_queued_care_alarms_go_out_even_while_reading_the_spool_fails(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One round of work was heartbeat, spool, send: a failure reading the spool (injected here:
    a full disk, a bug) skipped the sending, round after round, so alarms already queued never
    left the gateway. Sending no longer depends on the spool."""
    watcher = Subscriber(mosquitto, "careflow/v1/gw-s/#")
    agent = EdgeAgent(config(mosquitto, tmp_path / "gw-s", "gw-s"))

    def broken_scan(*_args: object, **_kw: object) -> None:
        msg = "the spool cannot be read"
        raise OSError(msg)

    monkeypatch.setattr(agent.spool, "scan", broken_scan)
    alarm = agent.add("sos-1", "alert", {"kind": "sos", "state": "raised"})
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: any(e["id"] == alarm["id"] for _, events in watcher.events()
                               for e in events), what="the queued alarm at the subscriber")
    finally:
        agent.stop()
        runner.join(timeout=15)
        watcher.close()


def test_the_window_of_unacknowledged_messages_frees_itself_after_a_connection_drop(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    """The connection drops while the window is full (the broker stopped, no PUBACK came): the
    window must not wait for the resend timer (an hour here) to free itself, or nothing but
    alarms would leave the gateway meanwhile. The MQTT client sends its unacknowledged messages
    again on reconnect, their PUBACKs free the window, and a new heartbeat goes out."""
    watcher = Subscriber(mosquitto, "careflow/v1/gw-d/#")
    agent = EdgeAgent(config(mosquitto, tmp_path / "gw-d", "gw-d", resend_after_s=3600))
    agent.start()
    try:
        wait_until(lambda: agent.connected, what="agent connected")
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3_000):
                agent.outbox.add("gw-d", "heartbeat", {"interval_s": 60})
            agent.tick(with_host_health=False)
            assert agent._window_full(agent._in_flight)
            agent.cut_network()
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)
        agent.restore_network()
        wait_until(lambda: agent.connected, what="agent reconnected")
        fresh = agent.outbox.add("gw-d", "heartbeat", {"interval_s": 60})

        def fresh_seen() -> bool:
            agent.tick(with_host_health=False)
            return any(e["id"] == fresh["id"] for _, events in watcher.events() for e in events)

        wait_until(fresh_seen, timeout_s=60, what="a new heartbeat after the drop")
    finally:
        agent.shutdown()
        watcher.close()
