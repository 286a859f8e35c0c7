"""Signed one-tap links: the secret that signs them, and signing and checking them (pure).

A link's token says which incident, which action (acknowledge, resolve, silence), the channel
it was sent to, until when it works and its own random id (each id is spent once, in the
store)::

    1.<incident>.<a|r|s>.<channel>.<expires, unix s>.<link id>.<mac>

``mac`` is HMAC-SHA256 with the link key over everything before it, cut to 128 bits (RFC 2104
allows cutting to half the hash; the link must fit a WhatsApp message three times), base64url.
Every part is URL-safe, so the token goes into a path as it is.

:func:`verify` takes anything a browser sends (huge, non-ASCII, garbage) and answers a
:class:`LinkClaim` or a :class:`Refusal`, never an exception. It says nothing about whether a
link was used already: that is the store's (``spend_link``), in the transaction that acts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from careflow.core.config import Settings, read_secret
from careflow.core.errors import ConfigError

__all__ = [
    "LINK_SECRET_FILE",
    "MAX_TOKEN",
    "LinkAction",
    "LinkClaim",
    "LinkSigner",
    "Refusal",
    "csrf_ok",
    "csrf_token",
    "load_link_key",
    "sign",
    "verify",
]

LINK_SECRET_FILE = "link-secret"  # noqa: S105 (a file name) in the data directory, 0600
MAX_TOKEN = 300  # longer is not a link careflow made: refused before any work
_MIN_SECRET = 32
_VERSION = "1"
_MAC_BYTES = 16
_ID_BYTES = 12
_CHANNEL = re.compile(r"[a-z0-9_-]{1,64}")
_LINK_ID = re.compile(r"[A-Za-z0-9_-]{16}")
_DIGITS = re.compile(r"[1-9][0-9]{0,15}")
_MAC_TEXT = re.compile(r"[A-Za-z0-9_-]{22}")


class LinkAction(StrEnum):
    """What a link does to its incident (silence: its rule for its source, for 2 hours)."""

    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    SILENCE = "silence"


_CODE = {LinkAction.ACKNOWLEDGE: "a", LinkAction.RESOLVE: "r", LinkAction.SILENCE: "s"}
_ACTION = {code: action for action, code in _CODE.items()}


class Refusal(StrEnum):
    """Why a token is not a link to act on."""

    MALFORMED = "malformed"  # not shaped like a link careflow makes (cut short, garbage)
    FORGED = "forged"  # shaped like one, but not signed with this hub's key (or changed)
    EXPIRED = "expired"  # signed, and too old


@dataclass(frozen=True, slots=True)
class LinkClaim:
    """What a genuine, unexpired link says."""

    incident_id: int
    action: LinkAction
    channel: str
    expires_ms: int
    link_id: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _mac(key: bytes, message: bytes, purpose: bytes = b"link") -> bytes:
    return hmac.new(key, purpose + b"\0" + message, hashlib.sha256).digest()[:_MAC_BYTES]


def sign(key: bytes, *, incident_id: int, action: LinkAction, channel: str, expires_ms: int,
         link_id: str) -> str:
    """The token of one link (``expires_ms`` is kept in whole seconds, rounded down).

    Raises:
        ValueError: a part that cannot go in a link (careflow's channel names always can).
    """
    if incident_id < 1 or not _CHANNEL.fullmatch(channel) or not _LINK_ID.fullmatch(link_id):
        msg = f"cannot sign a link for incident {incident_id!r}, channel {channel!r}"
        raise ValueError(msg)
    body = ".".join((_VERSION, str(incident_id), _CODE[action], channel,
                     str(expires_ms // 1000), link_id))
    return f"{body}.{_b64(_mac(key, body.encode('ascii')))}"


def verify(key: bytes, token: str, *, now_ms: int) -> LinkClaim | Refusal:
    """What ``token`` grants at ``now_ms``, or why it grants nothing; never raises.

    A link is good until its expiry second has begun (``now_ms < expires_ms``)."""
    body = _signed_body(key, token)
    if isinstance(body, Refusal):
        return body
    parts = body.split(".")
    if len(parts) != 6 or parts[0] != _VERSION:  # signed by us, so only a future format
        return Refusal.MALFORMED
    _version, incident, code, channel, expires, link_id = parts
    if (not _DIGITS.fullmatch(incident) or code not in _ACTION or not _CHANNEL.fullmatch(channel)
            or not _DIGITS.fullmatch(expires) or not _LINK_ID.fullmatch(link_id)):
        return Refusal.MALFORMED
    expires_ms = int(expires) * 1000
    if now_ms >= expires_ms:
        return Refusal.EXPIRED
    return LinkClaim(int(incident), _ACTION[code], channel, expires_ms, link_id)


def _signed_body(key: bytes, token: str) -> str | Refusal:
    """The part of ``token`` before its MAC, when the MAC is this key's (constant time)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or not token.isascii():
        return Refusal.MALFORMED
    body, dot, mac_text = token.rpartition(".")
    if not dot or not _MAC_TEXT.fullmatch(mac_text):
        return Refusal.MALFORMED
    given = base64.urlsafe_b64decode(mac_text + "==")  # cannot fail: 22 base64url characters
    # only the canonical spelling of a MAC (its unused low bits zero) is accepted, so no two
    # tokens carry one signature
    if _b64(given) != mac_text or not hmac.compare_digest(_mac(key, body.encode("ascii")),
                                                          given):
        return Refusal.FORGED
    return body


def csrf_token(key: bytes, token: str) -> str:
    """The form field a link's page carries: only a page the hub rendered for this link can
    post it (a cross-site form, or a request built from the link alone, cannot)."""
    return _b64(_mac(key, token.encode("utf-8", "replace"), purpose=b"csrf"))


def csrf_ok(key: bytes, token: str, given: str) -> bool:
    """Whether ``given`` is the CSRF field of this link's page (constant time; never raises)."""
    if not isinstance(given, str) or not given.isascii() or len(given) > 64:
        return False
    return hmac.compare_digest(csrf_token(key, token).encode("ascii"), given.encode("ascii"))


class LinkSigner:
    """Makes the links a message carries: each one signed for its channel, with a new id, good
    for ``ttl_s`` from when the message is built, under ``base_url`` (no trailing slash)."""

    def __init__(self, key: bytes, base_url: str, *, ttl_s: int, reachable: bool = True) -> None:
        self.key = key
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        # False: the links point where phones cannot go (no CAREFLOW_PUBLIC_URL, the web on
        # loopback or a wildcard address); messages then keep the way to acknowledge on the hub
        self.reachable = reachable

    def url(self, *, incident_id: int, action: str, channel: str, now_ms: int) -> str:
        """A fresh link: ``action`` on ``incident_id``, sent to ``channel``."""
        token = sign(self.key, incident_id=incident_id, action=LinkAction(action),
                     channel=channel, expires_ms=now_ms + self.ttl_s * 1000,
                     link_id=_b64(secrets.token_bytes(_ID_BYTES)))
        return f"{self.base_url}/l/{token}"


def load_link_key(settings: Settings, env: dict[str, str] | None = None) -> bytes:
    """The key that signs links: CAREFLOW_LINK_SECRET (or the file CAREFLOW_LINK_SECRET_FILE
    names), else one generated into the data directory (0600) and kept there, so links sent
    before a restart still work after it."""
    environ = dict(os.environ) if env is None else env
    given = read_secret(environ, "CAREFLOW_LINK_SECRET")
    if given is not None:
        given = given.strip()
        if len(given) < _MIN_SECRET:
            msg = (f"CAREFLOW_LINK_SECRET must be at least {_MIN_SECRET} characters (e.g. the "
                   "output of `openssl rand -hex 32`)")
            raise ConfigError(msg)
        return given.encode()
    path = Path(settings.data_dir) / LINK_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < _MIN_SECRET:
            msg = (f"{path} holds no usable link secret: delete it (a new one is made; "
                   "links already sent stop working) or set CAREFLOW_LINK_SECRET")
            raise ConfigError(msg) from None
        return key.encode()
    with os.fdopen(fd, "w") as out:
        key = secrets.token_hex(32)
        out.write(key + "\n")
    return key.encode()
