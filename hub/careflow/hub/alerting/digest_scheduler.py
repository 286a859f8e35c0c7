"""The status digests' scheduler: a thread of the hub with its own store connection.

A thread rather than a stage on the alert tick: a digest reads the whole fleet and the
incidents, twice a day, which has no business in the writer loop that acknowledges events (a
slow read there holds up every PUBACK), and a failure here must never touch ingest. It only
queues: the notification sender delivers the digest like any other notification (retries, the
channel's pace, ``careflow notify list``).

Each digest's last sending is a cursor (``digest:<name>``) written in the same transaction as
the queued notification, so a crash neither loses a digest (nothing was written: it is still
due after the restart) nor doubles one (both were written: it is not due any more).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from careflow.core import clock
from careflow.core.clock import Clock
from careflow.hub.alerting.digest import Due, compose, due_digests, fleet_now
from careflow.hub.alerting.rules import Digest
from careflow.hub.ops.rule_controls import describe, in_force
from careflow.hub.store.interface import (
    Cursors,
    Fleet,
    Incidents,
    Outbox,
    RuleControls,
    UnitOfWork,
)
from careflow.hub.store.records import IncidentState, NotificationKind

__all__ = ["CHECK_S", "DigestScheduler", "cursor_name"]

log = logging.getLogger(__name__)

CHECK_S = 15.0  # a digest goes out at most this long after its time
_NEVER = -1  # a cursor never saved


def cursor_name(digest: Digest) -> str:
    """Where a digest's last sending is kept."""
    return f"digest:{digest.key}"


class DigestStore(Incidents, Outbox, Fleet, Cursors, RuleControls, UnitOfWork, Protocol):
    """What the scheduler reads (incidents, the fleet, rules quieted) and writes (the outbox,
    its cursors)."""


class DigestScheduler:
    """Queues each status digest when it is due (see :mod:`careflow.hub.alerting.digest`)."""

    def __init__(self, store: DigestStore, digests: Sequence[Digest], *,
                 on_queued: Callable[[], None] = lambda: None, clock: Clock = clock.now_ms,
                 check_s: float = CHECK_S, severities: Mapping[str, str] | None = None,
                 ) -> None:
        self.store = store  # a connection of its own
        # the loaded rules' severities: a stored control of a critical rule, which the hub
        # ignores, is not reported as in force either
        self.severities = dict(severities or {})
        self.digests = tuple(digests)
        self.on_queued = on_queued  # the sender's wake
        self.clock = clock
        self.check_s = check_s
        self.errors = 0  # checks that failed (each logged, and tried again)
        self.failing_since_ms: int | None = None  # since the first of the failing checks
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="digests", daemon=True)

    def status(self) -> dict[str, Any]:
        """For the hub's health report (`careflow status`, /metrics): a failing check is
        retried, but no digest goes out meanwhile, and nothing else would tell."""
        return {"errors": self.errors, "failing_since_ms": self.failing_since_ms,
                "last_error": self.last_error}

    def start(self) -> None:
        """Check now, then every ``check_s``."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the digest in hand."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # the next check tries again; the digest is still due
                log.exception("cannot queue a status digest")
                self.errors += 1
                self.last_error = str(exc)[:500]
                if self.failing_since_ms is None:
                    self.failing_since_ms = self.clock()
            else:
                self.failing_since_ms = None
            self._stop.wait(self.check_s)

    def run_once(self) -> list[int]:
        """Queue the digests due now; the ids of the notifications queued.

        A digest never sent before starts now: the first one goes at its next time of day
        (not at once, for a time that passed before it was configured).
        """
        now_ms = self.clock()
        last: dict[str, int] = {}
        for digest in self.digests:
            sent = self.store.cursor(cursor_name(digest), missing=_NEVER)
            if sent == _NEVER:
                self.store.set_cursor(cursor_name(digest), now_ms)
                log.info("status digest scheduled", extra={"digest": digest.key,
                                                           "at": digest.at,
                                                           "timezone": digest.timezone})
                continue
            if sent > now_ms:  # the clock was ahead when it was sent, or was set back since:
                # waiting for the clock to reach that sending would skip days (or years)
                self.store.set_cursor(cursor_name(digest), now_ms)
                log.warning("status digest's last sending is ahead of the clock: scheduled "
                            "again from now", extra={"digest": digest.key, "sent_ms": sent,
                                                     "now_ms": now_ms})
                sent = now_ms
            last[digest.key] = sent
        queued = [self._queue(due, now_ms) for due in due_digests(self.digests, last, now_ms)]
        if queued:
            self.on_queued()
        return queued

    def _quieted(self, now_ms: int) -> list[str]:
        """The rules muted or disabled now, one line each."""
        now = in_force(self.store.rule_controls(now_ms=now_ms), self.severities, now_ms)
        return [describe(control) for control in sorted(
            [*now.disabled.values(), *now.muted.values()], key=lambda c: c.rule)]

    def _queue(self, due: Due, now_ms: int) -> int:
        """Write one digest and its cursor together."""
        digest = due.digest
        fleet = fleet_now(self.store.devices(), self.store.presence(),
                          self.store.paused(now_ms), now_ms=now_ms,
                          low_battery_pct=digest.low_battery_pct)
        title, body = compose(
            due, now_ms=now_ms,
            incidents=self.store.incidents(states=(IncidentState.OPEN,), limit=10_000),
            changed=self.store.incidents_changed(since_ms=due.since_ms, limit=10_000),
            fleet=fleet, quieted=self._quieted(now_ms))
        with self.store.atomically("queue a status digest"):
            note_id = self.store.queue_notification(
                digest.channel, kind=NotificationKind.DIGEST, title=title, body=body,
                at_ms=now_ms)
            self.store.set_cursor(cursor_name(digest), now_ms)
        log.info("status digest queued", extra={"digest": digest.key, "channel": digest.channel,
                                                "notification": note_id, "late": due.late})
        return note_id
