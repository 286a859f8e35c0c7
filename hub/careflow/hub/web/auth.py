"""Who is looking at the console, and what they may do.

Two ways in, never both on one hub:

* **Local users** (``careflow users add``): Argon2id password hashes (rehashed at login when
  careflow's parameters have grown), a session per login kept by the SHA-256 of its cookie
  (a copy of the database holds no usable cookie), ending after :data:`SESSION_TTL_MS`, and a
  login rate limit per user name and client address (:class:`LoginLimiter`).
* **A trusted reverse proxy** (``CAREFLOW_AUTH_HEADER``, for sites with single sign-on): the
  proxy authenticates and names the user in that header; the user must exist in the users table,
  which gives the role. The header is believed as it comes, so the hub must then listen only
  where the proxy alone reaches it (``CAREFLOW_HTTP_LISTEN=127.0.0.1:8080`` behind a proxy on the
  same machine), and the proxy must set the header itself, replacing any a client sent.

Every POST carries a CSRF token (the session's, or before login a random one in a cookie that
the login form repeats), compared in constant time. Cookies are HttpOnly, SameSite=Lax, and
Secure behind HTTPS. A viewer reads; an operator may also acknowledge and resolve.

The decisions (hashes, tokens, the limiter) are pure and take ``now``; the console module is
the adapter that reads requests and the store.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from careflow.core.config import Settings
from careflow.hub.store.records import Role, User

__all__ = [
    "CSRF_FIELD",
    "DUMMY_HASH",
    "LOGIN_COOKIE",
    "MIN_PASSWORD_LENGTH",
    "NO_PASSWORD",
    "SESSION_COOKIE",
    "SESSION_TTL_MS",
    "LoginLimiter",
    "Principal",
    "check_password",
    "client_network",
    "cookie_flags",
    "csrf_matches",
    "hash_password",
    "header_csrf",
    "new_token",
    "token_hash",
    "valid_user_name",
]

SESSION_COOKIE = "careflow_session"
LOGIN_COOKIE = "careflow_login"  # the login form's CSRF token, before there is a session
CSRF_FIELD = "csrf"
SESSION_TTL_MS = 12 * 3600 * 1000  # a shift and a half, then log in again
LOGIN_COOKIE_TTL_S = 3600
MIN_PASSWORD_LENGTH = 10
# A user who signs in only through the proxy (``users add --sso``): no Argon2 hash matches it.
NO_PASSWORD = "!sso"  # noqa: S105 (a marker, not a password)
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

_hasher = PasswordHasher()  # argon2id, the library's current (RFC 9106 low-memory) parameters
# Verified against for unknown users, so that their login costs what a real one does (from the
# first: no hash is made on first use). Made once, of a random password nobody kept, with the
# parameters _hasher uses (a test checks they still agree).
DUMMY_HASH = ("$argon2id$v=19$m=65536,t=3,p=4$jgoDXGSLWAHzc3JqUUZaoQ$"
              "BxcVxBKAz4LdYZ/Gaumj8u2jocaVsH3VYQVf9zvMhFc")


def valid_user_name(name: str) -> bool:
    """Letters, digits and ``._@+-`` (an e-mail address works, for SSO), at most 64."""
    return _USER_NAME.fullmatch(name) is not None


def hash_password(password: str) -> str:
    """The Argon2id hash to keep (never the password)."""
    return _hasher.hash(password)


def check_password(user: User | None, password: str) -> tuple[bool, str | None]:
    """Whether ``password`` is ``user``'s, and a new hash to keep when the stored one was made
    with weaker parameters than today's (None: keep it).

    Costs one Argon2 verification whatever happens, also for an unknown user (a dummy hash) or
    one without a password, so a login's time says nothing about which names exist.
    """
    stored = user.password_hash if user is not None else None
    if stored is None or not stored.startswith("$argon2"):
        stored, user = DUMMY_HASH, None
    try:
        _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, None
    if user is None:
        return False, None
    return True, hash_password(password) if _hasher.check_needs_rehash(stored) else None


def new_token() -> str:
    """A session cookie or CSRF token: 256 random bits."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a session cookie."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_matches(expected: str | None, given: str | None) -> bool:
    """A form's CSRF token against the expected one, in constant time; nothing never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def header_csrf(key: bytes, user: str) -> str:
    """The CSRF token of a user signed in by the proxy (no session of ours to keep one in):
    bound to the user and the hub's secret, so another site cannot know it."""
    return hmac.new(key, f"console-csrf\n{user}".encode(), hashlib.sha256).hexdigest()


def cookie_flags(settings: Settings, scheme: str) -> dict[str, bool | str]:
    """HttpOnly, SameSite=Lax, and Secure when people reach the hub over HTTPS (the public URL
    says so, or the request came in over it)."""
    secure = scheme == "https" or (settings.public_url or "").startswith("https://")
    return {"httponly": True, "samesite": "lax", "secure": secure}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request, with what role, and the CSRF token their forms must carry."""

    user: str
    role: Role
    csrf: str
    via: Literal["session", "header"]

    @property
    def may_act(self) -> bool:
        """Operators acknowledge and resolve; viewers only read."""
        return self.role is Role.OPERATOR


def client_network(address: str) -> str:
    """Who is trying, as the limiter counts them: an IPv4 address, or an IPv6 address's /64.

    One IPv6 subscriber holds a whole /64 (2**64 addresses, each free to use), so counting by
    address would give them as many tries as they care to make; an IPv4-mapped address is its
    IPv4 address. Anything else (no address) is kept as it comes, cut short."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def _key(user: str, address: str) -> tuple[str, str]:
    """What the limiter remembers of a pair: bounded in size (a valid name is at most 64)."""
    return user[:80].lower(), client_network(address)


@dataclass(slots=True)
class LoginLimiter:
    """Failed logins per (user name, client address or IPv6 /64): after ``max_failures`` inside
    ``window_ms``, that pair is refused until the oldest of them leaves the window.

    Bounded: at most ``max_keys`` pairs are remembered (the least recently failed are
    forgotten first), and at most ``max_failures`` times per pair. Pure apart from its memory:
    every call is told the time.
    """

    max_failures: int = 5
    window_ms: int = 15 * 60 * 1000
    max_keys: int = 10_000
    _failures: OrderedDict[tuple[str, str], deque[int]] = field(default_factory=OrderedDict)

    def retry_at(self, user: str, address: str, *, now_ms: int) -> int | None:
        """When this pair may try again, or None when it may now."""
        key = _key(user, address)
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now_ms - self.window_ms:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times[0] + self.window_ms if len(times) >= self.max_failures else None

    def failed(self, user: str, address: str, *, now_ms: int) -> None:
        """Count a failed login."""
        key = _key(user, address)
        times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
        times.append(now_ms)
        self._failures[key] = times  # now the most recent
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, user: str, address: str) -> None:
        """A good login forgets the pair's failures."""
        self._failures.pop(_key(user, address), None)

    def __len__(self) -> int:
        return len(self._failures)
