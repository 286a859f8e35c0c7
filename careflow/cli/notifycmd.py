"""`careflow notify`: test a channel, and see the notification outbox."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    WideOption,
    console,
    iso_ms,
    print_json_lines,
)
from careflow.cli.ops import open_store
from careflow.core.errors import ConfigError, TransportError
from careflow.hub.alerting.apprise_transport import AppriseTransport
from careflow.hub.alerting.notify import load_channels

__all__ = ["notify_app"]

notify_app = typer.Typer(help="Notification channels (Apprise URLs from CAREFLOW_CHANNEL_<NAME>).",
                         no_args_is_help=True)


@notify_app.command("test")
def send_test(channel: Annotated[str, typer.Argument(help="Channel name, e.g. oncall or ops.")],
              as_json: JsonOption = False) -> None:
    """Send a test message through a channel and say whether it was accepted: exit 2 when the
    channel's settings need fixing (unknown channel, bad URL or credentials), 75 when it failed
    for now (timeout, server error).

    Example: `careflow notify test oncall`.
    """
    channels = load_channels()
    if channel.lower() not in channels:
        known = ", ".join(sorted(channels)) or "none"
        msg = (f"no channel {channel!r} (configured: {known}); set "
               f"CAREFLOW_CHANNEL_{channel.upper()} to an Apprise URL")
        raise ConfigError(msg)
    try:
        AppriseTransport(channels[channel.lower()].url).send(
            "careflow test message", f"If you read this, careflow can reach you on '{channel}'.")
    except TransportError as exc:
        # exit 2 when the channel's settings need fixing, 75 when a later try can work
        advice = "check its URL and credentials" if exc.permanent else "try again later"
        msg = f"channel {channel!r} did not accept the message ({exc}); {advice}"
        raise TransportError(msg, permanent=exc.permanent) from exc
    if as_json:
        print_json_lines([{"channel": channel.lower(), "sent": True}])
        return
    console.print(f"sent a test message through {channel}", highlight=False)


@notify_app.command("list")
def list_notifications(
    state: Annotated[str | None, typer.Option(
        "--state", help="pending, sending, sent, failed or cancelled [default: all].")] = None,
    limit: Annotated[int, typer.Option("--limit", "-l", min=1)] = 30,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """The notification outbox, newest first: what was sent, what waits, what failed (with the
    channel's reason) and which reminders were cancelled (and why).

    Example: `careflow notify list --state failed`.
    """
    notes = open_store(data_dir).notifications(states=(state,) if state else None, limit=limit)
    rows: list[dict[str, Any]] = [
        {"id": n.id, "incident": n.incident_id, "channel": n.channel, "kind": n.kind,
         "state": n.state, "attempts": n.attempts, "title": n.title,
             "created": iso_ms(n.created_ms), "sent": iso_ms(n.sent_ms) if n.sent_ms else None,
             "last_error": n.last_error} for n in notes]
    if as_json:
        print_json_lines(rows)
        return
    table = ListTable("id", "incident", "channel", "state", "attempts", "title", "reason",
                      wide={"attempts"}, text={"title", "reason"}, show_wide=wide)
    for row in rows:
        table.add_row(str(row["id"]), str(row["incident"] or "-"),  # 0: a digest, of none
                      row["channel"], row["state"],
                      str(row["attempts"]), row["title"], row["last_error"] or "")
    console.print(table.table)
