"""The provisioning registry: serials, their claims and identities, behind a narrow interface.

``ProvisioningRegistry`` is what the hub's provisioning service and the CLI need;
``SqliteProvisioningRegistry`` keeps it in the hub's own database file (``settings.db_path``), in
tables of its own, with the same habits as the event store: WAL, ``BEGIN IMMEDIATE`` for every
write, state changes as compare-and-set (``UPDATE … WHERE state = ?``, acted on only when one row
changed), and sqlite3 errors translated to :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from careflow.core.errors import StoreError
from careflow.core.sqlite import immediate_transaction, open_wal
from careflow.provisioning.claims import (
    ClaimRecord,
    Refusal,
    Registration,
    Reject,
    State,
    decide_registration,
)

__all__ = ["ProvisioningRegistry", "Revocation", "SqliteProvisioningRegistry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS provision_serials (
    serial TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    gateway_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    token_hash TEXT,
    token_expires_ms INTEGER,
    key_fingerprint TEXT,
    cert_serial TEXT,
    cert_not_after_ms INTEGER,
    cert_pem TEXT,
    registered_ms INTEGER NOT NULL,
    claimed_ms INTEGER,
    issued_ms INTEGER,
    connected_ms INTEGER,
    active_ms INTEGER,
    renewed_ms INTEGER,
    revoked_ms INTEGER,
    last_error TEXT,
    last_error_ms INTEGER
) WITHOUT ROWID;
-- identities withdrawn by `register --replace`: kept until the CA has revoked them
CREATE TABLE IF NOT EXISTS provision_revocations (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    reason TEXT NOT NULL,
    requested_ms INTEGER NOT NULL,
    done_ms INTEGER
);
-- refused claims and renewals, folded by (source, serial, code) and written in batches: for
-- operators to see who knocks, never touching a serial's own row; pruned to a bound
CREATE TABLE IF NOT EXISTS provision_refusals (
    source TEXT NOT NULL,
    serial TEXT NOT NULL,
    code TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (source, serial, code)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS provision_refusals_by_time ON provision_refusals (last_ms);
CREATE INDEX IF NOT EXISTS provision_refusals_by_serial ON provision_refusals (serial, last_ms);
"""
_REFUSAL_COLUMNS = "source, serial, code, first_ms, last_ms, count"
_COLUMNS = ("serial, site, gateway_id, state, token_hash, token_expires_ms, key_fingerprint, "
            "cert_serial, cert_not_after_ms, cert_pem, registered_ms, claimed_ms, issued_ms, "
            "connected_ms, active_ms, renewed_ms, revoked_ms, last_error, last_error_ms")


def _record(row: Sequence[Any]) -> ClaimRecord:
    names = [name.strip() for name in _COLUMNS.split(",")]
    values = dict(zip(names, row, strict=True))
    values["state"] = State(values["state"])
    return ClaimRecord(**values)


class Revocation(tuple[int, str, str, str]):
    """(id, serial, gateway id, certificate serial) of an identity waiting to be revoked."""

    __slots__ = ()


class ProvisioningRegistry(Protocol):
    """What the claim flow stores. Every change is one transaction."""

    def register(self, *, serial: str, site: str, gateway_id: str, token_hash: str,
                 token_expires_ms: int, replace: bool, now_ms: int) -> Registration | Reject:
        """Pre-register a serial with a fresh token (refused as the pure decision says)."""

    def get(self, serial: str) -> ClaimRecord | None:
        """One serial."""

    def by_gateway(self, gateway_id: str) -> ClaimRecord | None:
        """The serial that holds a gateway id."""

    def records(self) -> list[ClaimRecord]:
        """Every serial, by serial."""

    def claim(self, serial: str, *, token_hash: str, key_fingerprint: str, now_ms: int) -> bool:
        """registered → claimed, binding the spent token to one key; False if it lost a race."""

    def issue(self, serial: str, *, cert_serial: str, not_after_ms: int, cert_pem: str,
              now_ms: int) -> bool:
        """claimed → issued with its certificate (or a replayed issue: True, nothing changes)."""

    def renew(self, gateway_id: str, *, cert_serial: str, not_after_ms: int, cert_pem: str,
              now_ms: int) -> bool:
        """Record a renewed certificate of an issued or active identity."""

    def mark_connected(self, gateway_ids: Iterable[str], *, now_ms: int) -> list[str]:
        """First connection under its own identity; returns the gateways that changed."""

    def mark_active(self, gateway_ids: Iterable[str], *, now_ms: int) -> list[str]:
        """issued → active on the first stored heartbeat; returns the gateways that changed."""

    def record_error(self, serial: str, message: str, *, now_ms: int) -> None:
        """Remember the last refusal or failure for `provision watch` to explain (only of a
        requester that proved it holds the serial: a stranger never changes its row)."""

    def withdraw(self, gateway_id: str, *, now_ms: int) -> bool:
        """`careflow devices revoke`: the identity is withdrawn (no claim, no renewal)."""

    def record_refusals(self, refusals: Sequence[Refusal], *, max_rows: int) -> None:
        """Add folded refusals (one transaction), keeping at most ``max_rows``, newest."""

    def refusals(self, *, limit: int, serial: str | None = None) -> list[Refusal]:
        """The most recently refused (source, serial, code), newest first."""

    def pending_revocations(self) -> list[Revocation]:
        """Identities withdrawn but not yet revoked by the CA."""

    def revoked(self, revocation_id: int, *, now_ms: int) -> None:
        """The CA revoked it."""

    def close(self) -> None:
        """Release the database."""


