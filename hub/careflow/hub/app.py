"""The hub process: broker (embedded or external) → ingress queue → store → acks → health.

One writer thread owns the store. It takes whatever messages are waiting (up to a bound),
decodes them, commits everything in one transaction, and only then acknowledges them to the
broker. A failing store is retried with backoff and never acknowledged, so nothing is lost.

:func:`build_hub` is the one place a hub is wired (for `careflow hub`, `careflow demo`, the
benchmarks and the tests): data directory lock, store, embedded broker, rules and alert stage,
InfluxDB sink, provisioning, notification sender, dead man's switch; it returns a :class:`Hub`
that starts and stops them together.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import gc
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import InitVar, dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol

from careflow.core import clock
from careflow.core.clock import Clock
from careflow.core.config import Settings
from careflow.core.errors import ConfigError, StoreError
from careflow.hub.alerting.digest_scheduler import DigestScheduler
from careflow.hub.alerting.incidents import AlertStage, default_rules
from careflow.hub.alerting.notify import (
    FAILING_AFTER_ATTEMPTS,
    MAX_ATTEMPTS,
    NOTIFICATION_OVERDUE_MS,
    Channel,
    NotificationSender,
    failing_or_stuck,
    load_channels,
)
from careflow.hub.alerting.rules import RuleSet
from careflow.hub.alerting.selfwatch import (
    STALL_LIMIT_MS,
    DeadMansSwitch,
    Refusals,
    self_problems,
    tally_refusals,
)
from careflow.hub.datadir_lock import DataDirLock
from careflow.hub.ingest.decode import Accepted, Decoded, PresenceUpdate, Rejected, shut_out
from careflow.hub.ingest.decode_worker import DecodeWorker, decode_safely, internal_error
from careflow.hub.ingest.embedded_broker import (
    GENERATED_USERNAME,
    BrokerCredentials,
    EmbeddedBroker,
    exposed_without_credentials,
    generate_password_file,
    is_loopback,
)
from careflow.hub.ingest.ingress import IncomingMessage, MqttIngress
from careflow.hub.ingest.resend import ResendThrottle
from careflow.hub.ops.agent import AgentLoop, agent_for
from careflow.hub.ops.runbooks import load_runbooks
from careflow.hub.sinks.influx.sink import InfluxSink, sink_for
from careflow.hub.stage import Committed, Stage
from careflow.hub.store.adapters import open_store
from careflow.hub.store.interface import EventLog, Health, Outbox, Store
from careflow.hub.store.records import (
    AppendResult,
    AutomationMode,
    IncomingBatch,
    NotificationState,
)
from careflow.hub.web.app import WebDeps, create_app
from careflow.hub.web.links import LinkSigner, load_link_key
from careflow.hub.web.server import WebServer
from careflow.provisioning.service import Activation, Provisioning, provisioning_for
from careflow.schemas import ack_topic, command_topic

__all__ = [
    "AUTO",
    "ActivationStage",
    "Auto",
    "Hub",
    "HubCounters",
    "HubService",
    "build_hub",
    "embedded_credentials",
    "tune_gc_for_ingest",
]

log = logging.getLogger(__name__)


class WriterStore(EventLog, Health, Outbox, Protocol):
    """What the writer loop uses of the store: it appends, publishes the hub's health, and reads
    the notification outbox for the hub's self-checks."""

QUEUE_BOUND = 20_000
MAX_MESSAGES_PER_COMMIT = 2_000
# Payload bytes per commit: a few thousand events of batches. Bigger commits stop the decode
# worker and the writer from overlapping (one waits while the other handles a huge group) and
# make every message of the group wait longer for its PUBACK.
MAX_BYTES_PER_COMMIT = 512 * 1024
# The decode worker takes a group of messages only when they average at least this size (a
# batch of five heartbeats is about 1 KiB); single-event messages are decoded in-process.
WORKER_MIN_MESSAGE_BYTES = 1024
HEALTH_INTERVAL_S = 1.0
# How often rules see the clock: an absence is noticed at most this long after its deadline.
ALERT_TICK_S = 0.25
# How often the hub may ask one source to resend what it is missing.
RESEND_REQUEST_INTERVAL_S = 10.0
# Within that interval, at most this many single-source requests per gateway (then one for
# everything it holds), and at most this many sources remembered in all.
RESEND_REQUESTS_PER_GATEWAY = 20
RESEND_SOURCES_TRACKED = 10_000
# A commit costs one fsync; waiting this long for more messages lets a burst share it.
LINGER_S = 0.002
_RATE_WINDOW_S = 10.0
# /readyz: the store is not writable when no health report was written for this long
STORE_STALE_S = 5.0


