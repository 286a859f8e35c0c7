"""What the on-call web keeps on SQLite: incident timelines, spent links, users, sessions."""

from __future__ import annotations

import sqlite3

from careflow.core.errors import RefusedError
from careflow.hub.store.records import IncidentAction, Notification, Role, User, WebSession
from careflow.hub.store.sqlite_store._base import SqliteBase
from careflow.hub.store.sqlite_store._outbox import _notification

__all__ = ["SqliteWeb"]


class SqliteWeb(SqliteBase):
    """The incident_actions, spent_links, users and web_sessions tables."""

    def record_action(self, incident_id: int, *, at_ms: int, action: str, by: str, via: str,
                      detail: str = "") -> IncidentAction:
        """Add one entry to an incident's timeline."""
        with self._transaction("record an incident action") as conn:
            cursor = conn.execute(
                "INSERT INTO incident_actions (incident_id, at_ms, action, by, via, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)", (incident_id, at_ms, action, by, via, detail))
        assert cursor.lastrowid is not None
        return IncidentAction(cursor.lastrowid, incident_id, at_ms, action, by, via, detail)

    def incident_actions(self, incident_id: int, *, limit: int = 200) -> list[IncidentAction]:
        """An incident's timeline entries, oldest first."""
        rows = self._read("SELECT id, incident_id, at_ms, action, by, via, detail FROM "
                          "incident_actions WHERE incident_id = ? ORDER BY id LIMIT ?",
                          (incident_id, limit))
        return [IncidentAction(*row) for row in rows]

    def incident_notifications(self, incident_id: int, *,
                               limit: int = 200) -> list[Notification]:
        """The messages queued about an incident, oldest first."""
        rows = self._read("SELECT * FROM notifications WHERE incident_id = ? ORDER BY id LIMIT ?",
                          (incident_id, limit))
        return [_notification(row) for row in rows]

    def spend_link(self, link_id: str, *, incident_id: int, action: str, channel: str,
                   at_ms: int) -> bool:
        """Mark a link used; False when it was used before."""
        with self._transaction("spend a one-tap link") as conn:
            return conn.execute(
                "INSERT OR IGNORE INTO spent_links (link_id, incident_id, action, channel, "
                "at_ms) VALUES (?, ?, ?, ?, ?)",
                (link_id, incident_id, action, channel, at_ms)).rowcount == 1

    def link_spent(self, link_id: str) -> int | None:
        """When a link was used (None: never)."""
        rows = self._read("SELECT at_ms FROM spent_links WHERE link_id = ?", (link_id,))
        return int(rows[0][0]) if rows else None

    def add_user(self, name: str, *, role: str, password_hash: str, at_ms: int,
                 replace: bool = False) -> User:
        """Add a user, or with ``replace`` change one's role and password (ending their
        sessions)."""
        with self._transaction("add a console user") as conn:
            try:
                conn.execute("INSERT INTO users (name, role, password_hash, created_ms) "
                             "VALUES (?, ?, ?, ?)", (name, Role(role), password_hash, at_ms))
            except sqlite3.IntegrityError as exc:
                if not replace:
                    msg = (f"there is already a user {name!r}: choose another name, or "
                           "replace their password and role with --replace")
                    raise RefusedError(msg) from exc
                conn.execute("UPDATE users SET role = ?, password_hash = ? WHERE name = ?",
                             (Role(role), password_hash, name))
                conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,))
        user = self.user(name)
        assert user is not None
        return user

    def renew_password_hash(self, name: str, *, old: str, new: str) -> bool:
        """Keep ``new`` (the same password, today's parameters) if the hash is still ``old``;
        the user's sessions go on."""
        with self._transaction("renew a password hash") as conn:
            return conn.execute("UPDATE users SET password_hash = ? WHERE name = ? AND "
                                "password_hash = ?", (new, name, old)).rowcount == 1

    def user(self, name: str) -> User | None:
        """One user."""
        rows = self._read("SELECT name, role, password_hash, created_ms FROM users "
                          "WHERE name = ?", (name,))
        return User(rows[0][0], Role(rows[0][1]), rows[0][2], rows[0][3]) if rows else None

    def users(self) -> list[User]:
        """Every user, by name."""
        rows = self._read("SELECT name, role, password_hash, created_ms FROM users ORDER BY name")
        return [User(name, Role(role), hashed, created) for name, role, hashed, created in rows]

    def remove_user(self, name: str) -> bool:
        """Remove a user and end their sessions; False if there was none."""
        with self._transaction("remove a console user") as conn:
            conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,))
            return conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 1

    def start_session(self, token_hash: str, *, user: str, csrf: str, at_ms: int,
                      expires_ms: int) -> None:
        """Keep a new login's session (and forget expired ones)."""
        with self._transaction("start a console session") as conn:
            conn.execute("DELETE FROM web_sessions WHERE expires_ms <= ?", (at_ms,))
            conn.execute("INSERT INTO web_sessions (token_hash, user, csrf, created_ms, "
                         "expires_ms) VALUES (?, ?, ?, ?, ?)",
                         (token_hash, user, csrf, at_ms, expires_ms))

    def session(self, token_hash: str, *, now_ms: int) -> WebSession | None:
        """The live session of a cookie, with its user's current role."""
        rows = self._read(
            "SELECT s.user, u.role, s.csrf, s.created_ms, s.expires_ms FROM web_sessions s "
            "JOIN users u ON u.name = s.user WHERE s.token_hash = ? AND s.expires_ms > ?",
            (token_hash, now_ms))
        if not rows:
            return None
        user, role, csrf, created, expires = rows[0]
        return WebSession(user, Role(role), csrf, created, expires)

    def end_session(self, token_hash: str) -> None:
        """Log out."""
        with self._transaction("end a console session") as conn:
            conn.execute("DELETE FROM web_sessions WHERE token_hash = ?", (token_hash,))
