"""The operations agent's audit trail, pure: what goes into a row (secrets masked) and whether
the stored chain holds (`careflow agent log --verify`).

The chain itself (each row's hash covers its content and the hash before it) is built by the
store inside the append's transaction (:mod:`careflow.hub.store.audit_chain`); this module masks
what must never be written there and names the first row that breaks the chain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from careflow.hub.store.audit_chain import first_broken
from careflow.hub.store.records import AuditEntry

__all__ = ["MASK", "AuditEvent", "chain_problem", "mask_secrets", "mask_text"]

MASK = "***"

# A key whose name has one of these words holds a secret (broker_password, api_key, token...).
_SECRET_WORDS = frozenset({"password", "passwd", "pass", "secret", "token", "key", "apikey",
                           "credential", "credentials", "authorization", "auth", "cookie",
                           "session", "signature", "sig"})
_WORD = re.compile(r"[a-z0-9]+")
# user:password@ in a URL (an Apprise channel, a broker URL)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@",
                       re.IGNORECASE)
# ?token=... or &key=... in a URL's query
_QUERY = re.compile(r"(?P<name>[?&](?:[a-z_]*(?:token|key|password|secret|sig|signature)))="
                    r"[^&#\s]+", re.IGNORECASE)
# Apprise URLs carry their secret in the path: a webhook id/token, a bot token
_PATH_TOKEN = re.compile(r"(?P<scheme>\b(?:json|jsons|xml|xmls|form|forms|tgram|discord|slack|"
                         r"msteams|pover|ntfys?|gotify|gotifys|matrixs?|mailtos?)://)[^\s]+",
                         re.IGNORECASE)


class AuditEvent:
    """The words an audit row's ``event`` is spelled with, once."""

    PROPOSED = "proposed"
    DIAGNOSED = "diagnosed"  # evidence only (a care alarm): no action proposed
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"  # claimed: the action runs now
    RESULT = "result"  # what it returned
    VERIFIED = "verified"
    FAILED = "failed"
    ESCALATED = "escalated"
    REFUSED = "refused"
    MODE = "mode"


def _secret_key(key: str) -> bool:
    return any(word in _SECRET_WORDS for word in _WORD.findall(key.lower()))


def mask_text(text: str) -> str:
    """``text`` with the secrets a URL can carry replaced by ``***``: a password in
    ``user:password@``, a token in the query, and the whole address of a notification service
    whose path is its secret (a webhook)."""
    text = _PATH_TOKEN.sub(lambda m: f"{m['scheme']}{MASK}", text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}", text)


def mask_secrets(value: Any) -> Any:  # noqa: ANN401 - any JSON value
    """A JSON value with secrets masked: every value under a key that names a secret
    (``password``, ``token``, ``api_key``...), and secrets inside strings (:func:`mask_text`).
    Applied to every audit row's detail before it is written: the trail is read by more
    people than the secrets are."""
    if isinstance(value, Mapping):
        return {str(k): MASK if _secret_key(str(k)) and v not in (None, "") else mask_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def chain_problem(entries: Sequence[AuditEntry]) -> tuple[AuditEntry, str] | None:
    """The first row that breaks the audit chain and why, or None when it holds."""
    broken = first_broken(entries)
    if broken is None:
        return None
    entry, why = broken
    assert entry is not None
    return entry, why
