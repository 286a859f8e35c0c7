"""The InfluxDB sink: drains the event log (and the presence log, incidents and snapshots) into
InfluxDB, from a cursor, in order, idempotently (design: docs/influxdb.md).

The event log is the durable backlog. While InfluxDB is down the hub keeps ingesting and the
cursor stays put; when it returns, the sink catches up in log order. A write is confirmed before
the cursor moves, and a re-sent chunk overwrites identical points, so nothing is lost or doubled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from careflow.core import clock
from careflow.core.clock import Clock
from careflow.core.config import InfluxSettings, Settings
from careflow.core.errors import CareflowError, ConfigError, InfluxError, InfluxRefusedError
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.sinks.influx.points import (
    DeviceSnapshot,
    device_online,
    device_status_points,
    event_points,
    hub_points,
    incident_points,
    presence_points,
)
from careflow.hub.stage import Committed
from careflow.hub.store.adapters import open_store
from careflow.hub.store.interface import Cursors, EventLog, Fleet, Incidents, SinkQueue, Store
from careflow.hub.store.records import UNRESOLVED, EventFilter, StoredEvent

__all__ = [
    "InfluxSink", "InfluxStage", "PointWriter", "V1Writer", "V2Writer", "make_writer",
    "read_refusal", "reset_cursors", "sink_for",
]

log = logging.getLogger("careflow.hub.sinks.influx.sink")

EVENTS_CURSOR = "influx.events"
PRESENCE_CURSOR = "influx.presence"
INCIDENTS_CURSOR = "influx.incidents"  # a time (ms), not a position: incidents change in place
OUTBOX = "influx"
OUTBOX_MAX_ROWS = 500_000  # snapshots only: about 3 days of a 1,000-device fleet
INCIDENT_OVERLAP_MS = 60_000  # re-send recent phases: an acknowledgement may commit late
SNAPSHOT_INTERVAL_S = 60.0
HUB_HEALTH_INTERVAL_S = 10.0
INCIDENT_SYNC_INTERVAL_S = 5.0
MAX_BACKOFF_S = 30.0
_TIMEOUT_S = 10.0


class PointWriter(Protocol):
    """Something that stores line-protocol points: InfluxDB's v1 or v2 write API."""

    def write(self, lines: Sequence[str]) -> None:
        """Store the points or raise :class:`InfluxError`."""
        ...

    def describe(self) -> str:
        """Where the points go, for logs (no secrets)."""
        ...


_DROPPED = re.compile(r"dropped=(\d+)\s*$")
_UNPARSABLE = re.compile(r"^(?:partial write: )?unable to parse '", re.MULTILINE)


def _error_text(body: str) -> str:
    """The error message of an answer: 1.x sends {"error": ...}, 2.x {"code", "message"}."""
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            text = parsed.get("error") or parsed.get("message")
            if isinstance(text, str):
                return text.strip()
    return body.strip()


def read_refusal(status: int, body: str, where: str) -> InfluxRefusedError:
    """What InfluxDB refused, from its answer to a write (400 or 422).

    InfluxDB 1.x answers 400 both for a partial write (its other points are stored: "partial
    write: points beyond retention policy dropped=1", "...: field type conflict ... dropped=1",
    or lines it could not parse, listed one "unable to parse '...'" each) and for a request it
    refused whole. 2.x answers 422 for a partial write and 400 when one malformed line made it
    refuse the whole request.
    """
    text = _error_text(body)
    partial = status == 422 or "partial write" in text
    tail = _DROPPED.search(text)
    dropped = (int(tail[1]) if tail else 0) + len(_UNPARSABLE.findall(text))
    return InfluxRefusedError(f"{where} refused points ({status}): {text[:500]}", status=status,
                              partial=partial, dropped=dropped)