class SqliteProvisioningRegistry:
    """The provisioning registry in the hub's SQLite file (tables ``provision_*``)."""

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the service and hub threads
        try:
            self._conn = open_wal(path, synchronous=synchronous, schema=_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            msg = (f"cannot open the provisioning registry at {path}: {exc}. Check that the "
                   "directory is writable (CAREFLOW_DATA_DIR or --data-dir).")
            raise StoreError(msg) from exc

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate_transaction(
                self._conn, f"cannot {action} in the provisioning registry at {self.path}") as conn:
            yield conn

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            msg = f"cannot read the provisioning registry at {self.path}: {exc}"
            raise StoreError(msg) from exc

    def register(self, *, serial: str, site: str, gateway_id: str, token_hash: str,
                 token_expires_ms: int, replace: bool, now_ms: int) -> Registration | Reject:
        """Pre-register ``serial``; the pure :func:`decide_registration` says whether it may."""
        with self._transaction("register a serial") as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM provision_serials WHERE serial = ?",
                               (serial,)).fetchone()
            existing = _record(row) if row else None
            owner = conn.execute("SELECT serial FROM provision_serials WHERE gateway_id = ?",
                                 (gateway_id,)).fetchone()
            decision = decide_registration(existing, serial=serial, site=site,
                                           gateway_id=gateway_id,
                                           gateway_owner=owner[0] if owner else None,
                                           replace=replace)
            if isinstance(decision, Reject):
                return decision
            if existing is not None and decision.revoke_cert_serial:
                conn.execute(
                    "INSERT INTO provision_revocations (serial, gateway_id, cert_serial, reason, "
                    "requested_ms) VALUES (?, ?, ?, 'replaced', ?)",
                    (serial, existing.gateway_id, decision.revoke_cert_serial, now_ms))
            conn.execute("DELETE FROM provision_serials WHERE serial = ?", (serial,))
            conn.execute(
                "INSERT INTO provision_serials (serial, site, gateway_id, state, token_hash, "
                "token_expires_ms, registered_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (serial, site, gateway_id, State.REGISTERED.value, token_hash, token_expires_ms,
                 now_ms))
            return decision

    def get(self, serial: str) -> ClaimRecord | None:
        """One serial."""
        rows = self._read(f"SELECT {_COLUMNS} FROM provision_serials WHERE serial = ?",
                          (serial,))
        return _record(rows[0]) if rows else None

    def by_gateway(self, gateway_id: str) -> ClaimRecord | None:
        """The serial holding ``gateway_id``."""
        rows = self._read(f"SELECT {_COLUMNS} FROM provision_serials WHERE gateway_id = ?",
                          (gateway_id,))
        return _record(rows[0]) if rows else None

    def records(self) -> list[ClaimRecord]:
        """Every serial, by serial."""
        return [_record(row) for row in
                self._read(f"SELECT {_COLUMNS} FROM provision_serials ORDER BY serial")]

    def _change(self, action: str, sql: str, params: Sequence[Any]) -> bool:
        with self._transaction(action) as conn:
            return conn.execute(sql, params).rowcount == 1

    def claim(self, serial: str, *, token_hash: str, key_fingerprint: str, now_ms: int) -> bool:
        """Spend the token: only a registered serial with this very token hash moves on."""
        return self._change(
            "record a claim",
            "UPDATE provision_serials SET state = 'claimed', claimed_ms = ?, key_fingerprint = ?, "
            "last_error = NULL, last_error_ms = NULL "
            "WHERE serial = ? AND state = 'registered' AND token_hash = ?",
            (now_ms, key_fingerprint, serial, token_hash))

    def issue(self, serial: str, *, cert_serial: str, not_after_ms: int, cert_pem: str,
              now_ms: int) -> bool:
        """Record the certificate of a claimed serial."""
        return self._change(
            "record an issued certificate",
            "UPDATE provision_serials SET state = 'issued', issued_ms = ?, cert_serial = ?, "
            "cert_not_after_ms = ?, cert_pem = ? WHERE serial = ? AND state = 'claimed'",
            (now_ms, cert_serial, not_after_ms, cert_pem, serial))

    def renew(self, gateway_id: str, *, cert_serial: str, not_after_ms: int, cert_pem: str,
              now_ms: int) -> bool:
        """Record a renewed certificate; the previous one simply runs out (short-lived)."""
        return self._change(
            "record a renewed certificate",
            "UPDATE provision_serials SET renewed_ms = ?, cert_serial = ?, cert_not_after_ms = ?, "
            "cert_pem = ? WHERE gateway_id = ? AND state IN ('issued', 'active')",
            (now_ms, cert_serial, not_after_ms, cert_pem, gateway_id))

    def _mark(self, action: str, sql: str, gateway_ids: Iterable[str], now_ms: int) -> list[str]:
        changed: list[str] = []
        with self._transaction(action) as conn:
            for gateway_id in gateway_ids:
                if conn.execute(sql, (now_ms, gateway_id)).rowcount == 1:
                    changed.append(gateway_id)
        return changed

    def mark_connected(self, gateway_ids: Iterable[str], *, now_ms: int) -> list[str]:
        """The first ``online`` presence under a certificate we issued."""
        return self._mark("record a first connection",
                          "UPDATE provision_serials SET connected_ms = ?1 WHERE gateway_id = ?2 "
                          "AND state = 'issued' AND connected_ms IS NULL", gateway_ids, now_ms)

    def mark_active(self, gateway_ids: Iterable[str], *, now_ms: int) -> list[str]:
        """The first stored heartbeat: the device works end to end under its own identity."""
        return self._mark("record a first heartbeat",
                          "UPDATE provision_serials SET state = 'active', active_ms = ?1, "
                          "connected_ms = COALESCE(connected_ms, ?1) "
                          "WHERE gateway_id = ?2 AND state = 'issued'", gateway_ids, now_ms)

    def record_error(self, serial: str, message: str, *, now_ms: int) -> None:
        """Remember the last problem of a serial (no-op for unknown serials)."""
        with self._transaction("record an error") as conn:
            conn.execute("UPDATE provision_serials SET last_error = ?, last_error_ms = ? "
                         "WHERE serial = ?", (message, now_ms, serial))

    def withdraw(self, gateway_id: str, *, now_ms: int) -> bool:
        """`careflow devices revoke`: the identity is withdrawn (no claim, no renewal)."""
        return self._change(
            "record a revocation",
            "UPDATE provision_serials SET state = 'revoked', revoked_ms = ? "
            "WHERE gateway_id = ? AND state != 'revoked'", (now_ms, gateway_id))

    def record_refusals(self, refusals: Sequence[Refusal], *, max_rows: int) -> None:
        """Fold ``refusals`` into the table in one transaction, then drop the stalest rows
        beyond ``max_rows`` (found through the time index, never by sorting the table)."""
        if not refusals:
            return
        with self._transaction("record refused requests") as conn:
            conn.executemany(
                f"INSERT INTO provision_refusals ({_REFUSAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source, serial, code) DO UPDATE SET "
                "first_ms = min(first_ms, excluded.first_ms), "
                "last_ms = max(last_ms, excluded.last_ms), count = count + excluded.count",
                [(r.source, r.serial, r.code, r.first_ms, r.last_ms, r.count) for r in refusals])
            (rows,) = conn.execute("SELECT count(*) FROM provision_refusals").fetchone()
            if rows > max_rows:
                conn.execute(
                    "DELETE FROM provision_refusals WHERE (source, serial, code) IN ("
                    "SELECT source, serial, code FROM provision_refusals "
                    "ORDER BY last_ms LIMIT ?)", (rows - max_rows,))

    def refusals(self, *, limit: int, serial: str | None = None) -> list[Refusal]:
        """The most recently refused (source, serial, code), newest first, through an index."""
        where, params = ("WHERE serial = ? ", (serial, limit)) if serial is not None \
            else ("", (limit,))
        rows = self._read(f"SELECT {_REFUSAL_COLUMNS} FROM provision_refusals {where}"
                          "ORDER BY last_ms DESC LIMIT ?", params)
        return [Refusal(source=row[0], serial=row[1], code=row[2], first_ms=row[3],
                        last_ms=row[4], count=row[5]) for row in rows]

    def pending_revocations(self) -> list[Revocation]:
        """Identities withdrawn by ``--replace`` that the CA has not revoked yet."""
        return [Revocation(row) for row in self._read(
            "SELECT id, serial, gateway_id, cert_serial FROM provision_revocations "
            "WHERE done_ms IS NULL ORDER BY id")]

    def revoked(self, revocation_id: int, *, now_ms: int) -> None:
        """Mark a withdrawal as carried out by the CA."""
        self._change("record a revocation",
                     "UPDATE provision_revocations SET done_ms = ? WHERE id = ?",
                     (now_ms, revocation_id))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
