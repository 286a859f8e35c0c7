"""The gateway agent: heartbeats, presence with a Last Will, and end-to-end store-and-forward.

Every event is stamped and kept in the on-disk outbox until the hub confirms it on
``careflow/v1/{gateway}/ack``. Until then it is resent, in order and in batches, with its
original id and time; the hub's dedupe makes resends harmless. Care alarms skip the batching.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from careflow.core import __version__, clock
from careflow.core.config import BrokerUrl, TlsFiles, parse_broker_url, read_secret, tls_files
from careflow.core.errors import BrokerError, ConfigError, ContractError
from careflow.core.mqtt import make_client, tls_context
from careflow.edge.commands import CommandHandler, handle_command
from careflow.edge.identity import CA_FILE, CERT_FILE, KEY_FILE, IdentityStore
from careflow.edge.outbox import Outbox, Pending
from careflow.edge.refusal import (
    pack_batches,
    refusal_report,
    sniff_type,
    undeliverable_reason,
)
from careflow.edge.renewal import Renewer
from careflow.edge.spool import SpoolInput
from careflow.edge.stamper import new_boot_id
from careflow.provisioning.protocol import (
    AcceptedReply,
    RejectedReply,
    accepted_topic,
    rejected_topic,
    renew_topic,
)
from careflow.schemas import (
    ack_topic,
    batch_topic,
    command_topic,
    event_topic,
    format_rfc3339,
    reply_topic,
    state_topic,
)
from careflow.schemas.limits import MAX_BATCH_EVENTS, MAX_MESSAGE_BYTES

__all__ = ["AgentConfig", "EdgeAgent", "load_agent_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What one gateway's agent needs; see ``edge/edge.example.yaml``."""

    gateway: str
    broker: BrokerUrl
    data_dir: Path
    spool_dir: Path | None = None
    heartbeat_interval_s: int = 60
    keepalive_s: int = 30
    batch_max_events: int = 100
    batch_linger_s: float = 1.0
    resend_after_s: float = 30.0
    max_events: int = 100_000
    outbox_sync: str = "full"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    identity_dir: Path | None = None  # set by `careflow-edge claim`: renew the certificate
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def spool(self) -> Path:
        """The spool directory of the local input."""
        return self.spool_dir or self.data_dir / "spool"