def _translate_status(status: int, body: str, where: str) -> InfluxError:
    """One careflow error per HTTP answer, saying whether to retry and what to do next."""
    detail = body.strip()[:300]
    if status in (401, 403):
        return InfluxError(f"{where} refused our credentials ({status}): check "
                           "CAREFLOW_INFLUX_USER/PASSWORD or CAREFLOW_INFLUX_TOKEN; "
                           "the events wait in the backlog", retry=True, status=status)
    if status == 413:
        return InfluxError(f"{where}: request too large", retry=True, status=status)
    if status in (400, 422):
        return read_refusal(status, body, where)
    return InfluxError(f"{where} answered {status}: {detail}", retry=True, status=status)


def _body(lines: Sequence[str]) -> bytes:
    """The request body; a lone surrogate (which UTF-8 cannot carry) becomes "?" rather than an
    error that would stop the sink at the same chunk forever."""
    return "\n".join(lines).encode("utf-8", "replace")


class V1Writer:
    """InfluxDB 1.x `/write` (database, retention policy, user/password), over plain HTTP."""

    def __init__(self, settings: InfluxSettings, *, timeout_s: float = _TIMEOUT_S) -> None:
        assert settings.database is not None
        self.settings = settings
        self.timeout_s = timeout_s
        params = {"db": settings.database, "precision": "ns"}
        if settings.retention_policy:
            params["rp"] = settings.retention_policy
        self._write_url = f"{settings.url}/write?{urllib.parse.urlencode(params)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if settings.username:
            pair = f"{settings.username}:{settings.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._created = False

    def describe(self) -> str:
        return f"InfluxDB v1 {self.settings.url} db={self.settings.database}"

    def write(self, lines: Sequence[str]) -> None:
        try:
            self._post(self._write_url, _body(lines))
        except InfluxError as exc:
            if exc.status == 404 and not self._created:  # as Telegraf does: make the database
                self._create_database()
                self._post(self._write_url, _body(lines))
            else:
                raise

    def _create_database(self) -> None:
        name = (self.settings.database or "").replace('"', '\\"')
        body = urllib.parse.urlencode({"q": f'CREATE DATABASE "{name}"'}).encode()
        self._post(f"{self.settings.url}/query", body,
                   content_type="application/x-www-form-urlencoded")
        self._created = True
        log.warning("created the InfluxDB database", extra={"database": self.settings.database})

    def _post(self, url: str, body: bytes, *, content_type: str | None = None) -> None:
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        # the URL is http(s):// by construction (load_influx refuses other schemes)
        request = urllib.request.Request(url, data=body, headers=headers,  # noqa: S310
                                         method="POST")
        where = self.describe()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            if exc.code == 404 and "database not found" in text:
                raise InfluxError(f"{where}: database not found", retry=True, status=404) from exc
            raise _translate_status(exc.code, text, where) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InfluxError(f"cannot reach {where}: {reason}", retry=True) from exc


class V2Writer:
    """The v2 API (`/api/v2/write`: org, bucket, token) through influxdb-client.

    Served by InfluxDB 2.x, 3.x and 1.8+. The client's own retries are off: the sink's backlog
    retries, in order, and the client would otherwise retry behind its back.
    """

    def __init__(self, settings: InfluxSettings, *, timeout_s: float = _TIMEOUT_S) -> None:
        # heavy imports, only when the v2 API is configured
        from influxdb_client.client.influxdb_client import InfluxDBClient  # noqa: PLC0415
        from influxdb_client.client.write_api import SYNCHRONOUS  # noqa: PLC0415

        self.settings = settings
        self._client = InfluxDBClient(url=settings.url, token=settings.token or "",
                                      org=settings.org or "",
                                      timeout=int(timeout_s * 1000), retries=False)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def describe(self) -> str:
        return (f"InfluxDB v2 {self.settings.url} org={self.settings.org} "
                f"bucket={self.settings.bucket}")

    def write(self, lines: Sequence[str]) -> None:
        from influxdb_client.domain.write_precision import WritePrecision  # noqa: PLC0415
        from influxdb_client.rest import ApiException  # noqa: PLC0415

        try:
            self._api.write(bucket=self.settings.bucket or "", org=self.settings.org or "",
                            record=_body(lines),
                            write_precision=WritePrecision.NS)  # type: ignore[arg-type]
        except ApiException as exc:
            body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(
                exc.body or "")
            raise _translate_status(int(exc.status or 0), body, self.describe()) from exc
        except Exception as exc:  # urllib3 connection errors have no common careflow shape
            raise InfluxError(f"cannot reach {self.describe()}: {exc}", retry=True) from exc

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]


