"""`careflow users`: who may sign in to the on-call console, and as what."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    console,
    iso_ms,
    print_json_lines,
)
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import ConfigError, RefusedError
from careflow.hub.store.records import Role, User
from careflow.hub.web.auth import MIN_PASSWORD_LENGTH, NO_PASSWORD, hash_password, valid_user_name

__all__ = ["users_app"]

users_app = typer.Typer(help="Console users: who may sign in to the on-call web, as viewer "
                        "(reads) or operator (also acknowledges and resolves).",
                        no_args_is_help=True)

NameArgument = Annotated[str, typer.Argument(help="The user's name (what they type to sign in, "
                                             "or what the SSO proxy's header says).")]


def _row(user: User) -> dict[str, str]:
    return {"name": user.name, "role": str(user.role), "created": iso_ms(user.created_ms),
            "sign_in": "proxy" if user.password_hash == NO_PASSWORD else "password"}


def _password(password_file: Path | None, password_stdin: bool) -> str:
    """The new password: from a file, from stdin, or typed twice at a prompt."""
    if password_file is not None and password_stdin:
        msg = "give --password-file or --password-stdin, not both"
        raise ConfigError(msg)
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"cannot read --password-file {password_file}: {exc.strerror or exc}"
            raise ConfigError(msg) from exc
        password = text.removesuffix("\n").removesuffix("\r")
    elif password_stdin and sys.stdin.isatty():  # typed, not piped: never on the screen
        password = typer.prompt("Password", hide_input=True)
    elif password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            msg = ("no terminal to type the password in: use --password-file PATH or "
                   "--password-stdin")
            raise ConfigError(msg)
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD_LENGTH:
        msg = (f"the password is too short ({len(password)} characters): use at least "
               f"{MIN_PASSWORD_LENGTH}, e.g. a few words")
        raise ConfigError(msg)
    return password


@users_app.command("add")
def add(
    name: NameArgument,
    role: Annotated[Role, typer.Option("--role", help="viewer reads; operator also "
                                       "acknowledges and resolves incidents.")],
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", help="Read the password from this file (its first line).",
        dir_okay=False)] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of stdin.")] = False,
    sso: Annotated[bool, typer.Option(
        "--sso", help="No password: the user signs in only through the trusted proxy that "
        "names them in CAREFLOW_AUTH_HEADER (the hub must then listen only where that proxy "
        "alone reaches it, e.g. CAREFLOW_HTTP_LISTEN=127.0.0.1:8080).")] = False,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Change an existing user's role and password (ends their "
        "sessions).")] = False,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Add a console user; the password is asked for twice (at least 10 characters) unless
    --password-file or --password-stdin gives it. Only its Argon2 hash is kept.

    Example: `careflow users add kari --role operator`, or in a script
    `careflow users add ops-bot --role viewer --password-stdin < secret.txt`.
    """
    if not valid_user_name(name):
        msg = (f"{name!r} cannot be a user name: use letters, digits and . _ @ + - (at most "
               "64, starting with a letter or digit)")
        raise ConfigError(msg)
    if sso and (password_file is not None or password_stdin):
        msg = "--sso users have no password: drop --password-file/--password-stdin"
        raise ConfigError(msg)
    store = open_store(data_dir)
    if not replace and store.user(name) is not None:  # before asking for a password
        msg = (f"there is already a user {name!r}: choose another name, or replace their "
               "password and role with --replace")
        raise RefusedError(msg)
    hashed = NO_PASSWORD if sso else hash_password(_password(password_file, password_stdin))
    user = store.add_user(name, role=role, password_hash=hashed, at_ms=clock.now_ms(),
                          replace=replace)
    if as_json:
        print_json_lines([_row(user)])
        return
    console.print(f"{'replaced' if replace else 'added'} {user.name} ({user.role})",
                  highlight=False)


@users_app.command("list")
def list_users(as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """Every console user with their role (never a password or hash).

    Example: `careflow users list` or `careflow users list --json`.
    """
    users = open_store(data_dir).users()
    if as_json:
        print_json_lines([_row(user) for user in users])
        return
    table = ListTable("name", "role", "sign in", "created")
    for user in users:
        row = _row(user)
        table.add_row(row["name"], row["role"], row["sign_in"], row["created"])
    console.print(table.table)
    if not users:
        console.print("no users yet: add one with `careflow users add NAME --role operator`")


@users_app.command("remove")
def remove(name: NameArgument, as_json: JsonOption = False,
           data_dir: DataDirOption = None) -> None:
    """Remove a console user; their sessions end at once. Exit 1 if there is no such user.

    Example: `careflow users remove kari`.
    """
    if not open_store(data_dir).remove_user(name):
        msg = f"there is no user {name!r}; `careflow users list` shows who there is"
        raise RefusedError(msg)
    if as_json:
        print_json_lines([{"name": name, "removed": True}])
        return
    console.print(f"removed {name}", highlight=False)
