"""The Apprise adapter: one message through one channel, and the channel's own reason when it fails.

Apprise answers ``notify()`` with a bool; why it failed (the HTTP status, the SMTP reply) only
goes to its logger. ``AppriseTransport.send`` collects what Apprise logs on the sending thread
during the call and turns it into a :class:`TransportError` that says why and whether trying
again can help (``failure_from_log``, pure). A logger filter does the collecting, so several
channel threads can send at once without reading each other's lines, and Apprise's own log output
reaches the application's handlers exactly as before.

Size: a channel takes messages up to a length (Discord 2,000 characters with the title, WhatsApp
1,024, Telegram 4,096; Apprise's plugins say so in ``body_maxlen``/``title_maxlen``), and Apprise
hands a longer one on as it is, for the service to refuse. ``AppriseTransport.limits`` says how
long a message may be, so the sender splits a digest into messages that fit.

Pacing: Apprise sleeps before a send when the previous one through the same plugin was less than
``request_rate_per_sec`` ago (5.5 s for plugins that set no rate of their own, e.g. email), so a
burst of alarms queues behind one sleep after another. careflow paces each channel itself instead:
at most one message per ``pace_s`` (at most ``MAX_PACE_S``), and everything that came due
meanwhile goes in the next message as one digest.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import apprise

from careflow.core.errors import TransportError

__all__ = ["MAX_PACE_S", "AppriseTransport", "MessageLimits", "failure_from_log", "redact"]

MAX_PACE_S = 1.0
_DEFAULT_BODY_MAX = 32_768  # Apprise's own default for a plugin
_DEFAULT_TITLE_MAX = 250
_MAX_REASON = 600
# what one send keeps of Apprise's lines: a receiver may answer with megabytes, and some plugins
# log the whole answer; the start says why, and the margin lets a secret cut at the end of a
# kept line be redacted whole before the line is cut to _MAX_LINE
_MAX_LINES = 50
_MAX_LINE = 2_000
_CAPTURED_LINE = 8 * _MAX_LINE
# an SMTP reply as smtplib reports it: (550, b'5.1.1 <x@y>: unknown') or "refused: 550 b'...'"
_SMTP_REPLY = re.compile(r"\(([245]\d\d), b?['\"]([^'\"]*)['\"]|refused: ([245]\d\d) b?['\"]?"
                         r"([^'\"]*)")
_HTTP_STATUS = re.compile(r"error=(\d{3})\b")
_RETRYABLE_HTTP = {408, 425, 429}
# no status code, but a setting that no retry can fix
_PERMANENT_MARKERS = ("AUTH extension not supported", "Authentication failed")
_ADDRESS_KEYS = {"to", "from", "cc", "bcc", "reply", "name", "smtp", "lang", "template"}
_HOSTNAME = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """How long a message one channel takes, in characters: ``body_max`` for the body (and
    the title with it when ``title_in_body``: Discord counts both, and channels without titles
    of their own, ``title_max`` 0, put the title in the body)."""

    body_max: int = _DEFAULT_BODY_MAX
    title_max: int = _DEFAULT_TITLE_MAX
    title_in_body: bool = False

    def title(self, title: str) -> str:
        """The title cut to what the channel takes (a digest's title only summarises it)."""
        if self.title_in_body or self.title_max == 0:
            return title[:self.body_max // 4]
        return title[:self.title_max]

    def fits(self, title: str, body: str) -> bool:
        """Whether the channel takes this title and body whole."""
        if self.title_in_body or self.title_max == 0:
            return len(body) + (len(title) + 2 if title else 0) <= self.body_max
        return len(title) <= self.title_max and len(body) <= self.body_max

    def body_room(self, title: str) -> int:
        """How long the body may be with this (already cut) title."""
        return self.body_max - (len(title) + 2 if title and (
            self.title_in_body or self.title_max == 0) else 0)

    def shorten(self, title: str, body: str, *, tail: str) -> tuple[str, str]:
        """Title and body cut to fit, the body keeping ``tail`` (the ref) at its end: for one
        notification longer than the channel takes (its start says what and where)."""
        title = self.title(title)
        room = self.body_room(title)
        head = body[:len(body) - len(tail)] if body.endswith(tail) else body
        return title, head[:max(0, room - len(tail) - 1)] + "\u2026" + tail


def failure_from_log(lines: Sequence[str], *, secrets: Sequence[str] = ()) -> TransportError:
    """Why a send failed, from what Apprise logged during it, and whether it is permanent.

    SMTP 5xx replies (bad credentials, unknown recipient, refused sender) and HTTP 4xx answers
    (400, 401, 403, 404, ...) are permanent; SMTP 4xx, HTTP 5xx, 408, 429, timeouts and refused
    connections are not. Nothing recognisable: not permanent (a later attempt may tell more).
    """
    lines = [redact(line, secrets)[:_MAX_LINE] for line in lines]
    text = "\n".join(lines)
    permanent = False
    reply = _SMTP_REPLY.search(text)
    status = _HTTP_STATUS.search(text)
    if reply is not None:
        code = int(reply[1] or reply[3])
        detail = (reply[2] or reply[4] or "").strip()
        reason = f"SMTP {code} {detail}".strip()
        permanent = code >= 500
    elif status is not None:
        code = int(status[1])
        reason = f"HTTP {code}"
        permanent = 400 <= code < 500 and code not in _RETRYABLE_HTTP
    else:
        reason = "the channel did not take the message"
        permanent = any(marker in text for marker in _PERMANENT_MARKERS)
    told = [" ".join(line.split()) for line in dict.fromkeys(lines) if line.strip()]
    if told:
        reason += ": " + " | ".join(told)
    return TransportError(redact(reason, secrets)[:_MAX_REASON], permanent=permanent)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any of ``secrets`` (tokens and passwords of a channel URL)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def url_secrets(url: str) -> list[str]:
    """The parts of an Apprise URL that may be credentials: every piece of six characters or
    more that is not a host name (webhook tokens often sit in the host or path) nor an address
    the message goes to or comes from (those say which recipient a server refused)."""
    rest = url.split("://", 1)[-1]
    where, _, query = rest.partition("?")
    pieces = re.split(r"[/:@#]", where)
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key.lower() not in _ADDRESS_KEYS:
            pieces += re.split(r"[/:@#,]", value)
    # a server's answer shows them decoded ("Bearer%20t0ken" is "Bearer t0ken", each word)
    for piece in list(pieces):
        decoded = urllib.parse.unquote_plus(piece)
        pieces += [decoded, *decoded.split()]
    return list(dict.fromkeys(p for p in pieces if len(p) >= 6 and not _HOSTNAME.match(p.lower())))


class _ThreadLog(logging.Filter):
    """On the ``apprise`` logger: keeps each record for the send in progress in this context,
    and lets through only what the logger would have let through before careflow lowered its
    level to see Apprise's debug lines (where it puts SMTP replies)."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__()
        self.logger = logger
        self.level = level  # the apprise logger's own level before (NOTSET: its parent's)
        # a context variable, not a thread-local: Apprise may run the plugin on a pool thread,
        # and it hands the caller's context over to it
        self.lines: ContextVar[list[str] | None] = ContextVar("apprise_lines", default=None)

    def filter(self, record: logging.LogRecord) -> bool:
        lines = self.lines.get()
        if lines is not None and len(lines) < _MAX_LINES and _explains_a_failure(record):
            lines.append(record.getMessage()[:_CAPTURED_LINE])
        threshold = self.level
        if threshold == logging.NOTSET and self.logger.parent is not None:
            threshold = self.logger.parent.getEffectiveLevel()
        return record.levelno >= threshold

    def start(self) -> None:
        self.lines.set([])

    def stop(self) -> list[str]:
        lines = self.lines.get() or []
        self.lines.set(None)
        return lines


def _explains_a_failure(record: logging.LogRecord) -> bool:
    """Apprise's warnings, and the debug lines where it puts the server's answer (not its
    payload dumps and progress notes)."""
    if record.levelno >= logging.WARNING:
        return True
    return record.levelno >= logging.DEBUG and str(record.msg).startswith(
        ("Socket Exception", "Response Details"))


_install_lock = threading.Lock()
_thread_log: _ThreadLog | None = None


def _capture() -> _ThreadLog:
    """The one filter on the ``apprise`` logger (installed on first use)."""
    global _thread_log  # noqa: PLW0603 - one filter per process, installed once
    with _install_lock:
        if _thread_log is None:
            logger = logging.getLogger("apprise")
            _thread_log = _ThreadLog(logger, logger.level)
            logger.addFilter(_thread_log)
            logger.setLevel(logging.DEBUG)
        return _thread_log


class AppriseTransport:
    """One channel's Apprise client; used by one thread at a time (its channel's worker)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.client = apprise.Apprise()
        self.client.add(url)
        self._secrets = url_secrets(url)
        plugins = list(self.client)
        own = max((float(p.request_rate_per_sec) for p in plugins), default=0.0)
        self.pace_s = min(own, MAX_PACE_S)
        self.limits = MessageLimits(
            body_max=min((int(p.body_maxlen) for p in plugins if int(p.body_maxlen) > 0),
                         default=_DEFAULT_BODY_MAX),
            title_max=min((int(p.title_maxlen) for p in plugins), default=_DEFAULT_TITLE_MAX),
            title_in_body=any(bool(p.overflow_amalgamate_title) for p in plugins))
        for plugin in plugins:  # careflow paces the channel itself (module docstring)
            plugin.request_rate_per_sec = self.pace_s
        self._log = _capture()

    def send(self, title: str, body: str, *, html: str | None = None,
             params: Mapping[str, str] | None = None) -> None:
        """Deliver one message or raise :class:`TransportError` with the channel's reason.

        ``html``: the same message as HTML, sent instead of ``body`` (email: Apprise adds a
        plain-text alternative made from it). ``params``: added to the channel's Apprise URL
        for this message only (a WhatsApp template's link parameter, ``:2=URL``).
        """
        client = self.client
        if params:
            client = apprise.Apprise()
            client.add(f"{self._url}{'&' if '?' in self._url else '?'}"
                       f"{urllib.parse.urlencode(dict(params))}")
            for plugin in client:
                plugin.request_rate_per_sec = self.pace_s
        self._log.start()
        try:
            # careflow's messages are plain text unless given as HTML: said so, so that Apprise
            # neither runs the lines together nor reads markup into them
            ok = bool(client.notify(
                title=title, body=body if html is None else html,
                body_format=apprise.NotifyFormat.TEXT if html is None
                else apprise.NotifyFormat.HTML))
        except Exception as exc:  # a plugin bug must not end the channel's thread
            self._log.stop()
            msg = redact(f"Apprise failed: {type(exc).__name__}: {exc}", self._secrets)
            raise TransportError(msg[:_MAX_REASON], permanent=False) from exc
        lines = self._log.stop()
        if not ok:
            raise failure_from_log(lines, secrets=self._secrets)