def make_writer(settings: InfluxSettings) -> PointWriter:
    """The writer for the configured API."""
    return V2Writer(settings) if settings.api == "v2" else V1Writer(settings)


class SinkStore(EventLog, Fleet, Incidents, Cursors, SinkQueue, Protocol):
    """What the sink uses of the store (a connection of its own, closed with the hub): the log
    after its cursors, presence and the registry, incident phases, its queue of lines."""

    def close(self) -> None:
        """Release the store."""
        ...


@dataclass(slots=True)
class SinkCounters:
    """What the sink has done, for `careflow status` and the `hub` measurement."""

    points_written: int = 0
    points_rejected: int = 0  # refused by InfluxDB (malformed, too old...); stay in the log
    last_rejection: str | None = None  # why InfluxDB refused the last points it refused
    snapshots_dropped: int = 0
    write_errors: int = 0
    last_error: str | None = None
    last_write_ms: int | None = None
    failing_since_ms: int | None = None


class InfluxSink:
    """Drains careflow's logs into InfluxDB in a thread of the hub, with its own store connection.

    Each source keeps its own cursor in the store; a cursor moves only after InfluxDB confirmed
    the points before it.
    """

    name = "influx"

    def __init__(self, store: SinkStore, writer: PointWriter, *, hub_name: str = "careflow-hub",
                 backlog_warn: int = 100_000, chunk: int = 5000,
                 health: Callable[[], Mapping[str, Any]] | None = None,
                 snapshots: bool = True, clock: Clock = clock.now_ms) -> None:
        self.store = store
        self.clock = clock
        self.writer = writer
        self.hub_name = hub_name
        self.backlog_warn = backlog_warn
        self.chunk = chunk
        self.health = health
        self.snapshots = snapshots
        self.counters = SinkCounters()
        self.sites = SiteBook()
        self._seeded = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_snapshot = self._next_hub = self._next_incidents = 0.0
        self._warned_backlog = False
        self._last_backlog = 0  # what status() reports: other threads never touch the store
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx-write")

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Run in a daemon thread until :meth:`stop`."""
        log.info("InfluxDB sink on", extra={"target": self.writer.describe()})
        self._thread = threading.Thread(target=self._run, name="influx-sink", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the write in progress and stop; the cursor keeps the rest for next time."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._write_pool.shutdown(wait=False)

    def wake(self) -> None:
        """New events are stored: drain now rather than at the next poll."""
        self._wake.set()

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """A stage after each commit: the drain follows the log with its own cursor, in its own
        thread; a commit that stored events only wakes it."""
        if commit.events:
            self.wake()

    def backlog(self) -> int:
        """Events stored but not yet confirmed by InfluxDB."""
        return self.store.count_after(self.store.cursor(EVENTS_CURSOR))

    def status(self) -> dict[str, Any]:
        """The sink's part of the hub's health report."""
        c = self.counters
        return {"target": self.writer.describe(), "backlog_events": self._last_backlog,
                "points_written": c.points_written, "points_rejected": c.points_rejected,
                "last_rejection": c.last_rejection,
                "snapshots_dropped": c.snapshots_dropped, "write_errors": c.write_errors,
                "last_error": c.last_error, "last_write_ms": c.last_write_ms,
                "failing_since_ms": c.failing_since_ms}

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                moved = self.drain_once()
                self._recovered()
                delay = 1.0
            except InfluxError as exc:
                self._failed(exc)
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            except CareflowError as exc:  # the store; ingest reports that one loudly itself
                log.warning("InfluxDB sink cannot read the store", extra={"error": str(exc)})
                self._stop.wait(delay)
                continue
            except Exception:  # nothing may end this thread: the backlog would grow unseen
                log.exception("InfluxDB sink failed unexpectedly; retrying")
                self._stop.wait(delay)
                continue
            if not moved:
                self._wake.wait(1.0)
                self._wake.clear()

    def _failed(self, exc: InfluxError) -> None:
        c = self.counters
        c.write_errors += 1
        now_ms = self.clock()
        first = c.failing_since_ms is None
        if first:
            c.failing_since_ms = now_ms
        with contextlib.suppress(CareflowError):  # a busy store keeps the last known figure
            self._last_backlog = self.backlog()
        if first or str(exc) != c.last_error:
            log.warning("InfluxDB write failed; events wait in the backlog and will be sent in "
                        "order", extra={"error": str(exc), "backlog_events": self._last_backlog})
        c.last_error = str(exc)

    def _recovered(self) -> None:
        c = self.counters
        if c.failing_since_ms is not None:
            log.info("InfluxDB writes work again", extra={
                "down_s": round((self.clock() - c.failing_since_ms) / 1000, 1),
                "backlog_events": self._last_backlog})
            c.failing_since_ms = None

    # -- draining --------------------------------------------------------------------------

    def drain_once(self, *, now_ms: int | None = None) -> int:
        """One pass over every source; how many points went out. Raises InfluxError."""
        self._seed_sites()
        now = time.monotonic()
        moved = self._drain_events() + self._drain_presence()
        if now >= self._next_incidents:
            moved += self._drain_incidents(now_ms)
            self._next_incidents = now + INCIDENT_SYNC_INTERVAL_S
        if self.health is not None and now >= self._next_hub:
            self._queue(hub_points(self.health(), hub=self.hub_name,
                                   backlog_events=self.backlog(),
                                   open_incidents=self.store.count_incidents(
                                       states=UNRESOLVED),
                                   now_ms=now_ms or self.clock()))
            self._next_hub = now + HUB_HEALTH_INTERVAL_S
        if self.snapshots and now >= self._next_snapshot:
            self._queue(self.snapshot_points(now_ms or self.clock()))
            self._next_snapshot = now + SNAPSHOT_INTERVAL_S
        moved += self._drain_outbox()
        self._check_backlog()
        return moved

    def drain_state(self) -> int:
        """Write all presence changes and incident phases after their cursors (replay)."""
        written = 0
        while moved := self._drain_presence():
            written += moved
        return written + self._drain_incidents(None)

    def _send(self, lines: list[str]) -> None:
        """Write, halving on 'too large'. Points InfluxDB refuses are counted, logged and
        skipped, never retried forever, and never cost the points beside them (the events stay
        in the log for a replay once the cause is fixed)."""
        if not lines:
            return
        try:
            self.writer.write(lines)
        except InfluxRefusedError as exc:
            self._refused(lines, exc)
            return
        except InfluxError as exc:
            if exc.status != 413:
                raise
            if len(lines) > 1:
                half = len(lines) // 2
                self._send(lines[:half])
                self._send(lines[half:])
            else:  # one point too large for the server: skip it
                self._skipped(1, str(exc), lines[0])
            return
        self._written(len(lines))

    def _refused(self, lines: list[str], exc: InfluxRefusedError) -> None:
        """Skip exactly what InfluxDB refused. After a partial write that says how many it
        dropped, the rest is stored; otherwise halve until the refused lines stand alone
        (rewriting stored points is harmless: they overwrite themselves)."""
        if exc.partial and exc.dropped:
            dropped = min(exc.dropped, len(lines))
            self._written(len(lines) - dropped)
            self._skipped(dropped, str(exc), None)
        elif len(lines) > 1:
            half = len(lines) // 2
            self._send(lines[:half])
            self._send(lines[half:])
        else:
            self._skipped(1, str(exc), lines[0])

    def _written(self, points: int) -> None:
        self.counters.points_written += points
        self.counters.last_write_ms = self.clock()

    def _skipped(self, points: int, reason: str, example: str | None) -> None:
        c = self.counters
        c.points_rejected += points
        c.last_rejection = reason
        log.error("InfluxDB refused points; skipped them (they stay in the event log)",
                  extra={"points": points, "reason": reason,
                         "point": example[:300] if example is not None else None})

    def _seed_sites(self) -> None:
        """Learn the sites declared before the cursor, so resumed points keep their site."""
        if self._seeded:
            return
        up_to = self.store.cursor(EVENTS_CURSOR)
        if up_to:
            for chunk in self.store.iter_log(EventFilter(type="provision"), up_to_pos=up_to):
                for event in chunk:
                    self.sites.learn(event, event.data)
        self._seeded = True

    def _event_chunk(self, after: int) -> list[StoredEvent]:
        iterator: Iterator[list[StoredEvent]] = self.store.iter_log(
            EventFilter(), chunk=self.chunk, after_pos=after)
        return next(iterator, [])

    def _drain_events(self, max_chunks: int = 20) -> int:
        """Catch up on the log, rendering the next chunk while the previous one is written:
        the POST waits on InfluxDB, the rendering on Python, so they overlap. Each cursor move
        still follows its own chunk's confirmation, in order."""
        after = self.store.cursor(EVENTS_CURSOR)
        written = 0
        in_flight: tuple[Future[None], int, int] | None = None  # (write, last pos, points)
        try:
            for _ in range(max_chunks):
                events = self._event_chunk(after)
                if not events:
                    break
                lines = self._render(events)
                after = events[-1].pos
                if in_flight is not None:
                    pending, in_flight = in_flight, None
                    written += self._confirm(*pending)
                in_flight = (self._write_pool.submit(self._send, lines), after, len(lines))
        finally:
            if in_flight is not None:  # also when rendering failed: the write is finished first
                written += self._confirm(*in_flight)
        return written

    def _confirm(self, write: Future[None], last_pos: int, points: int) -> int:
        write.result()  # raises the write's InfluxError: the cursor stays before this chunk
        self.store.set_cursor(EVENTS_CURSOR, last_pos)
        return points

    def _render(self, events: Sequence[StoredEvent]) -> list[str]:
        lines: list[str] = []
        for event in events:
            data = json.loads(event.body).get("data", {})
            self.sites.learn(event, data)
            lines.extend(event_points(event, data, self.sites.site_of(event.gateway)))
        return lines

    def write_events(self, events: Sequence[StoredEvent]) -> int:
        """Write a chunk of the log, then move the cursor past it; how many points."""
        if not events:
            return 0
        lines = self._render(events)
        self._send(lines)
        self.store.set_cursor(EVENTS_CURSOR, events[-1].pos)
        return len(lines)

    def _drain_presence(self) -> int:
        after = self.store.cursor(PRESENCE_CURSOR)
        changes = self.store.presence_changes(after_pos=after, limit=self.chunk)
        if not changes:
            return 0
        lines = [text for change in changes
                 for text in presence_points(change, self.sites.site_of(change.gateway))]
        self._send(lines)
        self.store.set_cursor(PRESENCE_CURSOR, changes[-1].pos)
        return len(lines)

    def _drain_incidents(self, now_ms: int | None) -> int:
        """Incident phases since the watermark (with overlap; rewriting a phase is harmless)."""
        started_ms = now_ms or self.clock()
        since_ms = max(self.store.cursor(INCIDENTS_CURSOR) - INCIDENT_OVERLAP_MS, 0)
        written, after_id = 0, 0
        while True:
            incidents = self.store.incidents_changed(since_ms=since_ms, after_id=after_id,
                                                     limit=self.chunk)
            if not incidents:
                break
            lines = [text for incident in incidents
                     for text in incident_points(incident, self.sites.site_of(incident.gateway))]
            self._send(lines)
            written += len(lines)
            after_id = incidents[-1].id
        self.store.set_cursor(INCIDENTS_CURSOR, started_ms)
        return written

    def snapshot_points(self, now_ms: int) -> list[str]:
        """Every device's online state and heartbeat age now (the uptime series)."""
        presence = self.store.presence()
        snapshots = []
        for record in self.store.devices():
            gateway_presence = presence.get(record.gateway)
            gateway_online = None if gateway_presence is None else (
                gateway_presence.state == "online")
            snapshots.append(DeviceSnapshot(
                record.gateway, record.device,
                device_online(record, gateway_online=gateway_online, now_ms=now_ms),
                max(now_ms - record.last_seen_ms, 0) / 1000, record.last_seen_ms))
        return device_status_points(snapshots, self.sites, now_ms)

    def _queue(self, lines: list[str]) -> None:
        if not lines:
            return
        dropped = self.store.queue_lines(OUTBOX, lines, max_rows=OUTBOX_MAX_ROWS)
        if dropped:
            self.counters.snapshots_dropped += dropped
            log.error("InfluxDB snapshot outbox full: dropped the oldest snapshot points",
                      extra={"dropped": dropped, "bound": OUTBOX_MAX_ROWS})

    def _drain_outbox(self) -> int:
        written = 0
        while queued := self.store.queued_lines(OUTBOX, limit=self.chunk):
            self._send([text for _, text in queued])
            self.store.forget_lines(OUTBOX, up_to_pos=queued[-1][0])
            written += len(queued)
            if len(queued) < self.chunk:
                break
        return written

    def _check_backlog(self) -> None:
        backlog = self._last_backlog = self.backlog()
        if backlog > self.backlog_warn and not self._warned_backlog:
            log.error("InfluxDB backlog is large: events are safe in the log but dashboards "
                      "lag; check InfluxDB", extra={"backlog_events": backlog,
                                                     "warn_at": self.backlog_warn})
            self._warned_backlog = True
        elif backlog <= self.backlog_warn // 2:
            self._warned_backlog = False


