"""Notifications through Apprise, with a durable outbox.

Channels are named; each one's Apprise URL (WhatsApp, mailto/mailtos, Discord, json://...) comes
from ``CAREFLOW_CHANNEL_<NAME>`` or the file named by ``CAREFLOW_CHANNEL_<NAME>_FILE`` — never
from YAML. Routing: critical incidents go to ``oncall``, everything else to ``ops``.

A notification is written to the store in the same transaction as the incident change it
announces; a sender thread claims it with a compare-and-set (so two senders or a restart never
send it twice while it is claimed), hands it to the channel, and records the result. Failures
are retried with exponential backoff; after ``MAX_ATTEMPTS`` the notification is marked failed,
visibly (``careflow notifications``), and counted in the hub's health.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import apprise

from careflow.config import read_secret
from careflow.errors import ConfigError
from careflow.hub.store import EventStore, Notification

__all__ = [
    "MAX_ATTEMPTS",
    "Channel",
    "NotificationSender",
    "combine",
    "load_channels",
    "render",
    "retry_delay_ms",
    "route",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
_CHANNEL_VAR = re.compile(r"^CAREFLOW_CHANNEL_([A-Z0-9_]+?)(_FILE)?$")


@dataclass(frozen=True, slots=True)
class Channel:
    """A named destination with its Apprise URL (kept out of logs and reprs)."""

    name: str
    url: str = field(repr=False)


def load_channels(env: Mapping[str, str] | None = None) -> dict[str, Channel]:
    """Every channel configured in the environment, by lower-case name."""
    env = os.environ if env is None else env
    channels: dict[str, Channel] = {}
    for key in env:
        match = _CHANNEL_VAR.match(key)
        if not match:
            continue
        name = match[1].lower()
        url = read_secret(env, f"CAREFLOW_CHANNEL_{match[1]}")
        if not url:
            continue
        if not apprise.Apprise().add(url):
            msg = (f"CAREFLOW_CHANNEL_{match[1]} is not an Apprise URL careflow can use "
                   "(e.g. mailtos://user:pass@smtp.example.org?to=oncall@example.org, "
                   "json://hooks.example.org/careflow)")
            raise ConfigError(msg)
        channels[name] = Channel(name, url)
    return channels


def route(severity: str) -> tuple[str, ...]:
    """Which channels hear about an incident of this severity."""
    return ("oncall",) if severity == "critical" else ("ops",)


def retry_delay_ms(attempts: int) -> int:
    """Backoff after ``attempts`` failures: 1 s, 2 s, 4 s ... capped at 5 minutes."""
    return int(min(300_000, 1000 * 2 ** max(0, attempts - 1)))


def render(*, kind: str, severity: str, summary: str, detail: str, gateway: str, device: str,
           since_ms: int, runbook: str | None) -> tuple[str, str]:
    """Title and body a person can act on: what, where, since when, what to do."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since_ms / 1000))
    if kind == "resolved":
        return f"[RESOLVED] {summary}", f"{summary} is over.\nWhere: {gateway} / {device}\n" \
                                        f"Started: {since}\n{detail}"
    if kind == "escalation":
        summary = f"NOT ACKNOWLEDGED: {summary}"
    todo = f"Runbook: {runbook}" if runbook else "Check the device and its gateway."
    return (f"[{severity.upper()}] {summary}",
            f"What: {summary}\nWhere: gateway {gateway}, device {device}\nSince: {since}\n"
            f"Detail: {detail}\nWhat to do: {todo}\n"
            f"Acknowledge: careflow incidents list, then careflow incidents ack <id>")


def combine(notes: Sequence[Notification]) -> tuple[str, str]:
    """One message for several alerts of one gateway: a count in the title, each one below."""
    if len(notes) == 1:
        return notes[0].title, notes[0].body
    gateway = notes[0].group_key or "several sources"
    title = f"[{len(notes)} alerts] {gateway}: " + "; ".join(n.title for n in notes[:3])
    if len(notes) > 3:
        title += f"; and {len(notes) - 3} more"
    body = "\n\n".join(f"--- {n.title}\n{n.body}" for n in notes)
    return title, body


class NotificationSender:
    """Delivers pending notifications from the store, on its own thread and connection."""

    def __init__(self, store: EventStore, channels: Mapping[str, Channel]) -> None:
        self.store = store  # a second SqliteStore on the same file (its own connection)
        self.channels = dict(channels)
        self._apprise = {name: self._client(c) for name, c in self.channels.items()}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)

    @staticmethod
    def _client(channel: Channel) -> apprise.Apprise:
        client = apprise.Apprise()
        client.add(channel.url)
        return client

    def start(self) -> None:
        """Start delivering; what a previous run had claimed but not finished is pending again."""
        self.store.release_claimed_notifications()
        self._thread.start()

    def wake(self) -> None:
        """Something was queued: deliver now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the notification in hand."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.deliver_due(time.time_ns() // 1_000_000):
                    self._wake.wait(0.5)  # or sooner, when the hub queues something
                    self._wake.clear()
            except Exception:
                log.exception("notification delivery failed unexpectedly")
                self._stop.wait(1.0)

    def deliver_due(self, now_ms: int) -> int:
        """Claim and send what is due; return how many were attempted."""
        claimed = self.store.claim_notifications(now_ms=now_ms, limit=50)
        groups: dict[tuple[str, str], list[Notification]] = {}
        for note in claimed:
            key = (note.channel, note.group_key if note.kind == "firing" else f"#{note.id}")
            groups.setdefault(key, []).append(note)
        for notes in groups.values():
            self._send(notes, now_ms)
        return len(claimed)

    def _send(self, notes: list[Notification], now_ms: int) -> None:
        """One message for a group of notifications to one channel; each row records it."""
        store = self.store
        title, body = combine(notes)
        client = self._apprise.get(notes[0].channel)
        if client is None:
            for note in notes:
                store.finish_notification(note.id, ok=False, now_ms=now_ms,
                                          error=f"no channel {note.channel!r} configured",
                                          final=True)
            self.failed += len(notes)
            return
        ok = bool(client.notify(title=title, body=body))
        for note in notes:
            final = not ok and note.attempts + 1 >= MAX_ATTEMPTS
            store.finish_notification(
                note.id, ok=ok, now_ms=time.time_ns() // 1_000_000,
                error=None if ok else "the channel refused or could not be reached",
                final=final, retry_in_ms=retry_delay_ms(note.attempts + 1))
            if ok:
                self.sent += 1
            elif final:
                self.failed += 1
                log.error("notification failed for good", extra={
                    "channel": note.channel, "incident": note.incident_id,
                    "attempts": note.attempts + 1})
            else:
                log.warning("notification failed; will retry", extra={
                    "channel": note.channel, "incident": note.incident_id,
                    "retry_in_ms": retry_delay_ms(note.attempts + 1)})