def tune_gc_for_ingest() -> None:
    """Make the cyclic GC cheap for a long-running ingest process.

    Each event allocates dozens of short-lived, acyclic objects (freed by reference counting),
    which trigger a generation-0 collection every 700 allocations; older collections then walk
    every object of the loaded libraries. Freezing what exists at start and collecting less often
    measured ~1.5x more events/s in bench/ingest.py, with no growth of memory.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


@dataclass(slots=True)
class HubCounters:
    """Running totals for the health report."""

    messages: int = 0
    events_stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    dead_lettered: int = 0
    store_errors: int = 0
    resend_requests: int = 0
    stage_errors: Counter[str] = field(default_factory=Counter)  # by stage name
    alert_lag_ms: int = 0  # how far rule evaluation ran behind ingest, worst of the last second
    last_error: str | None = None
    commit_latency_ms: float = 0.0
    event_age_ms: int | None = None
    rejects_by_code: Counter[str] = field(default_factory=Counter)

    @property
    def alert_errors(self) -> int:
        """Failures of the alert stage (after a commit, on the clock)."""
        return self.stage_errors[AlertStage.name]

    def add(self, result: AppendResult, messages: int) -> None:
        """Count one committed batch."""
        self.messages += messages
        self.events_stored += len(result.stored)
        self.duplicates += result.duplicates
        self.conflicts += result.conflicts
        self.dead_lettered += result.dead_lettered


def _worth_a_worker(count: int, payload_bytes: int) -> bool:
    """Whether the decode worker saves this thread time on ``count`` messages of
    ``payload_bytes`` in all: batches, yes; one event per message, no, since handing a small
    message over and taking its result back cost this thread half of decoding it here, and the
    machine twice as much CPU in all."""
    return payload_bytes >= WORKER_MIN_MESSAGE_BYTES * count


def _gather(messages: list[IncomingMessage], decoded: list[Decoded]) -> tuple[
        list[tuple[Accepted, int]], list[tuple[Rejected, int]], list[tuple[PresenceUpdate, int]]]:
    """Everything the messages carried, each with its message's arrival time."""
    accepted: list[tuple[Accepted, int]] = []
    rejected: list[tuple[Rejected, int]] = []
    presence: list[tuple[PresenceUpdate, int]] = []
    for message, one in zip(messages, decoded, strict=True):
        received_ms = message.received_ms
        # the loop runs once per message: test before building generators for nothing
        if one.accepted:
            accepted.extend([(a, received_ms) for a in one.accepted])
        if one.rejected:
            rejected.extend([(dataclasses.replace(r, retained=True) if message.retain else r,
                              received_ms) for r in one.rejected])
        if one.presence:
            presence.extend([(p, received_ms) for p in one.presence])
    return accepted, rejected, presence


class _AbandonedError(Exception):
    """The hub stopped while a batch could not be stored; it stays unacknowledged."""


