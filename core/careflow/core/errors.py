"""careflow's own errors: adapters translate library errors into these, ``raise ... from exc``.

The tree::

    CareflowError                 root; the CLI prints its message and exits non-zero (which
    │                             status each means: careflow.core.exits)
    ├── ConfigError               a setting is missing or malformed (says which and how to fix)
    ├── RefusedError              understood, and refused by the state of things (not paused,
    │                             already acknowledged, no such incident)
    ├── BrokerError               the MQTT broker is unreachable, refused us, or the port is taken
    │                             (``retry``: whether the same call can succeed later unchanged)
    │   └── SessionTakenError     another client holds the hub's session (same client id)
    ├── HubRunningError           another hub holds the data directory (names it)
    ├── StoreError                the event store cannot be opened or written
    ├── ContractError             a payload breaks the event contract (carries a reason code)
    ├── InfluxError               InfluxDB refused or could not take a write
    │   └── InfluxRefusedError    InfluxDB refused points themselves (malformed, too old, type)
    ├── TransportError            a notification channel refused a message (permanent or not)
    ├── ModelError                a language model's endpoint failed or did not answer (``retry``)
    ├── PkiError                  a CA, certificate, CRL or PKI directory is missing or unusable
    │   └── CsrError              a gateway's certificate request is refused (carries a reason code)
    └── ClaimError                the hub refused a gateway's claim or renewal (code, retry_after_s)
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "CareflowError",
    "ClaimError",
    "ConfigError",
    "ContractError",
    "CsrError",
    "HubRunningError",
    "InfluxError",
    "InfluxRefusedError",
    "ModelError",
    "PkiError",
    "RefusedError",
    "SessionTakenError",
    "StoreError",
    "TransportError",
]


class CareflowError(Exception):
    """Root of every error careflow raises on purpose."""


class ConfigError(CareflowError):
    """A setting is missing or malformed."""


class RefusedError(CareflowError):
    """The request is understood, and what it names does not allow it: a device that is not
    paused, an incident already acknowledged, a silence or serial that does not exist."""


class BrokerError(CareflowError):
    """The MQTT broker cannot be reached, refused the connection, or cannot be started.

    ``retry``: the same call can succeed later unchanged (the broker is down or did not answer);
    false when something must be fixed first (credentials refused, the port taken).
    """

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class SessionTakenError(BrokerError):
    """Another client uses this hub's client id and held the session first: this hub yields.

    The CLI exits EXIT_SESSION_TAKEN for it, which the systemd unit does not restart: a restart
    would only take the session over again, and store elsewhere what the other hub should get.
    """


class HubRunningError(CareflowError):
    """Another hub already runs on this data directory; two would fight over one session."""


class StoreError(CareflowError):
    """The durable store cannot be opened or written."""


class ContractError(CareflowError):
    """A payload breaks the event contract.

    ``code`` is a short stable word (``not_json``, ``schema``, ...) for counting and filtering;
    the message is for people.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InfluxError(CareflowError):
    """InfluxDB did not take a write.

    ``retry`` says whether sending the same points again can succeed (the server was down,
    busy or refused our credentials) or not (it rejected the points themselves).
    """

    def __init__(self, message: str, *, retry: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status


class InfluxRefusedError(InfluxError):
    """InfluxDB refused points themselves; sending them again cannot help.

    ``partial``: the server stored the request's other points (a partial write: InfluxDB 1.x
    answers 400 "partial write", 2.x answers 422) and refused ``dropped`` of them (0 when it did
    not say how many). Otherwise it refused the whole request (2.x: one malformed line).
    """

    def __init__(self, message: str, *, status: int, partial: bool, dropped: int) -> None:
        super().__init__(message, retry=False, status=status)
        self.partial = partial
        self.dropped = dropped


class TransportError(CareflowError):
    """A notification channel did not take a message; the message is the channel's own reason.

    ``permanent``: sending again cannot help (bad credentials, unknown recipient, HTTP 401/404)
    until someone fixes the channel; otherwise (timeouts, 5xx, 429, refused connections) a later
    attempt can succeed.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class ModelError(CareflowError):
    """A language model's chat endpoint (the optional planner) failed: unreachable, too slow,
    an HTTP error, or an answer that is not a chat completion. The agent then plans without it.

    ``retry``: the same call can succeed later unchanged (down, slow, 5xx, 429); false when the
    settings must change first (401/403: the key; 404: the URL or the model's name).
    """

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class PkiError(CareflowError):
    """A certificate authority, certificate, CRL or the PKI directory is missing or unusable."""


class CsrError(PkiError):
    """A certificate signing request is refused.

    ``code`` is a short stable word (``csr_invalid``, ``csr_bad_signature``, ``csr_weak_key``,
    ``csr_identity_mismatch``, ...) that the claim flow sends back to the gateway; the message is
    for people.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ClaimError(CareflowError):
    """The hub refused a claim or a renewal.

    ``code`` is the hub's stable word (``token_expired``, ``rate_limited``, ...);
    ``retry_after_s`` says how long to wait when waiting helps.
    """

    def __init__(self, code: str, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s
