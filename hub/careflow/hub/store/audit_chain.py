"""The audit trail's hash chain: each row's hash covers its content and the hash before it, so
editing, inserting or deleting a row breaks the chain at that row (`careflow agent log
--verify`). Pure; every adapter hashes with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from careflow.hub.store.records import AuditEntry

__all__ = ["GENESIS", "audit_hash", "first_broken"]

GENESIS = "0" * 64  # the hash "before" the first row


def audit_hash(prev_hash: str, *, pos: int, at_ms: int, actor: str, event: str, subject: str,
               detail: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash and the row's content in canonical JSON."""
    content = json.dumps([prev_hash, pos, at_ms, actor, event, subject, detail],
                         sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


def first_broken(entries: Sequence[AuditEntry], *, prev_hash: str = GENESIS,
                 after_pos: int = 0) -> tuple[AuditEntry | None, str] | None:
    """The first row that breaks the chain, with why (None: the chain holds). A row is broken
    when its content does not give its hash, when it does not follow the hash before it (a row
    was deleted or inserted), or when positions do not grow. A deleted last row is not found
    here: compare the newest hash with one kept elsewhere."""
    last_pos = after_pos
    for entry in entries:
        if entry.pos <= last_pos:
            return entry, f"row {entry.pos} is out of order (after row {last_pos})"
        if entry.prev_hash != prev_hash:
            return entry, (f"row {entry.pos} does not follow the row before it: a row before "
                           "it was deleted, inserted or edited")
        expected = audit_hash(prev_hash, pos=entry.pos, at_ms=entry.at_ms, actor=entry.actor,
                              event=entry.event, subject=entry.subject, detail=entry.detail)
        if entry.hash != expected:
            return entry, f"row {entry.pos} was edited: its content does not give its hash"
        prev_hash, last_pos = entry.hash, entry.pos
    return None