def load_agent_config(path: Path | None, overrides: Mapping[str, Any] | None = None,
                      env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read edge.yaml (if given), then apply flag overrides; secrets come from the environment
    (``CAREFLOW_EDGE_PASSWORD``, or the file ``CAREFLOW_EDGE_PASSWORD_FILE`` names)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        import yaml  # noqa: PLC0415 - only when a file is given; saves RSS on the gateway

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read the agent configuration {path}: {exc}"
            raise ConfigError(msg) from exc
        if not isinstance(loaded, dict):
            msg = f"{path} must be a YAML mapping of settings"
            raise ConfigError(msg)
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = set(AgentConfig.__dataclass_fields__) - {"username", "password"}
    unknown = set(values) - known
    if unknown:
        msg = f"unknown agent settings: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        raise ConfigError(msg)
    for required in ("gateway", "broker", "data_dir"):
        if not values.get(required):
            msg = f"the agent needs `{required}` (in edge.yaml or as a flag)"
            raise ConfigError(msg)
    try:
        return AgentConfig(
            **{**values, "broker": parse_broker_url(str(values["broker"])),
               "data_dir": Path(values["data_dir"]),
               "spool_dir": Path(values["spool_dir"]) if values.get("spool_dir") else None,
               **{name: Path(values[name])
                  for name in ("ca_file", "cert_file", "key_file", "identity_dir")
                  if values.get(name)}},
            username=env.get("CAREFLOW_EDGE_USERNAME") or None,
            password=read_secret(env, "CAREFLOW_EDGE_PASSWORD") or None,
        )
    except TypeError as exc:
        msg = f"invalid agent settings: {exc}"
        raise ConfigError(msg) from exc


def _system_health() -> dict[str, Any]:
    """Uptime, load and disk of the gateway, from what the OS offers without extra packages."""
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        data["cpu_pct"] = round(min(100.0, os.getloadavg()[0] / (os.cpu_count() or 1) * 100), 1)
    disk = shutil.disk_usage("/")
    data["disk_pct"] = round(disk.used / disk.total * 100, 1)
    try:
        meminfo = dict(line.split(":", 1) for line in
                       Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(meminfo["MemTotal"].split()[0])
        available = int(meminfo["MemAvailable"].split()[0])
        data["mem_pct"] = round((total - available) / total * 100, 1)
    except (OSError, KeyError, ValueError):
        pass
    return data


class EdgeAgent:
    """Runs one gateway until :meth:`stop`."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.boot = new_boot_id()
        self.started = time.monotonic()
        self.outbox = Outbox(config.data_dir / "outbox.db", gateway=config.gateway,
                             boot=self.boot, max_events=config.max_events,
                             synchronous=config.outbox_sync)
        self.spool = SpoolInput(config.spool, self.outbox)
        self.confirmed = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._conn = 0
        self.renewer: Renewer | None = None
        if config.identity_dir is not None:
            identity = IdentityStore(config.identity_dir)
            self.renewer = Renewer(gateway=config.gateway, identity=identity,
                                   broker=config.broker, clock=clock)
            if config.broker.tls and config.cert_file is None:
                config = dataclasses.replace(config, ca_file=identity.current / CA_FILE,
                                             cert_file=identity.current / CERT_FILE,
                                             key_file=identity.current / KEY_FILE)
                self.config = config
        self._tls: TlsFiles | None = None
        self._ssl: ssl.SSLContext | None = None
        if config.broker.tls:  # our own context, so a renewed certificate can be loaded into it
            self._tls = tls_files(config.ca_file, config.cert_file, config.key_file)
            self._ssl = tls_context(self._tls)
        self._rotating = False
        self._client = make_client(client_id=f"careflow-gw-{config.gateway}", clean_session=True,
                                   url=config.broker, username=config.username,
                                   password=config.password, ssl_context=self._ssl)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        # handed to the MQTT client and not yet acknowledged, (info, bytes, when), in two lanes:
        # batches, and care alarms (their own lane, so a flood of alarms never holds back the
        # gateway's heartbeat by more than a message's worth, nor a backlog an alarm)
        self._in_flight: collections.deque[tuple[paho.MQTTMessageInfo, int, float]] = (
            collections.deque())
        self._alarms_in_flight: collections.deque[tuple[paho.MQTTMessageInfo, int, float]] = (
            collections.deque())
        self._arm_will()
        self.restart_requested = False
        self._next_heartbeat = 0.0
        self._handlers: dict[str, CommandHandler] = {
            "ping": self._cmd_ping, "diagnostics": self._cmd_diagnostics,
            "resend": self._cmd_resend, "restart-agent": self._cmd_restart}

    # -- remote commands (allowlisted in careflow.edge.commands) ----------------------------------

    def _cmd_ping(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        return {"pong": True, "gateway": self.config.gateway, "boot": self.boot,
                "time": format_rfc3339(datetime.now(UTC)),
                "uptime_s": round(time.monotonic() - self.started, 1)}

    def _cmd_diagnostics(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        return {"outbox_waiting": self.outbox.size(), "confirmed": self.confirmed,
                "connection": self._conn, "boot": self.boot,
                "spool_files": len(list(self.config.spool.glob("*.jsonl"))),
                "spool_quarantined": (len(list(self.spool.quarantine.iterdir()))
                                      if self.spool.quarantine.is_dir() else 0),
                "heartbeat_interval_s": self.config.heartbeat_interval_s,
                "keepalive_s": self.config.keepalive_s, **_system_health()}

    def _cmd_resend(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Resend unconfirmed events now; optional device, boot, from_seq, to_seq narrow it."""
        def number(key: str) -> int | None:
            return None if args.get(key) is None else int(args[key])

        count = self.outbox.resend(device=args.get("device"), boot=args.get("boot"),
                                   from_seq=number("from_seq"), to_seq=number("to_seq"))
        self._wake.set()
        return {"resending": count}

    def _cmd_restart(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        self.restart_requested = True  # `careflow edge run` exits 75; the supervisor restarts it
        threading.Timer(0.5, self.stop).start()
        return {"restarting": True}

    # -- presence -----------------------------------------------------------------------------

    def _presence(self, state: str, reason: str | None = None) -> str:
        body: dict[str, Any] = {"v": 1, "state": state, "conn": self._conn, "boot": self.boot}
        if reason:
            body["reason"] = reason
        return json.dumps(body)

    def _arm_will(self) -> None:
        """Each connection gets a new counter, so its Will can never override a later online."""
        self._conn = self.outbox.next_counter("connections")
        self._client.will_set(state_topic(self.config.gateway),
                              self._presence("offline", "connection lost"), qos=1, retain=True)

    def _on_connect(self, client: paho.Client, _userdata: object, _flags: object,
                    reason: Any, _props: object) -> None:  # noqa: ANN401 - paho ReasonCode
        if reason.is_failure:
            log.warning("broker refused the agent", extra={"reason": str(reason)})
            return
        topics = [ack_topic(self.config.gateway), command_topic(self.config.gateway)]
        if self.renewer is not None:
            topics += [accepted_topic(self.config.gateway), rejected_topic(self.config.gateway)]
        client.subscribe([(topic, 1) for topic in topics])
        client.publish(state_topic(self.config.gateway), self._presence("online"), qos=1,
                       retain=True)
        self.outbox.resend_all()
        self._connected.set()
        self._wake.set()
        if self.renewer is not None:
            self.renewer.on_connected()
        log.info("agent connected", extra={"broker": str(self.config.broker), "conn": self._conn})

    def _on_disconnect(self, _client: paho.Client, _userdata: object, _flags: object,
                       reason: object, _props: object) -> None:
        self._connected.clear()
        if not self._stop.is_set() and not self._rotating:
            log.warning("agent lost the broker; events wait in the outbox",
                        extra={"reason": str(reason), "waiting": self.outbox.size()})
            self._arm_will()  # paho reconnects by itself, with the new Will

    def _on_message(self, client: paho.Client, _userdata: object,
                    message: paho.MQTTMessage) -> None:
        if message.topic == command_topic(self.config.gateway):
            reply = handle_command(bytes(message.payload), self._handlers)
            log.info("remote command", extra={"command": reply.get("name"), "ok": reply["ok"]})
            client.publish(reply_topic(self.config.gateway), json.dumps(reply), qos=1)
            return
        if self.renewer is not None and message.topic in (accepted_topic(self.config.gateway),
                                                          rejected_topic(self.config.gateway)):
            try:
                answer: AcceptedReply | RejectedReply = (
                    AcceptedReply.model_validate_json(message.payload)
                    if message.topic.endswith("/accepted")
                    else RejectedReply.model_validate_json(message.payload))
            except ValueError:
                log.warning("ignored a malformed renewal answer", extra={"topic": message.topic})
                return
            self.renewer.on_reply(answer)
            self._wake.set()
            return
        if message.topic != ack_topic(self.config.gateway):
            return  # amqtt may echo other topics to a client that reconnected; not ours to read
        try:
            ids = json.loads(message.payload)["ids"]
            if isinstance(ids, list):
                self.confirmed += self.outbox.confirm([str(i) for i in ids])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed confirmation", extra={"topic": message.topic})
        except Exception:
            log.exception("failed to apply a confirmation")

    # -- the loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish: announce offline cleanly and disconnect; the outbox keeps what is unconfirmed."""
        self._stop.set()
        self._wake.set()

    def add(self, device: str, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """Queue an event from code on the gateway (inputs use this too).

        Raises:
            ContractError: the contract refuses the event; the hub is told (E_EVENT_REFUSED).
        """
        try:
            envelope = self.outbox.add(device, event_type, data)
        except ContractError as exc:
            self._report_refused(exc, device, event_type, data)
            raise
        if event_type == "alert":
            self._wake.set()
        return envelope

    def _report_refused(self, reason: ContractError, device: str, event_type: str,
                        data: dict[str, Any]) -> None:
        """Queue the report of an event the contract refused at stamping."""
        try:
            text = json.dumps({"device": device, "type": event_type, "data": data},
                              default=repr)
        except (TypeError, ValueError, RecursionError):  # a key JSON cannot hold, a cycle, depth
            text = f'{{"device": {device[:64]!r}, "type": {event_type[:32]!r}, "data": (not JSON)}}'
        log.error("refused an event the hub could not take",
                  extra={"device": device[:64], "type": event_type[:32], "code": reason.code})
        self.outbox.add(self.config.gateway, "error", refusal_report(
            text=text, size=len(text.encode("utf-8", "replace")), reason=reason,
            source="agent add",
            refused_type=sniff_type({"type": event_type, "data": data}, text),
            refused_device=device))
        self._wake.set()

    def start(self) -> None:
        """Connect in the background (paho retries until the broker answers)."""
        try:
            self._client.connect_async(self.config.broker.host, self.config.broker.port,
                                       keepalive=self.config.keepalive_s)
        except OSError as exc:
            msg = f"cannot reach the MQTT broker at {self.config.broker}: {exc}"
            raise BrokerError(msg) from exc
        self._client.loop_start()

    def tick(self, *, with_host_health: bool = True) -> None:
        """One round of work: heartbeat if due, read the spool, send what is due."""
        now = time.monotonic()
        try:  # what is queued goes out whatever happens here (a full disk, a bug)
            if now >= self._next_heartbeat:
                self._heartbeat(with_host_health=with_host_health)
                self._next_heartbeat = now + self.config.heartbeat_interval_s
            if self.spool.scan(on_alert=self._wake.set).more:
                self._wake.set()  # a backlog: read on at once, after sending what is due
        except Exception:
            log.exception("queueing new events failed; sending what is queued all the same")
        if self._connected.is_set():
            self._report_drops()
            self._send_due()
            self._renew()

    def _renew(self) -> None:
        """Ask for a fresh certificate when due; install an answer and reconnect under it."""
        if self.renewer is None:
            return
        request = self.renewer.request()
        if request is not None:
            self._client.publish(renew_topic(self.config.gateway), request.model_dump_json(),
                                 qos=1)
        if self.renewer.install(self._tls):
            self._reconnect_with_new_identity()

    def _reconnect_with_new_identity(self) -> None:
        """A clean DISCONNECT (no Last Will: this is no outage), then connect under the new
        certificate; unconfirmed events are resent from the outbox on connect."""
        self._rotating = True
        try:
            self._client.disconnect()
            self._client.loop_stop()
            if self._ssl is not None and self.config.cert_file is not None:
                self._ssl.load_cert_chain(str(self.config.cert_file),
                                          str(self.config.key_file) if self.config.key_file
                                          else None)
            self._arm_will()
            with contextlib.suppress(OSError):
                self._client.reconnect()
            self._client.loop_start()
        finally:
            self._rotating = False

    def run(self) -> None:
        """Connect and forward events until stopped."""
        self.start()
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # a full disk, a bug: log it, keep the gateway on the air
                    log.exception("a round of the agent's work failed; retrying")
                    self._stop.wait(self.config.batch_linger_s)
                self._wake.wait(self.config.batch_linger_s)
                self._wake.clear()
        finally:
            self.shutdown()

    @property
    def connected(self) -> bool:
        """Whether the broker session is up."""
        return self._connected.is_set()

    def cut_network(self) -> None:
        """Drop the connection without a goodbye, as a dead link or power cut would (tests,
        simulator): the broker publishes the Last Will once the keepalive runs out."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._connected.clear()
        self._arm_will()

    def restore_network(self) -> None:
        """Reconnect after :meth:`cut_network`."""
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        with contextlib.suppress(OSError):
            self._client.reconnect()
        self._client.loop_start()

    def _heartbeat(self, *, with_host_health: bool = True) -> None:
        data: dict[str, Any] = {"interval_s": self.config.heartbeat_interval_s,
                                "uptime_s": round(time.monotonic() - self.started, 1),
                                "firmware": f"careflow-edge-{__version__}"}
        if with_host_health:
            data.update(_system_health())
        self.outbox.add(self.config.gateway, "heartbeat", data)

    def _report_drops(self) -> None:
        dropped = self.outbox.take_dropped()
        if dropped:
            total = sum(dropped.values())
            detail = ", ".join(f"{n} {t}" for t, n in sorted(dropped.items()))
            log.error("outbox full: dropped events", extra={"dropped": dropped})
            self.outbox.add(self.config.gateway, "error", {
                "code": "E_OUTBOX_OVERFLOW", "severity": "error", "component": "edge-outbox",
                "message": f"the outbox was full and dropped {total} events ({detail}); "
                           "care alarms are never dropped", "dropped": dropped})

    def _send_due(self) -> None:
        """Care alarms first, each on its own topic; then batches, packed to the contract's
        limits. Each lane goes on while the broker has acknowledged all but
        ``MAX_MESSAGE_BYTES`` of what it sent before, so inside the MQTT client a new alarm
        never queues behind more than a message of backlog, nor the gateway's heartbeat behind
        more than a message of alarms (a flood of them from a hostile sensor included)."""
        if self._window_full(self._alarms_in_flight) and self._window_full(self._in_flight):
            return  # nothing could go out: a PUBACK wakes the loop when there is room
        due = self.outbox.due(now_ms=clock.now_ms(),
                              resend_after_ms=int(self.config.resend_after_s * 1000),
                              limit=self.config.batch_max_events * 20,
                              max_bytes=2 * MAX_MESSAGE_BYTES)  # a window and a message more
        deliverable = [item for item in due if self._deliverable(item)]
        for item in deliverable:  # due() puts care alarms first
            if item.type != "alert":
                continue
            if self._window_full(self._alarms_in_flight):
                break  # the rest is still due; a PUBACK wakes the loop for it
            envelope = json.loads(item.body)
            info = self._publish(event_topic(self.config.gateway, envelope["device"], "alert"),
                                 item.body, [item])
            if info is not None:
                self._alarms_in_flight.append((info, len(item.body), time.monotonic()))
        others = [p for p in deliverable if p.type != "alert"]
        runs = pack_batches([len(p.body.encode("utf-8")) for p in others],
                            max_events=min(self.config.batch_max_events, MAX_BATCH_EVENTS),
                            max_bytes=MAX_MESSAGE_BYTES)
        for run in runs:
            if self._window_full(self._in_flight):
                break
            chunk = others[run.start:run.stop]
            payload = "[" + ",".join(p.body for p in chunk) + "]"
            info = self._publish(batch_topic(self.config.gateway), payload, chunk)
            if info is not None:
                self._in_flight.append((info, len(payload), time.monotonic()))

    def _deliverable(self, item: Pending) -> bool:
        """False, after replacing it by a report, for a stored event the hub would refuse
        (written by an older agent that knew no limits): it would poison every batch."""
        problem = undeliverable_reason(item.body)
        if problem is None:
            return True
        log.error("refused a stored event the hub could not take",
                  extra={"id": item.id, "type": item.type, "code": problem.code})
        self.outbox.replace_with_report(item, refusal_report(
            text=item.body, size=len(item.body.encode("utf-8")), reason=problem,
            source=f"outbox event {item.id}", refused_type=item.type))
        self._wake.set()
        return False

    def _window_full(
        self, lane: collections.deque[tuple[paho.MQTTMessageInfo, int, float]],
    ) -> bool:
        """Whether the broker still owes PUBACKs for a message's worth of this lane."""
        expired = time.monotonic() - self.config.resend_after_s  # the outbox resends those
        owed = [entry for entry in lane if not entry[0].is_published() and entry[2] >= expired]
        lane.clear()
        lane.extend(owed)
        return sum(size for _, size, _ in lane) >= MAX_MESSAGE_BYTES

    def _publish(self, topic: str, payload: str,
                 items: list[Pending]) -> paho.MQTTMessageInfo | None:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        self.outbox.mark_sent(items, now_ms=clock.now_ms())
        return info

    def _on_publish(self, *_args: object) -> None:
        self._wake.set()  # the broker took a message: room for the next batch

    def shutdown(self) -> None:
        """Say offline (retained), disconnect, close the outbox."""
        self._stop.set()
        if self._connected.is_set():
            info = self._client.publish(state_topic(self.config.gateway),
                                        self._presence("offline", "agent stopped"), qos=1,
                                        retain=True)
            info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()
        self.outbox.close()
        log.info("agent stopped", extra={"waiting": "see outbox"})
