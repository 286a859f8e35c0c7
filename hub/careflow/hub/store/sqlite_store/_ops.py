"""What the operations agent keeps on SQLite: proposals, the audit trail, its mode, and rule
controls (mutes and disables)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from careflow.hub.store.audit_chain import GENESIS, audit_hash
from careflow.hub.store.records import (
    AuditEntry,
    AutomationMode,
    AutomationSetting,
    Proposal,
    ProposalState,
    RuleControl,
    RuleControlKind,
)
from careflow.hub.store.sqlite_store._base import SqliteBase

__all__ = ["SqliteOps"]

log = logging.getLogger(__name__)
_CONTROL_KINDS = frozenset(RuleControlKind)

_P = ProposalState
# which time column a move to each state stamps
_STAMPED = {_P.APPROVED: "decided_ms", _P.REJECTED: "decided_ms", _P.EXPIRED: "decided_ms",
            _P.EXECUTED: "executed_ms", _P.FAILED: "executed_ms", _P.VERIFIED: "verified_ms",
            _P.ESCALATED: None, _P.PENDING: None}
_PROPOSAL_COLUMNS = ("id, incident_id, runbook, action, params, why, evidence, dry_run, "
                     "expected, verify, planner, state, created_ms, expires_ms, decided_by, "
                     "decided_ms, reason, executed_ms, result, verified_ms")


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _proposal(row: Sequence[Any]) -> Proposal:
    (id_, incident_id, runbook, action, params, why, evidence, dry_run, expected, verify,
     planner, state, created_ms, expires_ms, decided_by, decided_ms, reason, executed_ms,
     result, verified_ms) = row
    return Proposal(id_, incident_id, runbook, action, json.loads(params), why,
                    json.loads(evidence), dry_run, expected, verify, planner,
                    ProposalState(state), created_ms, expires_ms, decided_by, decided_ms,
                    reason, executed_ms, None if result is None else json.loads(result),
                    verified_ms)


class SqliteOps(SqliteBase):
    """The proposals, audit_log, automation and rule_controls tables."""

    def add_proposal(self, *, incident_id: int, runbook: str, action: str,
                     params: Mapping[str, Any], why: str, evidence: Mapping[str, Any],
                     dry_run: str, expected: str, verify: str, planner: str, at_ms: int,
                     expires_ms: int) -> Proposal:
        """Record a new pending proposal."""
        with self._transaction("record a proposal") as conn:
            cursor = conn.execute(
                "INSERT INTO proposals (incident_id, runbook, action, params, why, evidence, "
                "dry_run, expected, verify, planner, state, created_ms, expires_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (incident_id, runbook, action, _json(params), why, _json(evidence), dry_run,
                 expected, verify, planner, _P.PENDING, at_ms, expires_ms))
        assert cursor.lastrowid is not None
        made = self.proposal(cursor.lastrowid)
        assert made is not None
        return made

    def proposal(self, proposal_id: int) -> Proposal | None:
        """One proposal."""
        rows = self._read(f"SELECT {_PROPOSAL_COLUMNS} FROM proposals WHERE id = ?",
                          (proposal_id,))
        return _proposal(rows[0]) if rows else None

    def proposals(self, *, states: Sequence[str] | None = None, incident_id: int | None = None,
                  limit: int = 50) -> list[Proposal]:
        """Newest first (only in these states, or of one incident, when given)."""
        where: list[str] = []
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += [ProposalState(s) for s in states]
        if incident_id is not None:
            where.append("incident_id = ?")
            params.append(incident_id)
        sql = f"SELECT {_PROPOSAL_COLUMNS} FROM proposals"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_proposal(row) for row in self._read(f"{sql} ORDER BY id DESC LIMIT ?",
                                                      [*params, limit])]

    def move_proposal(self, proposal_id: int, *, from_states: Sequence[str], to: str,
                      at_ms: int, by: str | None = None, reason: str | None = None,
                      result: Mapping[str, Any] | None = None) -> Proposal | None:
        """Change a proposal's state (compare-and-set on ``from_states``)."""
        target = ProposalState(to)
        sets: list[str] = ["state = ?"]
        params: list[Any] = [str(target)]
        stamp = _STAMPED[target]
        if stamp is not None:
            sets.append(f"{stamp} = ?")
            params.append(at_ms)
        if by is not None:
            sets.append("decided_by = ?")
            params.append(by)
        if reason is not None:
            sets.append("reason = ?")
            params.append(reason)
        if result is not None:
            sets.append("result = ?")
            params.append(_json(result))
        froms = [ProposalState(s) for s in from_states]
        with self._transaction("change a proposal") as conn:
            changed = conn.execute(
                f"UPDATE proposals SET {', '.join(sets)} WHERE id = ? AND state IN "
                f"({', '.join('?' * len(froms))})", [*params, proposal_id, *froms]).rowcount
        return self.proposal(proposal_id) if changed == 1 else None

    def append_audit(self, *, at_ms: int, actor: str, event: str, subject: str,
                     detail: Mapping[str, Any]) -> AuditEntry:
        """Append a row chained to the last one, in one transaction."""
        stored = json.loads(_json(detail))  # hashed exactly as it reads back
        with self._transaction("append to the audit trail") as conn:
            last = conn.execute("SELECT pos, hash FROM audit_log ORDER BY pos DESC "
                                "LIMIT 1").fetchone()
            prev_hash = last[1] if last else GENESIS
            pos = (last[0] if last else 0) + 1
            digest = audit_hash(prev_hash, pos=pos, at_ms=at_ms, actor=actor, event=event,
                                subject=subject, detail=stored)
            conn.execute("INSERT INTO audit_log (pos, at_ms, actor, event, subject, detail, "
                         "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (pos, at_ms, actor, event, subject, _json(stored), prev_hash, digest))
        return AuditEntry(pos, at_ms, actor, event, subject, stored, prev_hash, digest)

    def audit_log(self, *, after_pos: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Rows after a position, oldest first."""
        rows = self._read("SELECT pos, at_ms, actor, event, subject, detail, prev_hash, hash "
                          "FROM audit_log WHERE pos > ? ORDER BY pos LIMIT ?", (after_pos, limit))
        return [AuditEntry(pos, at_ms, actor, event, subject, json.loads(detail), prev, digest)
                for pos, at_ms, actor, event, subject, detail, prev, digest in rows]

    def automation_mode(self) -> AutomationSetting | None:
        """The mode last set."""
        rows = self._read("SELECT mode, by, reason, at_ms FROM automation WHERE id = 1")
        if not rows:
            return None
        mode, by, reason, at_ms = rows[0]
        return AutomationSetting(AutomationMode(mode), by, reason, at_ms)

    def set_automation_mode(self, *, mode: str, by: str, reason: str,
                            at_ms: int) -> AutomationSetting:
        """Set the mode."""
        setting = AutomationSetting(AutomationMode(mode), by, reason, at_ms)
        with self._transaction("set the automation mode") as conn:
            conn.execute("INSERT OR REPLACE INTO automation (id, mode, by, reason, at_ms) "
                         "VALUES (1, ?, ?, ?, ?)", (setting.mode, by, reason, at_ms))
        return setting

    def set_rule_control(self, rule: str, *, kind: str, until_ms: int | None, by: str,
                         reason: str, at_ms: int) -> RuleControl:
        """Mute or disable a rule, replacing what was set for it."""
        control = RuleControl(rule, RuleControlKind(kind), until_ms, by, reason, at_ms)
        with self._transaction("quiet a rule") as conn:
            conn.execute("INSERT OR REPLACE INTO rule_controls (rule, kind, until_ms, by, "
                         "reason, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                         (rule, control.kind, until_ms, by, reason, at_ms))
        return control

    def clear_rule_control(self, rule: str) -> bool:
        """Unmute or enable a rule."""
        with self._transaction("unquiet a rule") as conn:
            return conn.execute("DELETE FROM rule_controls WHERE rule = ?",
                                (rule,)).rowcount == 1

    def rule_controls(self, *, now_ms: int | None = None) -> list[RuleControl]:
        """By rule; only those in force at ``now_ms`` when given."""
        sql, params = "SELECT rule, kind, until_ms, by, reason, at_ms FROM rule_controls", []
        if now_ms is not None:
            sql += " WHERE until_ms IS NULL OR until_ms > ?"
            params.append(now_ms)
        controls = []
        for rule, kind, until, by, reason, at in self._read(sql + " ORDER BY rule", params):
            if kind not in _CONTROL_KINDS:  # a newer hub's, or edited by hand: one such row
                # must not fail every reader (digests, status); its rule is announced
                log.warning("a rule control of an unknown kind is not applied",
                            extra={"rule": rule, "kind": kind, "by": by})
                continue
            controls.append(RuleControl(rule, RuleControlKind(kind), until, by, reason, at))
        return controls

    def rule_activity(self, *, since_ms: int) -> dict[str, tuple[int, int]]:
        """Per rule: incidents triggered and notifications written since a moment."""
        found: dict[str, tuple[int, int]] = {}
        for rule, count in self._read("SELECT rule, COUNT(*) FROM incidents WHERE triggered_ms "
                                      ">= ? GROUP BY rule", (since_ms,)):
            found[rule] = (int(count), 0)
        for rule, count in self._read(
                "SELECT i.rule, COUNT(*) FROM notifications n JOIN incidents i ON i.id = "
                "n.incident_id WHERE n.created_ms >= ? GROUP BY i.rule", (since_ms,)):
            found[rule] = (found.get(rule, (0, 0))[0], int(count))
        return found
