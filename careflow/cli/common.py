"""Shared pieces of the CLI: options every command reads the same way, time parsing, output."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from careflow.config import Settings, load_settings
from careflow.errors import ConfigError
from careflow.schemas import format_rfc3339, parse_rfc3339

__all__ = [
    "DataDirOption",
    "JsonOption",
    "console",
    "err_console",
    "format_age",
    "format_ms",
    "iso_ms",
    "parse_when",
    "print_json_lines",
    "settings_from",
]

console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where the hub keeps its data [env: CAREFLOW_DATA_DIR; "
                 "default: ~/.local/share/careflow].", show_default=False),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object per line, for scripts and agents."),
]

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def settings_from(*, data_dir: Path | None = None, broker: str | None = None,
                  listen: str | None = None) -> Settings:
    """Settings from flags over environment, the same for every command."""
    return load_settings(data_dir=data_dir, broker=broker, listen=listen)


def parse_when(text: str, *, now_ms: int | None = None) -> int:
    """``2026-11-27T05:00:00Z``, ``now`` or an age such as ``15m``/``2h``/``7d`` → epoch ms."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    cleaned = text.strip().lower()
    if cleaned == "now":
        return now_ms
    match = _RELATIVE.match(cleaned)
    if match:
        return now_ms - int(match[1]) * _UNIT_S[match[2]] * 1000
    try:
        return int(parse_rfc3339(text.strip()).timestamp() * 1000)
    except ValueError as exc:
        msg = (f"cannot read the time {text!r}: use an age like 15m, 2h, 7d, or an RFC 3339 "
               "time like 2026-11-27T05:00:00Z")
        raise ConfigError(msg) from exc


def format_ms(ms: int | None) -> str:
    """Epoch milliseconds as a readable UTC time."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC, for JSON output."""
    return format_rfc3339(datetime.fromtimestamp(ms / 1000, tz=UTC))


def format_age(ms: int | None, *, now_ms: int | None = None) -> str:
    """How long ago, compactly: ``4s``, ``3m``, ``2h``, ``5d``."""
    if ms is None:
        return "-"
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    seconds = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def print_json_lines(rows: list[dict[str, Any]]) -> None:
    """One compact JSON object per line on stdout."""
    for row in rows:
        sys.stdout.write(json.dumps(row, separators=(",", ":"), default=str) + "\n")
