"""Notifications through Apprise, with a durable outbox.

Channels are named; each one's Apprise URL (WhatsApp, mailto/mailtos, Discord, json://...) comes
from ``CAREFLOW_CHANNEL_<NAME>`` or the file named by ``CAREFLOW_CHANNEL_<NAME>_FILE`` — never
from YAML. Routing (``routing.py``): by default critical incidents go to ``oncall``, everything
else to ``ops``; routes in the rules' ``routing:`` section choose otherwise.

WhatsApp business messages outside the 24-hour customer window must use an approved template:
``CAREFLOW_CHANNEL_<NAME>_TEMPLATE`` (and ``..._LANGUAGE``, default ``en_US``) make Apprise send
the template, with careflow's message as its body parameter ``{{1}}`` — flattened to one line,
because WhatsApp refuses template parameters with line breaks.

A WhatsApp template may also take the acknowledge link as its own parameter:
``CAREFLOW_CHANNEL_<NAME>_TEMPLATE_LINK=2`` fills ``{{2}}`` with the acknowledge link of the
message's first (most urgent) incident, or ``-`` when the message has none (a resolution); the
template then has exactly the two body parameters (Apprise sends them in order).

One-tap links: with the on-call web on, each notification of an incident still unresolved
carries, at send time, links signed for the channel it goes to (``Acknowledge: URL``,
``Resolve: URL``, and but for a care alarm ``Silence 2 h: URL``; see careflow.hub.web.links)
instead of the hint to use the CLI, and they survive the shortening of a message too long for
its channel, as its ref does.
Email (mailto/mailtos) goes as HTML with clickable links and Apprise's plain-text alternative.

Every message ends with ``Ref: careflow-n<id>[+n<id>...]``: the ids of the notifications it
carries. Delivery is at least once: a hub killed after a channel accepted a message but before
recording it sends it again after the restart, with the same ref, so a receiver can drop the
duplicate.

A notification is written to the store in the same transaction as the incident change it
announces. Each channel has its own sender thread, so a slow or failing channel never delays
another; it claims its channel's due notifications with a compare-and-set (so two senders or a
restart never send one twice while it is claimed), sends all that are due at once as one digest
(critical first, each with its own ref), and records the result. At send time the incident is
read again: a reminder of an incident acknowledged or resolved meanwhile is cancelled, visibly
(``careflow notify list``), not sent.

A failure records the channel's own reason (HTTP status, SMTP reply). A permanent one (bad
credentials, unknown recipient) fails the notification at once; others are retried with
exponential backoff, up to ``MAX_ATTEMPTS`` — except critical notifications of incidents still
open, which are retried for as long as the incident is open, permanent error or not (after a
permanent one at the longest backoff, its attempts counted as spent). Failed notifications, and ones that
keep failing, raise the hub's ``hub-notifications-failing`` alert, on a channel that works.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from html import escape
from typing import Protocol

import apprise

from careflow.core import clock
from careflow.core.config import read_secret
from careflow.core.errors import ConfigError, TransportError
from careflow.hub.alerting.apprise_transport import AppriseTransport
from careflow.hub.store.interface import Incidents, Outbox
from careflow.hub.store.records import Incident, IncidentState, Notification, NotificationKind

__all__ = [
    "CLI_HINT",
    "FAILING_AFTER_ATTEMPTS",
    "LINK_ACTIONS",
    "MAX_ATTEMPTS",
    "MAX_CHANNELS",
    "MAX_DIGEST",
    "NOTIFICATION_OVERDUE_MS",
    "Channel",
    "LinkMaker",
    "NotificationSender",
    "avoid_failing",
    "cancel_reason",
    "combine",
    "critical_open",
    "digest_order",
    "failing_or_stuck",
    "fitting",
    "gives_up",
    "html_body",
    "kept_links",
    "link_lines",
    "load_channels",
    "raised_again_text",
    "reference",
    "render",
    "retry_delay_ms",
    "silenceable",
    "takes_links",
    "template_fits",
    "template_text",
    "with_actions",
    "with_template",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10  # for all but critical notifications of open incidents (see gives_up)
FAILING_AFTER_ATTEMPTS = 3  # a critical one failing this often raises hub-notifications-failing
NOTIFICATION_OVERDUE_MS = 120_000  # due this long and not sent: its channel's sender is stuck
MAX_CHANNELS = 32  # one sender thread each
MAX_DIGEST = 50  # notifications claimed at once (a message takes what the channel's limit fits)
UNROUTED_CHECK_S = 30.0
_SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
_CHANNEL_VAR = re.compile(
    r"^CAREFLOW_CHANNEL_([A-Z0-9_]+?)(_FILE|_TEMPLATE|_LANGUAGE|_TEMPLATE_LINK)?$")
_TEMPLATE_SCHEMES = ("whatsapp",)
_HTML_SCHEMES = ("mailto", "mailtos")  # Apprise's email: HTML with a plain-text alternative
TEMPLATE_LINK_PARAMETER = 2  # {{1}} is the message
CLI_HINT = "Acknowledge: careflow incidents list, then careflow incidents ack <id>"
# what a message's links do, in the order shown, with their labels
LINK_ACTIONS = (("acknowledge", "Acknowledge"), ("resolve", "Resolve"), ("silence", "Silence 2 h"))
_URL = re.compile(r"https?://[^\s<>\"']+")
DEFAULT_TEMPLATE_LANGUAGE = "en_US"
TEMPLATE_MAX = 1024  # characters of a WhatsApp template parameter


@dataclass(frozen=True, slots=True)
class Channel:
    """A named destination with its Apprise URL (kept out of logs and reprs)."""

    name: str
    url: str = field(repr=False)
    template: str | None = None  # a WhatsApp message template, already in ``url``
    template_link: bool = False  # the template's parameter 2 is the acknowledge link


class LinkMaker(Protocol):
    """Makes a signed one-tap link (careflow.hub.web.links.LinkSigner)."""

    reachable: bool  # False: phones cannot open the links (no public URL is set)

    def url(self, *, incident_id: int, action: str, channel: str, now_ms: int) -> str:
        """A fresh link doing ``action`` on the incident, for a message to ``channel``."""
        ...


def takes_links(note: Notification, incident: Incident | None) -> bool:
    """Whether a notification gets one-tap links: it announces an incident (not a digest nor
    its end) that is still unresolved when the message is built."""
    return (note.kind in (NotificationKind.FIRING, NotificationKind.ESCALATION)
            and note.incident_id > 0 and incident is not None
            and incident.state != IncidentState.RESOLVED)


def link_lines(links: LinkMaker, *, incident_id: int, channel: str, now_ms: int,
               silence: bool = True) -> list[str]:
    """``Acknowledge: URL``, ``Resolve: URL``, ``Silence 2 h: URL``: signed for ``channel``
    (``silence`` False: without the last, see :func:`silenceable`); when phones cannot open
    them (no public URL), then how to acknowledge on the hub."""
    lines = [f"{label}: {links.url(incident_id=incident_id, action=action, channel=channel, now_ms=now_ms)}"
             for action, label in LINK_ACTIONS if silence or action != "silence"]
    if not links.reachable:
        lines.append(f"On the hub: careflow incidents ack {incident_id}")
    return lines


def silenceable(incident: Incident) -> bool:
    """Whether a one-tap link may silence the incident: not a care alarm (nor any critical
    one). A silence holds its escalation with no one having it, and hides the device's next
    raise, a new emergency, for hours; a link acknowledges or resolves it instead (a silence for
    maintenance is ``careflow silences add``, by someone at the hub)."""
    return incident.severity != "critical"


def kept_links(lines: Sequence[str], ref: str, *, room: int) -> Sequence[str]:
    """The link lines a shortened message keeps at its end: all, else the acknowledge link
    alone, else none, whichever leaves at least half of ``room`` (the body's length) for what
    happened and where. On a small channel (an SMS takes 160 characters) links would leave
    nothing of an alarm but its title."""
    for kept in (lines, lines[:1]):
        if len("".join(f"\n{line}" for line in kept) + f"\n\nRef: {ref}") <= room // 2:
            return kept
    return ()


def with_actions(note: Notification, lines: Sequence[str]) -> str:
    """The notification's body saying what a person can do: its links at the end, in place of
    the hint to use the CLI written when it was queued; without links, that hint with the
    incident's id."""
    if not lines:
        return note.body.replace(CLI_HINT, f"Acknowledge: careflow incidents ack {note.incident_id}")
    return "\n".join([_without_hint(note.body), *lines])


def _without_hint(body: str) -> str:
    return "\n".join(line for line in body.split("\n") if line != CLI_HINT)


_BUTTON = ("display:inline-block;padding:10px 18px;background:#0b57d0;color:#ffffff;"
           "border-radius:6px;text-decoration:none;font-weight:bold")
_SMALL_URL = ("display:block;margin-top:4px;font-size:12px;color:#5b6470;"
              "overflow-wrap:anywhere;word-break:break-all")


def html_body(text: str) -> str:
    """A plain-text message as HTML: escaped, line breaks kept, every URL a link, and each
    one-tap link a button with its address small below it. Apprise's plain-text alternative of
    it reads as ``text`` does (``Acknowledge: URL``: a link's text is what it keeps)."""
    labels = {label for _action, label in LINK_ACTIONS}
    lines = []
    for line in text.split("\n"):
        label, sep, rest = line.partition(": ")
        if sep and label in labels and _URL.fullmatch(rest):
            url = escape(rest)
            lines.append(f'<p style="margin:14px 0"><a href="{url}" style="{_BUTTON}">'
                         f'{escape(label)}</a><span style="display:none">: </span>'
                         f'<a href="{url}" style="{_SMALL_URL}">{url}</a></p>')
        else:
            lines.append(_URL.sub(lambda m: f'<a href="{m[0]}" style="overflow-wrap:anywhere">'
                                            f"{m[0]}</a>", escape(line, quote=False)) + "<br>")
    return ('<div style="font-family:sans-serif;font-size:15px;line-height:1.5;'
            'overflow-wrap:anywhere">' + "".join(lines) + "</div>")


def with_template(url: str, template: str, language: str) -> str:
    """The Apprise WhatsApp URL that sends ``template`` in ``language`` with the message as the
    template's body parameter 1 (Apprise: ``?template=NAME&lang=CODE&:body=1``)."""
    query = urllib.parse.urlencode({"template": template, "lang": language, ":body": "1"})
    return f"{url}{'&' if '?' in url else '?'}{query}"


def template_text(title: str, body: str, ref: str, keep: Sequence[str] = ()) -> str:
    """One line for a template parameter: WhatsApp refuses line breaks, tabs and long runs of
    spaces in one, and caps a message body at 1024 characters (the ``keep`` lines, its links,
    and the ref survive the cut)."""
    text, tail = _template_parts(title, body, ref, keep)
    return text[:TEMPLATE_MAX - len(tail)] + tail


def _template_parts(title: str, body: str, ref: str, keep: Sequence[str]) -> tuple[str, str]:
    kept = "".join(f" | {line}" for line in keep)
    return re.sub(r"\s+", " ", f"{title} | {body}").strip(), f"{kept} | Ref: {ref}"


def template_fits(title: str, body: str, ref: str, keep: Sequence[str] = ()) -> bool:
    """Whether :func:`template_text` keeps all of the message (cuts nothing)."""
    text, tail = _template_parts(title, body, ref, keep)
    return len(text) + len(tail) <= TEMPLATE_MAX


def fitting(count: int, whole: Callable[[int], bool]) -> int:
    """How many of ``count`` notifications (in digest order) go in the next message: the most
    for which ``whole(n)`` says the channel takes the message uncut, at least one (a single
    one too long is shortened, its ref kept). Binary search: a digest grows with each one."""
    low, high = 1, count
    while low < high:
        middle = (low + high + 1) // 2
        if whole(middle):
            low = middle
        else:
            high = middle - 1
    return low


def load_channels(env: Mapping[str, str] | None = None) -> dict[str, Channel]:
    """Every channel configured in the environment, by lower-case name."""
    env = os.environ if env is None else env
    channels: dict[str, Channel] = {}
    for key in env:
        match = _CHANNEL_VAR.match(key)
        if not match:
            continue
        if match[2] in ("_TEMPLATE", "_LANGUAGE", "_TEMPLATE_LINK"):
            continue  # a setting of the channel, read with it below
        name = match[1].lower()
        url = read_secret(env, f"CAREFLOW_CHANNEL_{match[1]}")
        if not url:
            continue
        template = env.get(f"CAREFLOW_CHANNEL_{match[1]}_TEMPLATE") or None
        template_link = _template_link(env, match[1], template)
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
        channels[name] = Channel(name, url, template, template_link)
    return channels


def _template_link(env: Mapping[str, str], name: str, template: str | None) -> bool:
    """CAREFLOW_CHANNEL_<NAME>_TEMPLATE_LINK: 2 (the acknowledge link is ``{{2}}``), or unset."""
    given = (env.get(f"CAREFLOW_CHANNEL_{name}_TEMPLATE_LINK") or "").strip()
    if not given:
        return False
    if template is None or given != str(TEMPLATE_LINK_PARAMETER):
        msg = (f"CAREFLOW_CHANNEL_{name}_TEMPLATE_LINK={given!r}: set it to 2, with "
               f"CAREFLOW_CHANNEL_{name}_TEMPLATE, for a WhatsApp template whose {{{{1}}}} is "
               "the message and {{2}} the acknowledge link; or leave it unset")
        raise ConfigError(msg)
    return True


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
    """One message for several notifications to one channel (a digest), in the order given:
    a count in the title, then each one with its own ref so it can be acknowledged by itself."""
    if len(notes) == 1:
        return notes[0].title, notes[0].body
    gateways = {n.group_key for n in notes}
    gateway = gateways.pop() if len(gateways) == 1 and notes[0].group_key else "several sources"
    title = f"[{len(notes)} alerts] {gateway}: " + "; ".join(n.title for n in notes[:3])
    if len(notes) > 3:
        title += f"; and {len(notes) - 3} more"
    body = "\n\n".join(f"--- {n.title}\n{n.body}\nRef: {reference([n])}" for n in notes)
    return title, body


def digest_order(notes: Sequence[Notification],
                 severity: Mapping[int, str]) -> list[Notification]:
    """Critical first (then warning, then the rest), oldest first within a severity;
    ``severity`` maps incident id to its severity."""
    return sorted(notes, key=lambda n: (_SEVERITY_RANK.get(severity.get(n.incident_id, ""), 9),
                                        n.id))


def cancel_reason(note: Notification, incident: Incident | None) -> str | None:
    """Why a claimed reminder (escalation step or repeat) must not go out any more: its incident
    was acknowledged or resolved after it was queued. None: it still goes out (announcements
    and resolutions always do)."""
    if note.kind != "escalation" or incident is None or incident.state == "open":
        return None
    if incident.state == "acknowledged":
        return (f"not sent: incident {incident.id} was acknowledged by "
                f"{incident.acknowledged_by or 'someone'} before this reminder went out")
    return (f"not sent: incident {incident.id} was resolved by "
            f"{incident.resolved_by or 'someone'} before this reminder went out")


def critical_open(incident: Incident | None) -> bool:
    """Whether notifications of this incident are never given up (see :func:`gives_up`)."""
    return incident is not None and incident.severity == "critical" \
        and incident.state != "resolved"


def gives_up(*, attempts: int, permanent: bool, critical_open: bool) -> bool:
    """Whether a failed notification is failed for good: a critical one whose incident is
    still open never is (a "permanent" 401/404/550 may come from a flaky proxy or a token being
    rotated, and a care alarm must arrive once someone fixes the channel); others at once when
    the channel's error is permanent, after ``MAX_ATTEMPTS`` otherwise."""
    if critical_open:
        return False
    return permanent or attempts >= MAX_ATTEMPTS


def failing_or_stuck(store: Outbox, now_ms: int) -> dict[str, str]:
    """Channels whose latest attempt failed, and channels with notifications overdue by
    ``NOTIFICATION_OVERDUE_MS`` that no attempt was recorded for (a stuck or dead sender),
    each with why."""
    overdue = store.overdue_notifications(due_before_ms=now_ms - NOTIFICATION_OVERDUE_MS)
    stuck = {channel: f"{count} notification(s) due for over {NOTIFICATION_OVERDUE_MS // 60_000} "
                      "min and not sent: is its sender stuck? (see the hub log)"
             for channel, count in overdue.items()}
    return {**stuck, **store.failing_channels()}


def avoid_failing(preferred: Sequence[str], *, failing: Collection[str],
                  configured: Sequence[str]) -> tuple[str, ...]:
    """Where to say that notifications fail: the preferred channels that still work, else every
    other configured channel that works, else the preferred ones all the same."""
    working = tuple(c for c in preferred if c not in failing)
    if working:
        return working
    others = tuple(c for c in sorted(configured) if c not in failing)
    return others or tuple(preferred)


@dataclass(frozen=True, slots=True)
class _Message:
    """One message as a channel gets it."""

    title: str
    body: str
    whole: bool  # False: shortened to fit the channel
    params: Mapping[str, str] = field(default_factory=dict)  # Apprise URL additions (template)


class SenderStore(Outbox, Incidents, Protocol):
    """What the senders use of the store: the outbox, and the incidents it announces."""


class NotificationSender:
    """Delivers pending notifications from the store: one thread per channel, so a slow or
    failing channel never holds up another.

    Each channel's thread claims only its channel's due notifications and sends what is due at
    once as one message (``combine``: critical first), at most one message per the channel's
    pace (``AppriseTransport.pace_s``); what comes due meanwhile waits for the next digest.
    The store's connection is shared by the threads, one call at a time.

    ``links`` signs the one-tap links each message carries (None: the web is off, and messages
    say how to acknowledge with the CLI).
    """

    def __init__(self, store: SenderStore, channels: Mapping[str, Channel],
                 links: LinkMaker | None = None) -> None:
        if len(channels) > MAX_CHANNELS:
            msg = (f"{len(channels)} notification channels are configured; careflow runs one "
                   f"thread per channel and takes at most {MAX_CHANNELS}")
            raise ConfigError(msg)
        self.store = store  # a connection of its own (the writer keeps appending meanwhile)
        self.channels = dict(channels)
        self._transports = {name: AppriseTransport(c.url) for name, c in self.channels.items()}
        self._templated = {name for name, c in self.channels.items() if c.template}
        self._html = {name for name, c in self.channels.items()
                      if c.url.split("://", 1)[0].lower() in _HTML_SCHEMES}
        self.links = links
        self._store_lock = threading.Lock()
        self._stop = threading.Event()
        self._wakes = {name: threading.Event() for name in self.channels}
        # per channel: a message the channel took (or refused) whose outcome the store did not
        # record; it stays claimed and is recorded before anything else goes out on the channel
        self._unrecorded: dict[str, tuple[Sequence[Notification],
                                          Mapping[int, Incident | None],
                                          TransportError | None]] = {}
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True,
                                          name=f"notify-{name}") for name in self.channels]
        self._threads.append(threading.Thread(target=self._sweep, name="notify-unrouted",
                                              daemon=True))

    def start(self) -> None:
        """Start delivering; what a previous run had claimed but not finished is pending again."""
        self.store.release_claimed_notifications()
        for thread in self._threads:
            thread.start()

    def wake(self) -> None:
        """Something was queued: deliver now rather than at the next poll."""
        for event in self._wakes.values():
            event.set()

    def stop(self) -> None:
        """Stop after the message in hand (each channel's)."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self, channel: str) -> None:
        wake = self._wakes[channel]
        pace_s = self._transports[channel].pace_s
        last_message: float | None = None
        while not self._stop.is_set():
            if last_message is not None:  # paced before claiming: what comes due meanwhile
                rest = pace_s - (time.monotonic() - last_message)  # joins the next digest
                if rest > 0 and self._stop.wait(rest):
                    return
            wake.clear()
            try:
                claimed, messages = self._deliver_channel(channel, clock.now_ms())
            except Exception:
                log.exception("notification delivery failed unexpectedly",
                              extra={"channel": channel})
                self._stop.wait(1.0)
                if channel not in self._unrecorded:  # sent ones are recorded, not sent again
                    self._release(channel)
                continue
            if messages:
                last_message = time.monotonic()
            if not claimed:
                wake.wait(0.5)  # or sooner, when the hub queues something

    def _release(self, channel: str) -> None:
        """What this channel's thread claimed and could not finish (a store error mid-way) is
        pending again, so the next round sends it (only this thread claims this channel's)."""
        try:
            with self._store_lock:
                released = self.store.release_claimed_notifications(channel)
        except Exception:
            log.exception("cannot release claimed notifications", extra={"channel": channel})
            return
        if released:
            log.warning("claimed notifications are pending again after an error",
                        extra={"channel": channel, "released": released})

    def _sweep(self) -> None:
        while not self._stop.is_set():
            try:
                self._fail_unrouted(clock.now_ms())
            except Exception:
                log.exception("cannot check for notifications to unknown channels")
            self._stop.wait(UNROUTED_CHECK_S)

    def deliver_due(self, now_ms: int) -> int:
        """Claim and send what is due on every channel, one after the other (the threads do it
        concurrently); return how many notifications were claimed."""
        claimed = self._fail_unrouted(now_ms)
        for channel in self.channels:
            claimed += self._deliver_channel(channel, now_ms)[0]
        return claimed

    def _fail_unrouted(self, now_ms: int) -> int:
        """Notifications queued for a channel that is not configured (any more) fail for good,
        but for critical ones of open incidents: those wait (counted as failing, so the
        self-alert says so) for a restart with the channel back (see :func:`gives_up`)."""
        with self._store_lock:  # every channel with something due, however much is queued
            due = self.store.overdue_notifications(due_before_ms=now_ms + 1)
        unknown = set(due) - set(self.channels)
        claimed = 0
        for channel in sorted(unknown):
            with self._store_lock:
                notes = self.store.claim_notifications(now_ms=now_ms, limit=MAX_DIGEST,
                                                       channel=channel)
            # recorded as any permanent refusal is: the same give-up rule, counts and logs
            try:
                with self._store_lock:
                    incidents = {i: self.store.incident(i)
                                 for i in {n.incident_id for n in notes}}
                self._record(notes, incidents, TransportError(
                    f"no channel {channel!r} configured: set CAREFLOW_CHANNEL_"
                    f"{channel.upper()} to an Apprise URL", permanent=True))
            except Exception:  # nothing was sent: pending again, failed at the next check
                self._release(channel)
                raise
            claimed += len(notes)
        return claimed

    def _deliver_channel(self, channel: str, now_ms: int) -> tuple[int, int]:
        """Claim what is due on one channel, drop reminders that are moot, send the rest as one
        message; return (notifications claimed, messages sent or tried)."""
        if channel in self._unrecorded:  # the store refused the last outcome: record it now
            self._record(*self._unrecorded[channel])
            notes = self._unrecorded.pop(channel)[0]
            with self._store_lock:  # what did not fit in that message goes in the next
                self.store.release_claimed_notifications(channel)
            return len(notes), 0
        with self._store_lock:
            claimed = self.store.claim_notifications(now_ms=now_ms, limit=MAX_DIGEST,
                                                     channel=channel)
            incidents = {i: self.store.incident(i) for i in {n.incident_id for n in claimed}}
            due: list[Notification] = []
            for note in claimed:
                reason = cancel_reason(note, incidents[note.incident_id])
                if reason is None:
                    due.append(note)
                    continue
                self.store.cancel_notification(note.id, now_ms=now_ms, reason=reason)
                log.info("reminder cancelled", extra={"channel": channel, "reason": reason,
                                                      "incident": note.incident_id})
        if not due:
            return len(claimed), 0
        severity = {i: inc.severity for i, inc in incidents.items() if inc is not None}
        due = digest_order(due, severity)
        actions = self._actions(channel, due, incidents, now_ms)
        # as many as the channel takes in one message; the rest go in the next (paced) one
        count = fitting(len(due), lambda n: self._message(channel, due[:n], actions).whole)
        message = self._message(channel, due[:count], actions)
        error: TransportError | None = None
        try:
            # as HTML for email: made once for the message sent, not for each size tried
            self._transports[channel].send(
                message.title, message.body, params=message.params,
                html=html_body(message.body) if channel in self._html else None)
        except TransportError as exc:
            error = exc
        try:
            self._record(due[:count], incidents, error)
        except Exception:  # never sent again while this process runs (a restart may)
            self._unrecorded[channel] = (due[:count], incidents, error)
            raise
        if count < len(due):  # only this channel's sender claims its notifications
            with self._store_lock:
                self.store.release_claimed_notifications(channel)
        return len(claimed), 1

    def _actions(self, channel: str, notes: Sequence[Notification],
                 incidents: Mapping[int, Incident | None], now_ms: int) -> dict[int, list[str]]:
        """The link lines of each notification that takes links, signed for ``channel``."""
        if self.links is None:
            return {}
        return {note.id: link_lines(self.links, incident_id=note.incident_id, channel=channel,
                                    now_ms=now_ms, silence=silenceable(incident))
                for note in notes
                if takes_links(note, incident := incidents.get(note.incident_id))
                and incident is not None}

    def _message(self, channel: str, notes: Sequence[Notification],
                 actions: Mapping[int, Sequence[str]]) -> _Message:
        """One message to ``channel`` carrying ``notes`` with their links (``actions``), and
        whether the channel takes all of it (not: shortened, which only a single notification
        may be; its links and ref kept)."""
        keep = actions.get(notes[0].id, ()) if len(notes) == 1 else ()
        ref = reference(notes)
        limits = self._transports[channel].limits
        if channel in self._templated:
            # a single notification's links go in the tail that survives a cut, not the text
            title, body = combine([replace(n, body=_without_hint(n.body)) if keep else
                                   replace(n, body=with_actions(n, actions.get(n.id, ())))
                                   for n in notes])
            text = template_text(title, body, ref, keep)
            params = {}
            if self.channels[channel].template_link:
                first = next((actions[n.id][0] for n in notes if n.id in actions), None)
                params[f":{TEMPLATE_LINK_PARAMETER}"] = (first.split(": ", 1)[1]
                                                         if first else "-")
            return _Message("", text, template_fits(title, body, ref, keep)
                            and limits.fits("", text), params=params)
        title, body = combine([replace(n, body=with_actions(n, actions.get(n.id, ())))
                               for n in notes])
        title, body = limits.title(title), f"{body}\n\nRef: {ref}"
        whole = limits.fits(title, body)
        if not whole:
            kept = kept_links(keep, ref, room=limits.body_room(title))
            if len(kept) < len(keep):  # the body says so without the links left out
                body = f"{with_actions(notes[0], kept)}\n\nRef: {ref}"
            tail = "".join(f"\n{line}" for line in kept) + f"\n\nRef: {ref}"
            title, body = limits.shorten(title, body, tail=tail)
        return _Message(title, body, whole)

    def _record(self, notes: Sequence[Notification], incidents: Mapping[int, Incident | None],
                error: TransportError | None) -> None:
        """Each notification of a message records the outcome, with the channel's reason."""
        now_ms = clock.now_ms()
        with self._store_lock:
            for note in notes:
                attempts = note.attempts + 1
                final = error is not None and gives_up(
                    attempts=attempts, permanent=error.permanent,
                    critical_open=critical_open(incidents.get(note.incident_id)))
                if error is not None and error.permanent and not final:  # kept, but no quick
                    attempts = max(attempts, MAX_ATTEMPTS)  # retry helps; the self-alert counts it
                self.store.finish_notification(
                    note.id, ok=error is None, now_ms=now_ms,
                    error=None if error is None else str(error), final=final,
                    retry_in_ms=retry_delay_ms(attempts), attempts=attempts)
                context = {"channel": note.channel, "incident": note.incident_id,
                           "notification": note.id, "attempts": attempts}
                if error is None:
                    continue
                if final:
                    log.error("notification failed for good", extra={
                        **context, "error": str(error), "permanent": error.permanent})
                else:
                    log.warning("notification failed; will retry", extra={
                        **context, "error": str(error),
                        "retry_in_ms": retry_delay_ms(attempts)})