class ActivationStage:
    """Provisioning as a stage after each commit: a provisioned gateway is active once its own
    heartbeat is stored (after the commit, so `provision watch` never shows active for a
    heartbeat that could still be lost), or once it says it is online."""

    name = "provisioning"

    def __init__(self, activation: Activation) -> None:
        self.activation = activation

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Record the provisioning steps this commit completes."""
        try:
            self.activation.observe(
                heartbeats=[e.gateway for e in commit.events
                            if e.type == "heartbeat" and e.device == e.gateway],
                online=[p.gateway for p in commit.presence if p.state == "online"],
                now_ms=now_ms)
        except StoreError as exc:  # the next heartbeat tries again; ingest goes on
            log.warning("cannot record a provisioning step", extra={"error": str(exc)})


class HubService:
    """Runs ingest until :meth:`stop` is called (by a signal handler or a test)."""

    def __init__(self, settings: Settings, store: WriterStore, *,
                 queue_bound: int = QUEUE_BOUND, alerts: AlertStage | None = None,
                 sink: InfluxSink | None = None,
                 provisioning: Activation | None = None, decode_worker: bool = False,
                 clock: Clock = clock.now_ms) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.alerts = alerts
        self.sink = sink
        self.last_health: dict[str, Any] = {}  # read by the sink thread: replaced, never mutated
        # the status digests' scheduler's status, when there is one (set by build_hub)
        self.digests: Callable[[], dict[str, Any]] | None = None
        self.provisioning = provisioning
        self._activation: ActivationStage | None = None  # provisioning's stage, made once
        self.inbox: queue.Queue[IncomingMessage] = queue.Queue(maxsize=queue_bound)
        self.ingress = MqttIngress(settings, self.inbox)
        self.counters = HubCounters()
        self._stop = threading.Event()
        self._started_ms = clock()
        self._store_written = time.monotonic()  # the store was opened (written) just now
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque()
        self._resend = ResendThrottle(interval_s=RESEND_REQUEST_INTERVAL_S,
                                      per_gateway=RESEND_REQUESTS_PER_GATEWAY,
                                      max_tracked=RESEND_SOURCES_TRACKED)
        self._disconnected_since_ms: int | None = None
        self._last_event_ms: int | None = None
        self._store_errors_seen = 0
        # With a decode worker, the messages it is decoding while this thread commits the last.
        self._decoder = DecodeWorker(max_bytes=settings.max_message_bytes) if decode_worker \
            else None
        self._held: list[IncomingMessage] = []
        # events refused beyond the per-gateway device bound (for the self-alert's detail; the
        # care alarms among them are announced by the alert stage, from their dead letters)
        self._refusals: Refusals | None = None
        self._failing_channels: frozenset[str] = frozenset()  # at the last self-check
        self._failing_told: frozenset[str] = frozenset()  # at the last self-check told about

    def stop(self) -> None:
        """Ask the service to finish what it holds and return from :meth:`run`."""
        self._stop.set()

    def run(self) -> None:
        """Connect, then commit and acknowledge messages until stopped."""
        if self._decoder is not None:
            self._decoder.start()
        self.ingress.start()
        if self.sink is not None:
            self.sink.health = lambda: self.last_health
            self.sink.start()
        log.info("hub ingesting", extra={"broker": str(self.settings.effective_broker_url),
                                         "store": str(self.settings.db_path)})
        next_health = next_tick = 0.0
        try:
            while not self._stop.is_set() and self.ingress.failure is None:
                self._step(timeout_s=ALERT_TICK_S)
                now = time.monotonic()
                if now >= next_tick:  # absences are judged by the clock, not the next event
                    self._alerting(lambda stage: stage.tick(self.clock()))
                    next_tick = now + ALERT_TICK_S
                if now >= next_health:
                    self._report_health()
                    self._alerting(lambda stage: stage.check_self(
                        self._self_problems(), self.clock(),
                        again=self._self_news()))
                    next_health = now + HEALTH_INTERVAL_S
            while self._held or not self.inbox.empty():  # finish what we hold before leaving
                self._step(timeout_s=0.0)
            self._report_health()
        except _AbandonedError:
            log.error("stopped with a batch the store would not take; the broker keeps it "
                      "for the next start", extra={"queued": self.inbox.qsize()})
        finally:
            self.ingress.stop()
            if self._decoder is not None:
                self._decoder.stop()
            if self.sink is not None:
                self.sink.stop()
            log.info("hub stopped", extra={"events_stored": self.counters.events_stored})
        if self.ingress.failure is not None:  # e.g. another hub holds this hub's session
            raise self.ingress.failure

    def _take(self, timeout_s: float) -> tuple[list[IncomingMessage], int]:
        """What is waiting, up to a bound, and its payload bytes; lingers briefly when little
        is, to share one fsync."""
        try:
            first = self.inbox.get(timeout=timeout_s) if timeout_s else self.inbox.get_nowait()
        except queue.Empty:
            return [], 0
        messages = [first]
        size = len(first.payload)
        deadline = time.monotonic() + LINGER_S
        while len(messages) < MAX_MESSAGES_PER_COMMIT and size < MAX_BYTES_PER_COMMIT:
            try:
                message = self.inbox.get_nowait()
                messages.append(message)
                size += len(message.payload)
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                break
            try:
                message = self.inbox.get(timeout=remaining)
            except queue.Empty:
                break
            messages.append(message)
            size += len(message.payload)
        return messages, size

    def _step(self, *, timeout_s: float) -> None:
        """Take messages, then commit and acknowledge them.

        With a decode worker this is a two-stage pipeline for batches: the worker decodes what
        was just taken while this thread commits what it decoded before. Messages are still
        committed in the order taken, each acknowledged only after its own commit.
        """
        held, self._held = self._held, []
        messages, size = self._take(0.0 if held else timeout_s)
        decoded_held = self._decoder.result() if held and self._decoder is not None else None
        if held and decoded_held is None:  # the worker failed: nothing lost, decode here
            decoded_held = self._decode_here(held)
        if messages and self._decoder is not None and _worth_a_worker(len(messages), size) \
                and self._decoder.submit([(m.topic, m.payload) for m in messages]):
            self._held, messages = messages, []
        if held:
            assert decoded_held is not None
            self._commit_messages(held, decoded_held)
        if messages:
            self._commit_messages(messages, self._decode_here(messages))

    def _decode_here(self, messages: list[IncomingMessage]) -> list[Decoded]:
        max_bytes = self.settings.max_message_bytes
        return [decode_safely(m.topic, m.payload, max_bytes=max_bytes) for m in messages]

    def _commit_messages(self, messages: list[IncomingMessage], decoded: list[Decoded]) -> None:
        """Commit, then acknowledge. Whatever one message makes fail (a bug, input no check
        caught) costs only that message: it is stored as a dead letter with the reason, and this
        thread, which every other message needs, goes on."""
        try:
            accepted, rejected, presence = _gather(messages, decoded)
            if self.provisioning is not None and accepted:
                accepted, refused = shut_out(
                    accepted, self.provisioning.revoked(self.clock()))
                rejected.extend(refused)
            result = self._commit(IncomingBatch(accepted, rejected, presence))
        except _AbandonedError:
            raise
        except Exception as exc:  # not the store (retried in _commit): one of these messages
            if len(messages) > 1:
                log.exception("a commit failed for a reason other than the store; committing "
                              "its messages one by one", extra={"messages": len(messages)})
                for message, one in zip(messages, decoded, strict=True):
                    self._commit_messages([message], [one])
                return
            (message,) = messages
            log.exception("a message failed to commit; dead-lettered",
                          extra={"topic": message.topic})
            accepted, presence = [], []
            letter = internal_error(message.topic, message.payload, exc, where="storing")
            # retained: it comes back at every subscribe, and is to be recorded once
            rejected = [(dataclasses.replace(letter, retained=message.retain),
                         message.received_ms)]
            result = self._commit(IncomingBatch(accepted, rejected, presence))
        self.ingress.ack(messages)
        try:
            self._after_commit(messages, accepted, rejected, presence, result)
        except Exception as exc:  # stored and acknowledged already: log it, keep ingesting
            self.counters.last_error = f"after a commit: {type(exc).__name__}: {exc}"
            log.exception("bookkeeping after a commit failed; its messages are stored")

    def _after_commit(self, messages: list[IncomingMessage], accepted: list[tuple[Accepted, int]],
                      rejected: list[tuple[Rejected, int]],
                      presence: list[tuple[PresenceUpdate, int]], result: AppendResult) -> None:
        """Confirmations, resend requests, the stages after a commit, and counters."""
        self._confirm_to_gateways(accepted)
        self._ask_for_missing(result)
        now_ms = self.clock()
        # After the acknowledgements: the alert stage follows the log with a cursor of its own,
        # so what a crash leaves unevaluated here is evaluated from the log after the restart.
        commit = Committed(result.stored, result.data, result.conflicts,
                           [update for update, _ in presence])
        for stage in self.stages:
            self._run_stage(stage, functools.partial(stage.after_commit, commit, now_ms))
        self.counters.add(result, len(messages))
        self.counters.commit_latency_ms = float(now_ms - messages[0].received_ms)
        if result.stored:
            self.counters.event_age_ms = now_ms - result.stored[-1].time_ms
            self._last_event_ms = now_ms
        for item, _ in rejected:
            self.counters.rejects_by_code[item.code] += 1
        if result.over_bound:
            self._over_bound(result, now_ms)
        if rejected or result.conflicts:
            log.warning("dead-lettered input", extra={
                "count": result.dead_lettered,
                "codes": dict(Counter(r.code for r, _ in rejected)),
                "conflicts": result.conflicts,
                "example": rejected[0][0].reason if rejected else None,
            })

    def _over_bound(self, result: AppendResult, now_ms: int) -> None:
        """New devices beyond their gateway's bound were dead-lettered: count them for the
        hub's self-alert, and say so in the log."""
        over = result.over_bound
        alarms = sum(item.alarm for item in over)
        self.counters.rejects_by_code["too_many_devices"] += len(over)
        self._refusals = tally_refusals(self._refusals, [item.gateway for item in over],
                                        alarms=alarms, now_ms=now_ms)
        log.error("events of devices beyond the per-gateway bound dead-lettered", extra={
            "count": len(over), "care_alarms": alarms,
            "bound": self.settings.max_devices_per_gateway,
            "gateways": sorted({item.gateway for item in over})[:5]})

    def _self_news(self) -> set[str]:
        """The hub's own problems that happened anew since the last self-check: a channel that
        started failing (call after :meth:`_self_problems`). Care alarms refused beyond the
        device bound are news too; the alert stage reads them from their dead letters, after a
        cursor, so a restart neither loses nor repeats one."""
        news = set()
        if self._failing_channels - self._failing_told:  # another channel fails: said again,
            news.add("hub-notifications-failing")  # not hidden under an older self-alert
        self._failing_told = self._failing_channels
        return news

    @property
    def stages(self) -> tuple[Stage, ...]:
        """What runs after each commit, in order: alerts, the InfluxDB sink, provisioning (read
        at each commit: a test or benchmark may set its own alert stage after construction)."""
        stages: list[Stage] = [part for part in (self.alerts, self.sink) if part is not None]
        if self.provisioning is not None:
            if self._activation is None or self._activation.activation is not self.provisioning:
                self._activation = ActivationStage(self.provisioning)
            stages.append(self._activation)
        return tuple(stages)

    def _alerting(self, work: Callable[[AlertStage], None]) -> None:
        """Let the clock drive the alert stage (ticks, self-checks); see :meth:`_run_stage`."""
        alerts = self.alerts
        if alerts is not None:
            self._run_stage(alerts, functools.partial(work, alerts))

    def _run_stage(self, stage: Stage, work: Callable[[], None]) -> None:
        """Run one stage; events are already stored and acknowledged, so a failure here is
        logged and counted (the alert stage's as alert_errors in the health report), never
        allowed to stop ingest or the stages after it."""
        try:
            work()
        except Exception as exc:
            self.counters.stage_errors[stage.name] += 1
            log.exception("a stage after the commit failed; its events are stored",
                          extra={"stage": stage.name, "error": str(exc)})

    def _self_problems(self) -> dict[str, str]:
        now_ms = self.clock()
        connected = self.ingress.connected
        if connected:
            self._disconnected_since_ms = None
        elif self._disconnected_since_ms is None:
            self._disconnected_since_ms = now_ms
        recent_errors = self.counters.store_errors - self._store_errors_seen
        self._store_errors_seen = self.counters.store_errors
        # failed for good, or still retried after MAX_ATTEMPTS; a critical one (a care alarm)
        # after FAILING_AFTER_ATTEMPTS, so another channel hears of it in seconds, not minutes
        # and those overdue that no sender got to (NOTIFICATION_OVERDUE_MS; what was due while
        # the hub was down counts from its start: the sender needs a moment to catch up)
        overdue = self.store.overdue_notifications(
            due_before_ms=now_ms - NOTIFICATION_OVERDUE_MS) \
            if now_ms - self._started_ms >= NOTIFICATION_OVERDUE_MS else {}
        failed = self.store.count_notifications(states=(NotificationState.FAILED,)) + \
            self.store.count_notifications(states=(NotificationState.PENDING,), min_attempts=MAX_ATTEMPTS,
                                           critical_min_attempts=FAILING_AFTER_ATTEMPTS) + \
            sum(overdue.values())
        failing = failing_or_stuck(self.store, now_ms) if failed else {}
        self._failing_channels = frozenset(failing)
        influx = self.sink.status() if self.sink is not None else {}
        lag, lagging = self.alerts.lag(now_ms) if self.alerts is not None else (0, None)
        self.counters.alert_lag_ms = lag
        problems = self_problems(now_ms=now_ms, connected=connected,
                                 disconnected_since_ms=self._disconnected_since_ms,
                                 last_event_ms=self._last_event_ms, started_ms=self._started_ms,
                                 failed_notifications=failed, store_errors_recent=recent_errors,
                                 failing_channels=failing,
                                 silence_ms=self.settings.self_silence_ms,
                                 influx_failing_since_ms=influx.get("failing_since_ms"),
                                 influx_backlog=int(influx.get("backlog_events") or 0),
                                 alert_lag_ms=lag, alert_lagging_since_ms=lagging,
                                 refusals=self._refusals,
                                 max_devices_per_gateway=self.settings.max_devices_per_gateway)
        expiring = self.provisioning.expiry_problem(now_ms) if self.provisioning else None
        if expiring:
            problems["hub-certificates-expiring"] = expiring
        return problems

    def _confirm_to_gateways(self, accepted: list[tuple[Accepted, int]]) -> None:
        """Tell each gateway which of its events are now durably here, so it can let them go.

        Stored, already stored and dead-lettered conflicts alike: resending any of them cannot
        change the outcome (a conflicting alarm is still evaluated, from the dead letters). A
        lost confirmation only costs a resend, which dedupe absorbs, so they go at QoS 0: at
        QoS 1 the broker's PUBACK for each one doubled the packets the hub's network thread
        handles when events arrive one per message.
        """
        by_gateway: dict[str, list[str]] = {}
        for item, _ in accepted:
            by_gateway.setdefault(item.event.gateway, []).append(item.event.id)
        for gateway, ids in by_gateway.items():
            self.ingress.publish(ack_topic(gateway), json.dumps({"ids": ids}), qos=0)

    def _ask_for_missing(self, result: AppendResult) -> None:
        """Sequence gaps: ask the gateway to resend what it has not had confirmed, paced and
        bounded by the ResendThrottle (per source once every RESEND_REQUEST_INTERVAL_S). Events
        still in flight may look missing for a moment; a resend of those is harmless, dedupe
        absorbs it."""
        if not result.gaps:
            return
        asks = self._resend.due(result.gaps, time.monotonic())
        if not asks:
            return
        missing: Counter[tuple[str, str | None, str | None]] = Counter()
        for gap in result.gaps:
            missing[(gap.gateway, gap.device, gap.boot)] += gap.missing
            missing[(gap.gateway, None, None)] += gap.missing
        for ask in asks:
            self.counters.resend_requests += 1
            args = {"device": ask.device, "boot": ask.boot} if ask.device is not None else {}
            request = {"id": f"hub-{time.time_ns()}", "name": "resend", "args": args}
            self.ingress.publish(command_topic(ask.gateway), json.dumps(request))
            log.info("asked a gateway to resend", extra={
                "gateway": ask.gateway, "device": ask.device or "(all)", "boot": ask.boot,
                "missing": missing[ask]})

    def _commit(self, batch: IncomingBatch) -> AppendResult:
        """Commit, retrying with backoff until it works or the hub is told to stop.

        Unstored input is never acknowledged: a hub stopped while its store fails leaves the
        messages with the broker, which delivers them again to the next hub.
        """
        delay = 0.1
        while True:
            try:
                return self.store.append(batch)
            except StoreError as exc:
                if self._stop.is_set():
                    raise _AbandonedError from exc
                self.counters.store_errors += 1
                self.counters.last_error = str(exc)
                log.error("store write failed; retrying, nothing acknowledged",
                          extra={"error": str(exc), "retry_in_s": delay})
                self._report_health()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def health(self) -> dict[str, Any]:
        """The hub's own health, as `careflow status` shows it."""
        now = time.monotonic()
        self._rate_samples.append((now, self.counters.events_stored))
        while self._rate_samples and now - self._rate_samples[0][0] > _RATE_WINDOW_S:
            self._rate_samples.popleft()
        first_t, first_n = self._rate_samples[0]
        rate = (self.counters.events_stored - first_n) / (now - first_t) if now > first_t else 0.0
        c = self.counters
        return {
            "connected": self.ingress.connected,
            "broker": str(self.settings.effective_broker_url),
            "embedded_broker": self.settings.embedded,
            "started_ms": self._started_ms,
            "messages": c.messages,
            "events_stored": c.events_stored,
            "events_per_s": round(rate, 1),
            "duplicates": c.duplicates,
            "conflicts": c.conflicts,
            "dead_lettered": c.dead_lettered,
            "rejects_by_code": dict(c.rejects_by_code),
            "queue_depth": self.inbox.qsize(),
            "queue_bound": self.inbox.maxsize,
            "commit_latency_ms": c.commit_latency_ms,
            "event_age_ms": c.event_age_ms,
            "store_errors": c.store_errors,
            "resend_requests": c.resend_requests,
            "alert_errors": c.alert_errors,
            "alert_lag_ms": c.alert_lag_ms,
            "incidents_opened": self.alerts.opened if self.alerts else None,
            "alerts_unrecorded": self.alerts.unrecorded if self.alerts else None,
            # the rules muted or disabled that evaluation applies now (the console shows them)
            "rules_in_force": self.alerts.quieted_lines() if self.alerts else [],
            "last_error": c.last_error,
            "influx": self.sink.status() if self.sink is not None else None,
            "digests": self.digests() if self.digests is not None else None,
        }

    def _report_health(self) -> None:
        try:
            self.last_health = self.health()
            self.store.write_health(self.last_health)
            self._store_written = time.monotonic()
        except StoreError as exc:
            log.warning("cannot write health report", extra={"error": str(exc)})

    def readiness(self) -> dict[str, str | None]:
        """What /readyz checks: connected to the broker, and the store took a write lately
        (the health report, every second); each None when fine, else what is wrong."""
        since = time.monotonic() - self._store_written
        return {
            "broker": None if self.ingress.connected else
            f"not connected to the broker at {self.settings.effective_broker_url}",
            "store": None if since < STORE_STALE_S else
            f"no write to the store succeeded for {since:.0f} s: {self.counters.last_error}",
        }


