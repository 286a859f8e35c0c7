"""`careflow users` as an administrator runs them: a password typed twice at a real terminal,
from a file or stdin; never shown again, kept only as an Argon2 hash."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from careflow.hub.store.records import Role
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.hub.web.auth import check_password
from tests.conftest import careflow_cmd, wait_until

PASSWORD = "correct horse battery"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    SqliteStore(data / "careflow.db", synchronous="normal").close()
    return data


def _env(data_dir: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
            "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200"}


def cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(careflow_cmd(*args), env=_env(data_dir), capture_output=True,
                          text=True, input=stdin, timeout=60, check=False)


def stored(data_dir: Path, name: str) -> tuple[Role, str] | None:
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        user = store.user(name)
        return None if user is None else (user.role, user.password_hash)
    finally:
        store.close()


def at_a_terminal(data_dir: Path, args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, typing each answer after the prompt before it."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execvpe(careflow_cmd()[0], [*careflow_cmd(*args)], _env(data_dir))
    output, pending, deadline = b"", list(answers), time.monotonic() + 60
    asked = 0  # where the output after the last answer starts
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if pending and output[asked:].strip().endswith(b":"):
                # getpass turns echo off, flushing what was typed before: type after that
                wait_until(lambda: not termios.tcgetattr(fd)[3] & termios.ECHO,
                           timeout_s=10, what="the prompt to hide the input")
                os.write(fd, pending.pop(0).encode() + b"\n")
                asked = len(output)
    if pending:  # it never asked for what is left: it would wait for it for ever
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_it_asks_twice_at_a_terminal_and_keeps_only_an_argon2_hash(data_dir: Path) -> None:
    code, output = at_a_terminal(data_dir, ["users", "add", "kari", "--role", "operator"],
                                 [PASSWORD, PASSWORD])
    assert code == 0, output
    assert "Repeat" in output and PASSWORD not in output  # hidden input
    role, hashed = stored(data_dir, "kari") or (None, "")
    assert role == Role.OPERATOR and hashed.startswith("$argon2id$") and PASSWORD not in hashed
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        assert check_password(store.user("kari"), PASSWORD)[0]
        assert not check_password(store.user("kari"), PASSWORD + "x")[0]
    finally:
        store.close()


def test_password_stdin_at_a_terminal_hides_what_is_typed(data_dir: Path) -> None:
    code, output = at_a_terminal(data_dir, ["users", "add", "kari", "--role", "viewer",
                                            "--password-stdin"], [PASSWORD])
    assert code == 0, output
    assert PASSWORD not in output and "added kari (viewer)" in output
    assert stored(data_dir, "kari") is not None


def test_two_different_typings_are_asked_again(data_dir: Path) -> None:
    code, output = at_a_terminal(data_dir, ["users", "add", "kari", "--role", "viewer"],
                                 [PASSWORD, "something else", PASSWORD, PASSWORD])
    assert code == 0, output
    assert "do not match" in output
    assert stored(data_dir, "kari") is not None


def test_it_reads_a_file_or_stdin_refuses_short_ones_and_lists_without_hashes(
        data_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    added = cli(data_dir, "users", "add", "ana", "--role", "operator", "--password-file",
                str(secret), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) | {"created": ""} == {
        "name": "ana", "role": "operator", "created": "", "sign_in": "password"}
    piped = cli(data_dir, "users", "add", "bo", "--role", "viewer", "--password-stdin",
                stdin=PASSWORD + "\n")
    assert piped.returncode == 0, piped.stderr
    assert "added bo (viewer)" in piped.stdout

    short = cli(data_dir, "users", "add", "cy", "--role", "viewer", "--password-stdin",
                stdin="short\n")
    assert short.returncode == 2 and "at least 10" in short.stderr
    assert stored(data_dir, "cy") is None
    no_tty = cli(data_dir, "users", "add", "cy", "--role", "viewer")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    bad_name = cli(data_dir, "users", "add", "<b>x", "--role", "viewer", "--password-stdin",
                   stdin=PASSWORD)
    assert bad_name.returncode == 2 and "cannot be a user name" in bad_name.stderr
    bad_role = cli(data_dir, "users", "add", "cy", "--role", "admin", "--password-stdin",
                   stdin=PASSWORD)
    assert bad_role.returncode == 2 and "viewer" in bad_role.stderr

    listed = cli(data_dir, "users", "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["role"]) for r in rows] == [("ana", "operator"), ("bo", "viewer")]
    assert "argon2" not in listed.stdout and "argon2" not in cli(data_dir, "users",
                                                                 "list").stdout


def test_a_taken_name_needs_replace_and_remove_says_when_there_is_none(
        data_dir: Path) -> None:
    assert cli(data_dir, "users", "add", "ana", "--role", "viewer", "--password-stdin",
               stdin=PASSWORD).returncode == 0
    before = stored(data_dir, "ana")
    taken = cli(data_dir, "users", "add", "ana", "--role", "operator", "--password-stdin",
                stdin="another password")
    assert taken.returncode == 1 and "--replace" in taken.stderr
    assert stored(data_dir, "ana") == before
    replaced = cli(data_dir, "users", "add", "ana", "--role", "operator", "--password-stdin",
                   "--replace", stdin="another password")
    assert replaced.returncode == 0, replaced.stderr
    after = stored(data_dir, "ana")
    assert after is not None and before is not None
    assert after[0] == Role.OPERATOR and after[1] != before[1]

    removed = cli(data_dir, "users", "remove", "ana", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout) == {"name": "ana",
                                                                      "removed": True}
    again = cli(data_dir, "users", "remove", "ana")
    assert again.returncode == 1 and "careflow users list" in again.stderr


def test_an_sso_user_has_no_password_that_could_match(data_dir: Path) -> None:
    done = cli(data_dir, "users", "add", "kari@example.org", "--role", "operator", "--sso",
               "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sign_in"] == "proxy"
    store = SqliteStore(data_dir / "careflow.db", synchronous="normal")
    try:
        user = store.user("kari@example.org")
        assert user is not None
        assert check_password(user, "!sso") == (False, None)
        assert check_password(user, "") == (False, None)
    finally:
        store.close()
