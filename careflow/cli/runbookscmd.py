"""`careflow runbooks`: the runbooks people read and the agent follows, listed and checked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from careflow.cli.common import (
    JsonOption,
    ListTable,
    RulesDirOption,
    WideOption,
    console,
    err_console,
    print_json_lines,
    styled,
    use_rules_dir,
)
from careflow.core.errors import ConfigError
from careflow.hub.alerting.incidents import default_rules
from careflow.hub.alerting.selfwatch import SELF_RULES
from careflow.hub.ops.runbooks import check_runbooks, default_runbooks_dir, load_runbooks

__all__ = ["runbooks_app"]

runbooks_app = typer.Typer(help="Runbooks: what people check and run when an alert fires, and "
                           "what the agent may propose (CAREFLOW_RUNBOOKS_DIR or shipped with "
                           "careflow).", no_args_is_help=True)

RunbooksDirOption = Annotated[
    Path | None,
    typer.Option("--runbooks-dir", help="The folder of runbooks (*.md) [env: "
                 "CAREFLOW_RUNBOOKS_DIR; default: the runbooks shipped with careflow].",
                 show_default=False, file_okay=False),
]


@contextlib.contextmanager
def _folder(runbooks_dir: Path | None) -> Iterator[Path]:
    if runbooks_dir is not None:
        yield runbooks_dir
        return
    with default_runbooks_dir() as folder:
        yield folder


@runbooks_app.command("list")
def list_runbooks(runbooks_dir: RunbooksDirOption = None, as_json: JsonOption = False,
                  wide: WideOption = False) -> None:
    """The runbooks, the rules each answers, and what the agent may do with each (exit 2 if one
    has a problem: `careflow runbooks check` names it).

    Example: `careflow runbooks list` or `careflow runbooks list --json`.
    """
    with _folder(runbooks_dir) as folder:
        runbooks = load_runbooks(folder)
    if as_json:
        print_json_lines([runbook.as_dict() for runbook in runbooks.values()])
        return
    table = ListTable("runbook", "rules", "agent may propose", "verify", wide={"verify"},
                      text={"agent may propose"}, show_wide=wide)
    for runbook in runbooks.values():
        proposes = ("evidence only" if runbook.read_only
                    else ", ".join(step.action for step in runbook.actions) or "-")
        verify = (f"{runbook.verify.check} in {_duration(runbook.verify.within_s)}"
                  if runbook.verify else "-")
        rules = (runbook.rules[0] + (f" +{len(runbook.rules) - 1}" if len(runbook.rules) > 1
                                     else "")) if runbook.rules else "-"
        table.add_row(runbook.id, rules, proposes, verify)
    console.print(table.table)


def _duration(seconds: int) -> str:
    """``900`` → ``15m``: the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@runbooks_app.command("check")
def check(
    runbooks_dir: RunbooksDirOption = None,
    rules_dir: RulesDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every runbook's front matter (the agent's part) and sections (the people's part):
    each problem with its file and line (an unknown action, check or parameter, a bad template,
    a write in a care alarm's runbook); exit 1 if there is any, 2 if the folder is missing.

    Example: `careflow runbooks check` or `careflow runbooks check --runbooks-dir ./runbooks`.
    """
    use_rules_dir(rules_dir)
    rules = {rule.name for rule in default_rules().rules} | set(SELF_RULES)
    with _folder(runbooks_dir) as folder:
        if not folder.is_dir():
            msg = f"no runbooks folder {folder} (--runbooks-dir or CAREFLOW_RUNBOOKS_DIR)"
            raise ConfigError(msg)
        runbooks, problems = check_runbooks(folder)
    answered = {rule for runbook in runbooks for rule in runbook.rules}
    not_loaded = sorted(answered - rules)  # a typo, or a rule of the shipped set you dropped
    unanswered = sorted(rules - answered)
    if as_json:
        print_json_lines([{"ok": not problems, "runbooks": len(runbooks),
                           "problems": [{"file": str(p.path), "line": p.line,
                                         "message": p.message} for p in problems],
                           "rules_not_loaded": not_loaded, "rules_without_runbook": unanswered}])
    else:
        for problem in problems:
            err_console.print(styled(("error: ", "red"), str(problem)), highlight=False,
                              soft_wrap=True)
        if not_loaded:
            err_console.print(styled(("note: ", "yellow"), "runbooks answer rules the hub does "
                                     f"not load: {', '.join(not_loaded)}"), highlight=False, soft_wrap=True)
        if unanswered:
            err_console.print(styled(("note: ", "yellow"), "rules without a runbook for the "
                                     f"agent: {', '.join(unanswered)}"), highlight=False, soft_wrap=True)
        console.print(f"{len(runbooks)} runbook(s), {len(problems)} problem(s)"
                      + ("" if problems else ": OK"), highlight=False)
    raise typer.Exit(1 if problems else 0)
