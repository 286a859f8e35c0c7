"""Exit statuses of careflow's commands, one meaning each, the same for ``careflow`` and
``careflow-edge`` (scripts, runbooks and systemd units branch on them):

====  =====================================================================================
0     done
1     failed or refused: the command ran and the answer is no (a check failed; a gateway, the
      hub or the state refused: not paused, already acknowledged, no such incident, claim
      refused)
2     usage or configuration: fix the command line or the settings (a bad flag or value, a
      missing setting, file, PKI or store, another hub on the data directory, a broker that
      refuses our credentials)
75    try again (EX_TEMPFAIL): the same command can succeed later unchanged (the broker is
      unreachable, a gateway or the hub did not answer, rate limited, a channel is down for
      now); ``careflow edge run`` after a remote ``restart-agent`` (the supervisor restarts it)
3     ``careflow hub`` only: it yielded its broker session to another hub with its client id;
      not to be restarted (deploy/careflow-hub.service: RestartPreventExitStatus=3)
====  =====================================================================================
"""

from __future__ import annotations

from careflow.core.errors import (
    BrokerError,
    CareflowError,
    ClaimError,
    ConfigError,
    ContractError,
    CsrError,
    HubRunningError,
    InfluxError,
    ModelError,
    PkiError,
    SessionTakenError,
    TransportError,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SESSION_TAKEN",
    "EXIT_TEMPFAIL",
    "EXIT_USAGE",
    "exit_status",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
EXIT_SESSION_TAKEN = 3


# Something to fix on the command line or in the settings; a broker or channel refusing us for
# good is its settings (credentials, address), a refused CSR is not (CsrError is a PkiError).
_USAGE = (ConfigError, PkiError, HubRunningError, ContractError, BrokerError, TransportError)


def _can_retry(exc: CareflowError) -> bool:
    """Whether the same command can succeed later unchanged, for the errors that know."""
    if isinstance(exc, BrokerError | InfluxError | ModelError):
        return exc.retry
    if isinstance(exc, TransportError):
        return not exc.permanent
    if isinstance(exc, ClaimError):
        return exc.retry_after_s is not None
    return False


def exit_status(exc: CareflowError) -> int:
    """The exit status a command ends with when ``exc`` stops it."""
    if isinstance(exc, SessionTakenError):
        return EXIT_SESSION_TAKEN
    if _can_retry(exc):
        return EXIT_TEMPFAIL
    if isinstance(exc, _USAGE) and not isinstance(exc, CsrError):
        return EXIT_USAGE
    return EXIT_FAILED
