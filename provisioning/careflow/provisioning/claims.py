"""Pure decisions of the claim flow: registration, claims, renewals, rate limits, rotation timing.

Nothing here does I/O or reads the clock; the MQTT adapter (``service.py``) and the CLI pass
``now_ms`` in, so every rule is tested fast and exactly (alertmanager's ``needsUpdate`` shape).

States of one serial::

    registered ──claim──▶ claimed ──sign──▶ issued ──first heartbeat──▶ active
        ▲                                      │                          │
        └──────── register --replace ──────────┴──────────────────────────┘ (old cert → revoked)
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "CLAIM_RATE_LIMIT",
    "CLAIM_RATE_WINDOW_MS",
    "ID_PATTERN",
    "ClaimRecord",
    "Proceed",
    "Refusal",
    "RefusalLog",
    "Registration",
    "Reject",
    "State",
    "check_id",
    "decide_claim",
    "decide_registration",
    "decide_renewal",
    "expiring",
    "gateway_id_for",
    "hash_token",
    "new_token",
    "rate_limit",
    "renew_at_ms",
    "tokens_match",
]

# The contract's id pattern (schemas/event.json): gateway ids are also MQTT topic levels.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
CLAIM_RATE_LIMIT = 5
CLAIM_RATE_WINDOW_MS = 10 * 60 * 1000
RENEW_FRACTION = 2 / 3  # renew at two thirds of the lifetime: a week of retries for 30 days


class State(StrEnum):
    """Where one serial is in its onboarding."""

    REGISTERED = "registered"  # a claim token exists; no identity yet
    CLAIMED = "claimed"        # the token is spent and bound to one key; signing under way
    ISSUED = "issued"          # a certificate exists; not yet heard from under it
    ACTIVE = "active"          # its first heartbeat under its own identity is stored
    REVOKED = "revoked"        # the identity is withdrawn


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRecord:
    """One serial in the provisioning registry."""

    serial: str
    site: str
    gateway_id: str
    state: State
    token_hash: str | None
    token_expires_ms: int | None
    key_fingerprint: str | None = None
    cert_serial: str | None = None
    cert_not_after_ms: int | None = None
    cert_pem: str | None = None
    registered_ms: int
    claimed_ms: int | None = None
    issued_ms: int | None = None
    connected_ms: int | None = None
    active_ms: int | None = None
    renewed_ms: int | None = None
    revoked_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """A refusal with a stable code (for scripts and counters) and a message for people."""

    code: str
    message: str
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class Proceed:
    """Go on. ``replay`` is set when this exact claim was already answered: send it again."""

    replay: bool = False


@dataclass(frozen=True, slots=True)
class Registration:
    """What ``register`` does: write a fresh token, and maybe withdraw an identity first."""

    revoke_cert_serial: str | None = None


def new_token() -> str:
    """A one-time claim token: 192 random bits, URL- and shell-safe."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    """sha256 of the token: only this is stored, so a copy of the database claims nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(token: str, token_hash: str | None) -> bool:
    """Constant-time comparison, so the answer time says nothing about the stored hash."""
    return token_hash is not None and hmac.compare_digest(hash_token(token), token_hash)


def gateway_id_for(serial: str) -> str:
    """``gw-<serial lowercased>``, with anything a topic level or the id pattern forbids as ``-``.

    Deterministic, so re-registering one serial can never mint a second identity by accident.
    """
    cleaned = re.sub(r"[^a-z0-9_.-]", "-", serial.strip().lower()).strip("-.") or "unnamed"
    return f"gw-{cleaned}"[:64]