# -- wiring: the one place a hub is assembled ------------------------------------------------

# How long closing waits for the ingest thread to finish what it holds.
INGEST_JOIN_S = 15.0


class Auto(enum.Enum):
    """The type of :data:`AUTO`."""

    AUTO = "auto"


AUTO: Final = Auto.AUTO
"""build_hub's default for a part: as `careflow hub` makes it, from the settings, the
environment (CAREFLOW_RULES_DIR, CAREFLOW_CHANNEL_*) and the machine (its cores)."""


def embedded_credentials(settings: Settings) -> BrokerCredentials | None:
    """The user the embedded broker demands (CAREFLOW_BROKER_USERNAME and
    CAREFLOW_BROKER_PASSWORD[_FILE]), or None: anyone, which only loopback allows.

    An address off this machine without them is refused, with a password made for it in the
    data directory (0600) and the lines that use it.
    """
    if settings.broker_username and settings.broker_password:
        return BrokerCredentials(settings.broker_username, settings.broker_password)
    if not exposed_without_credentials(settings.listen.host, None):
        return None
    path = generate_password_file(settings.data_dir)
    msg = (f"refusing to run the embedded broker on {settings.listen} without credentials: "
           "anyone who reaches it could publish as any gateway, fake the hub's confirmations "
           "(gateways would delete events no hub stored) and read claim answers. A password "
           f"for it is in {path} (0600). Start the hub with\n"
           f"  CAREFLOW_BROKER_USERNAME={GENERATED_USERNAME} CAREFLOW_BROKER_PASSWORD_FILE={path} "
           f"careflow hub --listen {settings.listen}\n"
           "and give every client the same: CAREFLOW_BROKER_USERNAME and "
           "CAREFLOW_BROKER_PASSWORD_FILE for careflow commands, CAREFLOW_EDGE_USERNAME and "
           "CAREFLOW_EDGE_PASSWORD_FILE for gateways (a copy of the file, kept 0600). Or keep "
           "the default address 127.0.0.1.")
    raise ConfigError(msg)