def reset_cursors(store: Cursors) -> None:
    """Make the next drain rewrite everything from the logs (replay --target influx)."""
    for name in (EVENTS_CURSOR, PRESENCE_CURSOR, INCIDENTS_CURSOR):
        store.set_cursor(name, 0)


class InfluxStage:
    """`careflow replay --target influx`: rewrite InfluxDB from the logs, in order.

    Points are idempotent, so a hub writing at the same time does no harm.
    """

    name = "influx"
    needs_whole_log = True

    def __init__(self) -> None:
        from careflow.core.config import load_settings  # noqa: PLC0415 - the CLI's environment

        settings = load_settings().influx
        if settings is None:
            msg = ("replay --target influx needs CAREFLOW_INFLUX_URL and CAREFLOW_INFLUX_DB "
                   "(or CAREFLOW_INFLUX_ORG/BUCKET/TOKEN)")
            raise ConfigError(msg)
        self.target = settings
        self._sink: InfluxSink | None = None

    def begin(self, store: Store) -> int | None:
        """Rewind the sink's cursors; the rewrite covers the log up to this moment."""
        reset_cursors(store)
        self._sink = InfluxSink(store, make_writer(self.target), snapshots=False)
        return store.last_pos()

    def after_commit(self, commit: Committed, now_ms: int) -> None:
        """Write a chunk of the log and move the cursor past it."""
        assert self._sink is not None
        self._sink.write_events(commit.events)

    def summary(self) -> list[str]:
        """Presence and incidents follow the events; then say what was written."""
        assert self._sink is not None
        self._sink.drain_state()
        c = self._sink.counters
        lines = [f"InfluxDB: {c.points_written} point(s) written to {self._sink.writer.describe()}"]
        if c.points_rejected:
            lines.append(f"InfluxDB rejected {c.points_rejected} point(s); see the log")
        return lines


def sink_for(settings: Settings, *, snapshots: bool = True) -> InfluxSink | None:
    """The sink on its own store connection (it reads while ingest writes), or None when
    CAREFLOW_INFLUX_URL is unset; ``snapshots``: device-status snapshots too."""
    if settings.influx is None:
        return None
    return InfluxSink(open_store(settings),
                      make_writer(settings.influx), hub_name=settings.hub_client_id,
                      backlog_warn=settings.influx.backlog_warn, snapshots=snapshots)
