"""Notifications through Apprise, with a durable outbox.

Channels are named; each one's Apprise URL (WhatsApp, mailto/mailtos, Discord, json://...) comes
from ``CAREFLOW_CHANNEL_<NAME>`` or the file named by ``CAREFLOW_CHANNEL_<NAME>_FILE`` — never
from YAML. Routing (``routing.py``): by default critical incidents go to ``oncall``, everything
else to ``ops``; routes in the rules' ``routing:`` section choose otherwise.

WhatsApp business messages outside the 24-hour customer window must use an approved template:
``CAREFLOW_CHANNEL_<NAME>_TEMPLATE`` (and ``..._LANGUAGE``, default ``en_US``) make Apprise send
the template, with careflow's message as its body parameter ``{{1}}`` — flattened to one line,
because WhatsApp refuses template parameters with line breaks.

Every message ends with ``Ref: careflow-n<id>[+n<id>...]``: the ids of the notifications it
carries. Delivery is at least once: a hub killed after a channel accepted a message but before
recording it sends it again after the restart, with the same ref, so a receiver can drop the
duplicate.

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
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import apprise

from careflow.config import read_secret
from careflow.errors import ConfigError
from careflow.hub.routing import default_channels
from careflow.hub.store import EventStore, Notification

__all__ = [
    "MAX_ATTEMPTS",
    "Channel",
    "NotificationSender",
    "combine",
    "load_channels",
    "raised_again_text",
    "reference",
    "render",
    "retry_delay_ms",
    "route",
    "template_text",
    "with_template",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
_CHANNEL_VAR = re.compile(r"^CAREFLOW_CHANNEL_([A-Z0-9_]+?)(_FILE|_TEMPLATE|_LANGUAGE)?$")
_TEMPLATE_SCHEMES = ("whatsapp",)
DEFAULT_TEMPLATE_LANGUAGE = "en_US"


@dataclass(frozen=True, slots=True)
class Channel:
    """A named destination with its Apprise URL (kept out of logs and reprs)."""

    name: str
    url: str = field(repr=False)
    template: str | None = None  # a WhatsApp message template, already in ``url``


def with_template(url: str, template: str, language: str) -> str:
    """The Apprise WhatsApp URL that sends ``template`` in ``language`` with the message as the
    template's body parameter 1 (Apprise: ``?template=NAME&lang=CODE&:body=1``)."""
    query = urllib.parse.urlencode({"template": template, "lang": language, ":body": "1"})
    return f"{url}{'&' if '?' in url else '?'}{query}"


def template_text(title: str, body: str, ref: str) -> str:
    """One line for a template parameter: WhatsApp refuses line breaks, tabs and long runs of
    spaces in one, and caps a message body at 1024 characters (the ref survives the cut)."""
    text = re.sub(r"\s+", " ", f"{title} | {body}").strip()
    tail = f" | Ref: {ref}"
    return text[:1024 - len(tail)] + tail


def load_channels(env: Mapping[str, str] | None = None) -> dict[str, Channel]:
    """Every channel configured in the environment, by lower-case name."""
    env = os.environ if env is None else env
    channels: dict[str, Channel] = {}
    for key in env:
        match = _CHANNEL_VAR.match(key)
        if not match:
            continue
        if match[2] in ("_TEMPLATE", "_LANGUAGE"):
            continue  # a setting of the channel, read with it below
        name = match[1].lower()
        url = read_secret(env, f"CAREFLOW_CHANNEL_{match[1]}")
        if not url:
            continue
        template = env.get(f"CAREFLOW_CHANNEL_{match[1]}_TEMPLATE") or None
        if template is not None:
            if url.split("://", 1)[0].lower() not in _TEMPLATE_SCHEMES:
                msg = (f"CAREFLOW_CHANNEL_{match[1]}_TEMPLATE is set, but message templates "
                       "are for WhatsApp channels (whatsapp://...) only")
                raise ConfigError(msg)
            url = with_template(url, template, env.get(f"CAREFLOW_CHANNEL_{match[1]}_LANGUAGE")
                                or DEFAULT_TEMPLATE_LANGUAGE)
        if not apprise.Apprise().add(url):
            msg = (f"CAREFLOW_CHANNEL_{match[1]} is not an Apprise URL careflow can use "
                   "(e.g. mailtos://user:pass@smtp.example.org?to=oncall@example.org, "
                   "json://hooks.example.org/careflow)")
            raise ConfigError(msg)
        channels[name] = Channel(name, url, template)
    return channels


def route(severity: str) -> tuple[str, ...]:
    """Which channels hear about an incident of this severity by default (see routing.py)."""
    return default_channels(severity)


def reference(notes: Sequence[Notification]) -> str:
    """The stable id of a message: the ids of the notifications it carries."""
    return "careflow-" + "+".join(f"n{n.id}" for n in sorted(notes, key=lambda n: n.id))


def retry_delay_ms(attempts: int) -> int:
    """Backoff after ``attempts`` failures: 1 s, 2 s, 4 s ... capped at 5 minutes."""
    return int(min(300_000, 1000 * 2 ** max(0, attempts - 1)))


def _utc(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at_ms / 1000))


def raised_again_text(*, raises: int, first_raised_ms: int, acknowledged_by: str | None = None,
                      acknowledged_ms: int | None = None) -> str:
    """What a person needs to know about an alarm raised again: how often, since when, and who
    had the last raise (that raise being acknowledged does not cover this one)."""
    text = f"raised {raises} times, first raised {_utc(first_raised_ms)}"
    if acknowledged_by is not None and acknowledged_ms is not None:
        text += (f"; the previous raise was acknowledged by {acknowledged_by} at "
                 f"{_utc(acknowledged_ms)}, this one is a new emergency")
    return text


def render(*, kind: str, severity: str, summary: str, detail: str, gateway: str, device: str,
           since_ms: int, runbook: str | None, again: str | None = None) -> tuple[str, str]:
    """Title and body a person can act on: what, where, since when, what to do (``again``: an
    alarm raised again, with its count and first raise, see :func:`raised_again_text`)."""
    since = _utc(since_ms)
    if kind == "resolved":
        return f"[RESOLVED] {summary}", f"{summary} is over.\nWhere: {gateway} / {device}\n" \
                                        f"Started: {since}\n{detail}"
    if kind == "escalation":
        summary = f"NOT ACKNOWLEDGED: {summary}"
    elif kind == "repeat":
        summary = f"STILL OPEN, NOT ACKNOWLEDGED: {summary}"
    elif kind == "raised-again":
        summary = f"RAISED AGAIN: {summary}"
    todo = f"Runbook: {runbook}" if runbook else "Check the device and its gateway."
    raised = f"Raised again: {again}\n" if again else ""
    return (f"[{severity.upper()}] {summary}",
            f"What: {summary}\nWhere: gateway {gateway}, device {device}\nSince: {since}\n"
            f"{raised}Detail: {detail}\nWhat to do: {todo}\n"
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
        self._templated = {name for name, c in self.channels.items() if c.template}
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
        groups: dict[tuple[str, str, str], list[Notification]] = {}
        for note in claimed:
            # firing notifications of one gateway go out together, and so do its repeats
            key = (note.channel, note.kind, note.group_key or f"#{note.id}")
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
        ref = reference(notes)
        if notes[0].channel in self._templated:
            title, body = "", template_text(title, body, ref)
        else:
            body = f"{body}\n\nRef: {ref}"
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