@dataclass(slots=True)
class _Life:
    """What a Hub changes while it runs (the Hub itself is frozen)."""

    closing: ExitStack = field(default_factory=ExitStack)  # undone by close(), last first
    thread: threading.Thread | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hub:
    """A wired hub: ingest (:attr:`service`) and what runs beside it, started and stopped
    together. Made by :func:`build_hub`; a context manager::

        with build_hub(settings) as hub:  # starts broker, provisioning, sender, dead man's switch
            hub.run()                     # ingest in this thread until hub.stop()

    Leaving the ``with`` stops ingest (it finishes what it holds), then the rest; it closes the
    stores and releases the data directory.
    """

    settings: Settings
    store: Store  # the writer's connection; the sink and the sender have their own
    service: HubService
    alerts: AlertStage | None
    sink: InfluxSink | None
    provisioning: Provisioning | None  # the claim service, when this hub runs it
    sender: NotificationSender | None
    deadman: DeadMansSwitch | None
    broker: EmbeddedBroker | None  # the embedded broker, when this hub runs one
    web: WebServer | None  # the on-call web (links, console, /metrics), when it is on
    digests: DigestScheduler | None = None  # status digests, when rules ask for any
    agent: AgentLoop | None = None  # the operations agent's loop, unless CAREFLOW_AUTOMATION=off
    resources: InitVar[ExitStack]  # closed last: the stores and the lock
    _life: _Life = field(default_factory=_Life, init=False, repr=False, compare=False)

    def __post_init__(self, resources: ExitStack) -> None:
        self._life.closing.push(resources)

    @property
    def error(self) -> BaseException | None:
        """What ended ingest run by :meth:`run_in_thread`, if anything did."""
        return self._life.error

    def __enter__(self) -> Hub:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start what runs beside ingest: the embedded broker, the claim service, the
        notification sender, the status digests, the dead man's switch and the web, in that
        order."""
        closing = self._life.closing
        for part in (self.broker, self.provisioning, self.sender, self.digests, self.deadman,
                     self.web, self.agent):
            if part is not None:
                part.start()
                closing.callback(part.stop)

    def run(self) -> None:
        """Ingest in this thread until :meth:`stop`; raises what ended it otherwise (e.g.
        another hub took this hub's broker session)."""
        self.service.run()

    def run_in_thread(self) -> threading.Thread:
        """Ingest in a daemon thread; what ends it is logged and kept in :attr:`error`."""
        thread = threading.Thread(target=self._run_keeping_error, name="hub", daemon=True)
        self._life.thread = thread
        thread.start()
        return thread

    def _run_keeping_error(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # the thread's owner reads it; nobody else would
            self._life.error = exc
            log.exception("the hub stopped on an error")

    def stop(self) -> None:
        """Ask ingest to finish what it holds and return (safe in a signal handler)."""
        self.service.stop()

    def close(self) -> None:
        """Stop ingest, then what runs beside it; close the stores, release the data
        directory. Safe to call again."""
        self.service.stop()
        if self._life.thread is not None:
            self._life.thread.join(timeout=INGEST_JOIN_S)
        self._life.closing.close()


def build_hub(settings: Settings, *, lock: str | None = "careflow hub",
              embedded_broker: bool | Auto = AUTO,
              broker_credentials: BrokerCredentials | Auto | None = AUTO,
              rules: RuleSet | Auto | None = AUTO,
              channels: Mapping[str, Channel] | Auto = AUTO,
              provisioning: Activation | Auto | None = AUTO,
              decode_worker: bool | Auto = AUTO,
              influx_snapshots: bool = True,
              deadman: bool = True,
              web: bool | Auto = AUTO,
              agent: bool | Auto = AUTO) -> Hub:
    """Wire a hub as ``settings`` say; every default is what `careflow hub` runs.

    Nothing runs yet (use the returned :class:`Hub` as a context manager), but the data
    directory is locked and the stores are open; a failure here releases them again and is a
    careflow error saying what to fix.

    Args:
        settings: The hub's settings (data directory, broker, store, InfluxDB, PKI...).
        lock: The command the data directory's lock names to a second hub; None takes no lock
            (tests that run hubs side by side).
        embedded_broker: Run the embedded broker on ``settings.listen``; AUTO: when no broker
            is configured.
        broker_credentials: The user the embedded broker demands; AUTO: from the settings,
            and refused off loopback without them (:func:`embedded_credentials`).
        rules: The alert rules; AUTO: CAREFLOW_RULES_DIR, else the shipped ones; None: no
            alerting. Their ``routing.digests`` are queued by a scheduler of their own (when
            there are channels).
        channels: Where notifications go; AUTO: CAREFLOW_CHANNEL_*. A sender delivers them
            when there is any (and rules).
        provisioning: The claim flow; AUTO: the hub's own claim service when a PKI is there
            (:func:`provisioning_for`); an Activation: that one, with no claim service.
        decode_worker: Decode batches in a second process; AUTO: when there is a second core.
        influx_snapshots: Write device-status snapshots to InfluxDB (when it is configured).
        deadman: Ping CAREFLOW_DEADMAN_URL, when set, while the alert loop ticks.
        web: Serve the on-call web on CAREFLOW_HTTP_LISTEN; AUTO: unless that is ``off``.
        agent: Run the operations agent's loop (its own thread and store connection; the
            runbooks of CAREFLOW_RUNBOOKS_DIR); AUTO: unless CAREFLOW_AUTOMATION is ``off``.
            Each pass reads the mode a person set (`careflow agent mode`).

    Returns:
        The hub, not started.
    """
    if embedded_broker is AUTO:
        embedded_broker = settings.embedded
    if broker_credentials is AUTO:
        broker_credentials = embedded_credentials(settings) if embedded_broker else None
    with ExitStack() as resources:
        if lock is not None:
            datadir_lock = DataDirLock(settings.data_dir, command=lock)
            datadir_lock.acquire()  # before anything in the data directory is opened
            resources.callback(datadir_lock.release)
        store = open_store(settings)
        resources.callback(store.close)
        broker = EmbeddedBroker(settings.listen.host, settings.listen.port,
                                credentials=broker_credentials) if embedded_broker else None
        if channels is AUTO:
            channels = load_channels()
        if rules is AUTO:
            rules = default_rules()
        alerts = None if rules is None else AlertStage(store, rules, channels,
                                                       runbook_url=settings.runbook_url)
        sink = sink_for(settings, snapshots=influx_snapshots)
        if sink is not None:
            resources.callback(sink.store.close)
        if provisioning is AUTO:
            claims = provisioning_for(settings)
            activation = claims.activation if claims is not None else None
        else:
            claims, activation = None, provisioning
        service = HubService(settings, store, alerts=alerts, sink=sink, provisioning=activation,
                             decode_worker=(os.cpu_count() or 1) > 1 if decode_worker is AUTO
                             else decode_worker)
        server = deps = None
        if (web is AUTO or web) and settings.http_listen is not None:
            server, deps = _web_server(settings, service, resources)
        sender = None
        if alerts is not None and channels:
            outbox = open_store(settings)
            resources.callback(outbox.close)  # the sender's own connection
            sender = NotificationSender(outbox, channels, links=None if server is None or
                                        deps is None else _link_signer(settings, server, deps))
            alerts.on_queued = sender.wake
            if deps is not None:
                deps.wake_sender = sender.wake
        digests = _digest_scheduler(settings, rules, sender, resources)
        service.digests = None if digests is None else digests.status  # in its health
        watch = None
        if deadman and settings.deadman_url:
            # a writer loop that stopped ticking cannot raise alerts about itself: stop the
            # pings too, so the outside service notices
            watch = DeadMansSwitch(settings.deadman_url, settings.deadman_interval_s,
                                   healthy=_ticking(alerts))
        loop = _agent_loop(settings, agent, resources)
        return Hub(settings=settings, store=store, service=service, alerts=alerts, sink=sink,
                   provisioning=claims, sender=sender, digests=digests, deadman=watch,
                   broker=broker, web=server, agent=loop, resources=resources.pop_all())


def _agent_loop(settings: Settings, agent: bool | Auto,
                resources: ExitStack) -> AgentLoop | None:
    """The operations agent's loop on its own store connection (AUTO: unless
    CAREFLOW_AUTOMATION is off). With AUTO, runbooks that cannot be loaded leave the hub
    without its agent, said loudly, rather than stop it: ingest and care alarms come first;
    asked for explicitly (True), they stop it."""
    if not (agent if agent is not AUTO else settings.automation != AutomationMode.OFF):
        return None
    try:
        runbooks = list(load_runbooks().values())
    except ConfigError as exc:
        if agent is not AUTO:
            raise
        log.error("the operations agent does not run: its runbooks cannot be loaded (fix "
                  "them: `careflow runbooks check`, or set CAREFLOW_AUTOMATION=off)",
                  extra={"why": str(exc)})
        return None
    store = open_store(settings)
    resources.callback(store.close)  # the agent's own connection
    return AgentLoop(agent_for(settings, store, runbooks=runbooks))


def _web_server(settings: Settings, service: HubService,
                resources: ExitStack) -> tuple[WebServer, WebDeps]:
    """The on-call web on its own store connection, its socket bound now (a taken port is an
    error before anything starts); the sender, made next, sets ``wake_sender``."""
    assert settings.http_listen is not None
    web_store = open_store(settings)
    resources.callback(web_store.close)
    deps = WebDeps(settings=settings, store=web_store, link_key=load_link_key(settings),
                   readiness=service.readiness, health=lambda: service.last_health)
    server = WebServer(create_app(deps), settings.http_listen)
    resources.callback(server.stop)  # closes the socket when the hub never starts
    return server, deps


def _link_signer(settings: Settings, server: WebServer, deps: WebDeps) -> LinkSigner:
    """What signs the links in messages: under CAREFLOW_PUBLIC_URL, else where the web
    listens (the bound port, when CAREFLOW_HTTP_LISTEN asks for any free one)."""
    host = server.address.host
    reachable = settings.public_url is not None or not (
        is_loopback(host) or host in ("0.0.0.0", "::"))  # noqa: S104 (compared, not bound)
    return LinkSigner(deps.link_key, settings.public_url or server.url,
                      ttl_s=settings.link_ttl_s, reachable=reachable)


def _digest_scheduler(settings: Settings, rules: RuleSet | None,
                      sender: NotificationSender | None,
                      resources: ExitStack) -> DigestScheduler | None:
    """The status digests (when the rules have any) on their own store connection, queued for
    the sender; each channel they name needs a URL (said at start-up, not when a digest has
    nowhere to go)."""
    if rules is None or not rules.routing.digests:
        return None
    if sender is None:
        log.warning("status digests are configured but no notification channel is: none "
                    "will be sent (set CAREFLOW_CHANNEL_<NAME>)",
                    extra={"digests": [d.key for d in rules.routing.digests]})
        return None
    for digest, origin in zip(rules.routing.digests, rules.digest_origins, strict=True):
        if digest.channel not in sender.channels:
            msg = (f"digest {digest.key!r} ({origin}) goes to channel {digest.channel!r}, which "
                   f"has no URL: set CAREFLOW_CHANNEL_{digest.channel.upper()} (or ..._FILE)")
            raise ConfigError(msg)
    store = open_store(settings)
    resources.callback(store.close)  # the scheduler's own connection
    return DigestScheduler(store, rules.routing.digests, on_queued=sender.wake,
                           severities={rule.name: rule.severity for rule in rules.rules})


def _ticking(alerts: AlertStage | None) -> Callable[[], bool]:
    """The dead man's switch's health: the alert loop still ticks (always, without one)."""
    if alerts is None:
        return lambda: True
    return lambda: alerts.stalled_ms() < STALL_LIMIT_MS