def check_id(value: str, what: str) -> str | None:
    """None if ``value`` fits the contract's id pattern, else what is wrong with it."""
    if ID_PATTERN.match(value):
        return None
    return (f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit")


def rate_limit(attempts_ms: Sequence[int], now_ms: int, *, limit: int = CLAIM_RATE_LIMIT,
               window_ms: int = CLAIM_RATE_WINDOW_MS) -> int | None:
    """Seconds to wait before another attempt is allowed, or None to allow it now.

    ``attempts_ms`` are the earlier attempts that were allowed (the caller keeps only the last
    ``limit``: no more matter). An attempt is allowed while fewer than ``limit`` of them lie in
    the window ending now; otherwise the wait is until the oldest of the newest ``limit`` leaves
    the window (rounded up, at least 1 s). Nothing is sorted: the cost stays O(n log limit).
    """
    recent = [t for t in attempts_ms if now_ms - window_ms < t <= now_ms]
    if len(recent) < limit:
        return None
    oldest_that_matters = min(heapq.nlargest(limit, recent))
    wait_ms = oldest_that_matters + window_ms - now_ms
    return max(1, -(-wait_ms // 1000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Refused requests of one (source, serial, code): how many, first and last."""

    source: str  # the client id (claims) or gateway id (renewals) of the topic
    serial: str  # the serial the request named; "" when it named none
    code: str
    first_ms: int
    last_ms: int
    count: int


class RefusalLog:
    """Refused requests folded in memory by (source, serial, code) until they are taken.

    A flood of refusals costs one dict update each, and the store one transaction per flush,
    not one per refusal. Bounded: beyond ``max_keys`` distinct keys, new ones are folded into
    ``("*", "*", code)``, so the counts stay true while the names are lost.
    """

    OVERFLOW = "*"
    SOURCE_CHARS = 128  # a topic level can be 64 KiB; the name is for people, the start suffices

    def __init__(self, *, max_keys: int) -> None:
        self.max_keys = max_keys
        self._pending: dict[tuple[str, str, str], list[int]] = {}  # key -> [first, last, count]

    def __len__(self) -> int:
        return len(self._pending)

    def note(self, *, source: str, serial: str, code: str, now_ms: int) -> bool:
        """Count one refusal; True when it is the first of its key since the last take."""
        return self._fold((source[:self.SOURCE_CHARS], serial, code), now_ms, now_ms, 1)

    def restore(self, refusals: Sequence[Refusal]) -> None:
        """Fold back what a failed flush took, so the next flush writes it (still bounded)."""
        for refusal in refusals:
            self._fold((refusal.source, refusal.serial, refusal.code), refusal.first_ms,
                       refusal.last_ms, refusal.count)

    def _fold(self, key: tuple[str, str, str], first_ms: int, last_ms: int, count: int) -> bool:
        """Add a tally under ``key`` (or the overflow key when full); True if the key is new."""
        tally = self._pending.get(key)
        if tally is None and len(self._pending) >= self.max_keys:
            key = (self.OVERFLOW, self.OVERFLOW, key[2])
            tally = self._pending.get(key)
        if tally is None:
            self._pending[key] = [first_ms, last_ms, count]
            return True
        tally[0] = min(tally[0], first_ms)
        tally[1] = max(tally[1], last_ms)
        tally[2] += count
        return False

    def take(self) -> list[Refusal]:
        """Everything counted since the last take (and forget it)."""
        pending, self._pending = self._pending, {}
        return [Refusal(source=source, serial=serial, code=code, first_ms=first, last_ms=last,
                        count=count)
                for (source, serial, code), (first, last, count) in pending.items()]


def decide_registration(existing: ClaimRecord | None, *, serial: str, site: str,
                        gateway_id: str, gateway_owner: str | None,
                        replace: bool) -> Registration | Reject:
    """May ``serial`` get a (new) claim token for ``gateway_id``?

    ``gateway_owner`` is the serial that holds ``gateway_id`` today, if any. One serial never
    holds two identities: once a certificate exists, only ``replace`` goes on, and the old
    certificate is named for revocation.
    """
    for value, what in ((serial, "serial"), (gateway_id, "gateway id")):
        problem = check_id(value, what)
        if problem:
            return Reject("invalid", problem)
    if not site.strip():
        return Reject("invalid", "the site must not be empty")
    if gateway_owner is not None and gateway_owner != serial:
        return Reject("gateway_taken", f"gateway id {gateway_id} belongs to serial "
                      f"{gateway_owner}; choose another with --gateway-id")
    if existing is None or existing.state in (State.REGISTERED, State.REVOKED):
        return Registration()
    if not replace:
        return Reject("already_provisioned", (
            f"serial {serial} is {existing.state} as {existing.gateway_id}; registering it "
            "again would create a second identity. If the device was replaced or reset, run "
            "again with --replace: the old certificate is revoked."))
    return Registration(revoke_cert_serial=existing.cert_serial)


def decide_claim(record: ClaimRecord | None, *, serial: str, token: str,  # noqa: PLR0911
                 key_fingerprint: str, now_ms: int) -> Proceed | Reject:
    """May this claim (serial, token, the CSR's public key) go on to signing?

    The token is checked before the state, so someone without it learns nothing about a
    serial but that it exists. A claim repeated with the same token and the same key (its
    answer was lost) is replayed, not refused: the device already holds that key.
    """
    if record is None:
        return Reject("unknown_serial", f"serial {serial} is not registered; run `careflow "
                      f"provision register --serial {serial} --site ...` on the hub first")
    if not tokens_match(token, record.token_hash):
        return Reject("token_invalid", "the claim token does not match this serial; check "
                      "for a typo, or register again for a new token")
    if record.state in (State.CLAIMED, State.ISSUED):
        if record.key_fingerprint == key_fingerprint:
            return Proceed(replay=True)
        return Reject("token_used", "this claim token was already used by another key; "
                      "register again with --replace if the device was reset")
    if record.state is State.ACTIVE:
        return Reject("already_active", f"serial {serial} is already active as "
                      f"{record.gateway_id}; register again with --replace to re-provision")
    if record.state is State.REVOKED:
        return Reject("revoked", f"serial {serial} was revoked; register it again")
    if record.token_expires_ms is None or now_ms >= record.token_expires_ms:
        return Reject("token_expired", "the claim token has expired; run `careflow provision "
                      f"register --serial {serial} ...` again for a new one")
    return Proceed()


def decide_renewal(record: ClaimRecord | None, *, gateway_id: str,
                   revoked: bool = False) -> Proceed | Reject:
    """May the gateway that the broker authenticated as ``gateway_id`` renew its certificate?

    Never once revoked: a stolen gateway must not mint itself a certificate that is not on the
    CRL (only a new registration with a new token brings the id back).
    """
    if revoked:
        return Reject("revoked", f"gateway {gateway_id} has been revoked; register it again "
                      "(careflow provision register --replace) to bring it back")
    if record is None:
        return Reject("unknown_gateway", f"gateway {gateway_id} was not provisioned by claim")
    if record.state not in (State.ISSUED, State.ACTIVE):
        return Reject("not_renewable", f"gateway {gateway_id} is {record.state}; only an "
                      "issued or active identity renews")
    return Proceed()


def renew_at_ms(not_before_ms: int, not_after_ms: int, *,
                fraction: float = RENEW_FRACTION) -> int:
    """When a certificate valid from ``not_before_ms`` to ``not_after_ms`` is due for renewal."""
    return not_before_ms + int((not_after_ms - not_before_ms) * fraction)


def expiring(records: Sequence[ClaimRecord], *, now_ms: int,
             within_ms: int) -> list[ClaimRecord]:
    """Issued or active identities whose certificate ends within ``within_ms`` (or has ended)."""
    return [r for r in records
            if r.state in (State.ISSUED, State.ACTIVE) and r.cert_not_after_ms is not None
            and r.cert_not_after_ms - now_ms <= within_ms]
