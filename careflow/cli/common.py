"""Shared pieces of the CLI: options every command reads the same way, time parsing, output.

Terminal output goes through :class:`LiteralConsole`: every string printed or put in a table
cell is shown as the text it is. Much of what the CLI shows comes from devices (firmware, site
labels, error messages, dead-letter reasons and payloads, incident summaries), and Rich would
otherwise read ``[/]`` in it as markup (and fail the whole view with ``MarkupError``),
``[link=...]`` as a hyperlink, ``:smile:`` as an emoji, and pass terminal escape sequences
through. Styling is therefore explicit: :func:`styled` and :class:`rich.text.Text` with a style.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeAlias, TypeVar

import typer
from rich import box
from rich.console import Console, HighlighterType, JustifyMethod, OverflowMethod, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

from careflow.core import clock
from careflow.core import text as safe_text
from careflow.core.config import Settings, load_settings
from careflow.core.errors import ConfigError
from careflow.core.text import literal
from careflow.schemas import format_rfc3339, parse_rfc3339

__all__ = [
    "DataDirOption",
    "JsonOption",
    "ListTable",
    "LiteralConsole",
    "RulesDirOption",
    "WideOption",
    "console",
    "deprecated_alias",
    "err_console",
    "format_age",
    "format_ms",
    "iso_ms",
    "literal",
    "parse_when",
    "print_fields",
    "print_json_lines",
    "settings_from",
    "styled",
    "use_rules_dir",
]

class LiteralConsole(Console):
    """A Rich console that renders every string literally: no markup, no emoji codes, control
    characters made visible. Table cells and ``print`` arguments given as ``str`` are safe
    whatever a device put in them; our own styling is passed as :class:`Text` with a style."""

    def __init__(self, *, stderr: bool = False) -> None:
        super().__init__(stderr=stderr, markup=False, emoji=False)

    def render_str(self, text: str, *, style: str | Style = "",
                   justify: JustifyMethod | None = None, overflow: OverflowMethod | None = None,
                   emoji: bool | None = None, markup: bool | None = None,
                   highlight: bool | None = None,
                   highlighter: HighlighterType | None = None) -> Text:
        """Rich's conversion of a string to Text, with markup and emoji codes always off
        (``markup`` and ``emoji`` are taken for Rich's callers, and ignored)."""
        return super().render_str(literal(text), style=style, justify=justify,
                                  overflow=overflow, emoji=False, markup=False,
                                  highlight=highlight, highlighter=highlighter)


console = LiteralConsole()
err_console = LiteralConsole(stderr=True)

Part: TypeAlias = str | tuple[str, str]


def styled(*parts: Part) -> Text:
    """One line from plain parts and ``(text, style)`` parts, each shown literally.

    Example: ``styled(("timed out", "red"), f": {device_message}")``.
    """
    return Text.assemble(*((literal(part[0]), part[1]) if isinstance(part, tuple)
                           else literal(part) for part in parts))


def print_fields(row: Mapping[str, Any], *, out: Console | None = None,
                 width: int | None = None) -> None:
    """``key  value`` lines, keys bold and right-aligned, values shown literally."""
    width = width if width is not None else max(map(len, row), default=0)
    for key, value in row.items():
        (out or console).print(styled((f"{key:>{width}}", "bold"), f"  {value}"),
                               highlight=False)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where the hub keeps its data [env: CAREFLOW_DATA_DIR; "
                 "default: ~/.local/share/careflow].", show_default=False),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object per line, for scripts and agents."),
]
RulesDirOption = Annotated[
    Path | None,
    typer.Option("--rules-dir", help="The folder of alert rule files (and their tests/) the hub "
                 "evaluates [env: CAREFLOW_RULES_DIR; default: the rules shipped with careflow]; "
                 "one setting for hub, demo, replay and rules check|test.", show_default=False,
                 file_okay=False),
]
WideOption = Annotated[
    bool, typer.Option("--wide", "-w", help="Show every column (the default ones fit an "
                       "80-column terminal; --json has them all)."),
]


class ListTable:
    """The table of a list command, readable whole in an 80-column terminal.

    No vertical rules (columns are two spaces apart) and a rule under the header. Columns named
    in ``wide`` show only when ``show_wide`` (``--wide``). Free-text columns named in ``text``
    (summaries, reasons, payloads, topics) wrap, folding a long word rather than cutting it;
    the others (ids, states, times) never wrap, and would show ``…`` if cut.
    """

    def __init__(self, *columns: str, wide: Collection[str] = (), text: Collection[str] = (),
                 show_wide: bool = False) -> None:
        self._shown = [name not in wide or show_wide for name in columns]
        self.table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
        for name, shown in zip(columns, self._shown, strict=True):
            if shown:
                folds = name in text
                self.table.add_column(name, no_wrap=not folds, min_width=16 if folds else None,
                                      overflow="fold" if folds else "ellipsis")

    def add_row(self, *cells: RenderableType) -> None:
        """One row, with a cell for every column, shown or not."""
        self.table.add_row(*(cell for cell, shown in zip(cells, self._shown, strict=True)
                             if shown))

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def settings_from(*, data_dir: Path | None = None, broker: str | None = None,
                  listen: str | None = None) -> Settings:
    """Settings from flags over environment, the same for every command."""
    return load_settings(data_dir=data_dir, broker=broker, listen=listen)


def use_rules_dir(folder: Path | None) -> None:
    """``--rules-dir`` wins over ``CAREFLOW_RULES_DIR`` for this process, so that everything
    reading the setting (the hub's alert stage, replay, the rules commands) resolves it in one
    place (``careflow.hub.alerting.incidents.default_rules_dir``)."""
    if folder is None:
        return
    if not folder.is_dir():
        msg = f"--rules-dir {folder} is not a folder (of alert rule files)"
        raise ConfigError(msg)
    os.environ["CAREFLOW_RULES_DIR"] = str(folder.resolve())


def parse_when(text: str, *, now_ms: int | None = None) -> int:
    """``2026-11-27T05:00:00Z``, ``now`` or an age such as ``15m``/``2h``/``7d`` → epoch ms."""
    now_ms = clock.now_ms() if now_ms is None else now_ms
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
    """How long ago, compactly: ``4s``, ``3m``, ``2h``, ``5d`` (now, unless told)."""
    return safe_text.format_age(ms, now_ms=clock.now_ms() if now_ms is None else now_ms)


def print_json_lines(rows: list[dict[str, Any]]) -> None:
    """One compact JSON object per line on stdout."""
    for row in rows:
        sys.stdout.write(json.dumps(row, separators=(",", ":"), default=str) + "\n")


P = ParamSpec("P")
R = TypeVar("R")


def deprecated_alias(command: Callable[P, R], *, old: str, new: str) -> Callable[P, R]:
    """``command`` under an old spelling (``careflow OLD``): it works as before, with the same
    options and help, and says on stderr, in one line, what to type instead. Register it with
    ``hidden=True`` so ``--help`` shows only the new spelling."""

    @functools.wraps(command)
    def alias(*args: P.args, **kwargs: P.kwargs) -> R:
        sys.stderr.write(f"note: `careflow {old}` is deprecated; use `careflow {new}`\n")
        return command(*args, **kwargs)

    return alias
