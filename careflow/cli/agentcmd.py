"""`careflow agent`: the operations agent's proposals, the person's decisions, its loop, its
mode and its audit trail (humans steer, the agent executes; see careflow.hub.ops.agent)."""

from __future__ import annotations

import getpass
import json
import sys
import threading
from dataclasses import asdict
from typing import Annotated, Any

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    WideOption,
    console,
    err_console,
    format_age,
    iso_ms,
    parse_when,
    print_fields,
    print_json_lines,
    settings_from,
    styled,
)
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import ConfigError, RefusedError
from careflow.hub.ops.agent import DEFAULT_EXPIRY_MS, Agent, agent_for, parse_mode
from careflow.hub.ops.audit import chain_problem
from careflow.hub.store.records import AuditEntry, Proposal, ProposalState
from careflow.hub.web.link_pages import typed_name

__all__ = ["agent_app"]

agent_app = typer.Typer(
    help="The operations agent: it proposes a runbook's next action for an incident; a person "
    "approves; it runs the action, verifies it, and escalates when that did not help. Every "
    "step is in `careflow agent log`.", no_args_is_help=True)

ByOption = Annotated[str | None, typer.Option("--by", help="Who decides [default: your login "
                                              "name].")]
_LIVE = (ProposalState.PENDING, ProposalState.APPROVED, ProposalState.EXECUTED)


def _who(by: str | None) -> str:
    """Who acts, as one visible line (it goes into the audit trail and later messages)."""
    return typed_name(by or "", "") or getpass.getuser()


def _agent(data_dir: Any, *, expires: str | None = None) -> Agent:  # noqa: ANN401
    """The agent over the hub's store, wired as the hub wires it."""
    settings = settings_from(data_dir=data_dir)
    store = open_store(data_dir)
    expiry_ms = DEFAULT_EXPIRY_MS
    if expires is not None:
        now = clock.now_ms()
        expiry_ms = now - parse_when(expires, now_ms=now)
        if expiry_ms <= 0:
            msg = f"--expires {expires}: give a duration such as 15m or 1h"
            raise ConfigError(msg)
    return agent_for(settings, store, expiry_ms=expiry_ms)


def _row(proposal: Proposal) -> dict[str, Any]:
    row = asdict(proposal)
    for key in ("created_ms", "expires_ms", "decided_ms", "executed_ms", "verified_ms"):
        value = row.pop(key)
        row[key.removesuffix("_ms")] = iso_ms(value) if value is not None else None
    return row


def _show(proposal: Proposal, as_json: bool) -> None:
    row = _row(proposal)
    if as_json:
        print_json_lines([row])
        return
    evidence = row.pop("evidence")
    for key in ("params", "result"):
        if row[key] is not None:
            row[key] = json.dumps(row[key], sort_keys=True)
    print_fields(row, width=11)
    console.print(styled((f"{'evidence':>11}", "bold"), "  " + ", ".join(sorted(evidence))
                         + " (--json has it all)"), highlight=False)


@agent_app.command("propose")
def propose(incident_id: Annotated[int, typer.Argument(help="Incident id.")],
            expires: Annotated[str | None, typer.Option(
                "--expires", help="How long the proposal may be approved [default: 15m].")
            ] = None,
            by: ByOption = None, as_json: JsonOption = False,
            data_dir: DataDirOption = None) -> None:
    """Diagnose an incident (the runbook's read-only steps, recent events, device state,
    presence history, related incidents at the site) and propose the runbook's next action;
    nothing runs until it is approved. A care alarm gets evidence only. Exit 1 if refused (the
    agent is off, no runbook answers the rule, the incident is resolved).

    Example: `careflow agent propose 42`, then `careflow agent approve 7 --by ana`.
    """
    agent = _agent(data_dir, expires=expires)
    made = agent.propose(incident_id, actor=_who(by))
    if as_json:
        print_json_lines([{"incident": made.incident.id, "note": made.note,
                           "proposal": None if made.proposal is None else _row(made.proposal),
                           "evidence": made.evidence}])
        return
    if made.proposal is None:
        console.print(styled(("no action proposed: ", "yellow"), made.note))
        console.print(f"evidence: {', '.join(sorted(made.evidence))} (--json has it all)")
        return
    _show(made.proposal, as_json=False)


@agent_app.command("list")
def list_proposals(
    state: Annotated[str, typer.Option(
        "--state", help="pending, approved, rejected, expired, executed, verified, failed, "
        "escalated; live (pending + approved + executed), or all.")] = "all",
    limit: Annotated[int, typer.Option("--limit", "-l", min=1)] = 50,
    as_json: JsonOption = False, wide: WideOption = False, data_dir: DataDirOption = None,
) -> None:
    """Proposals, newest first.

    Example: `careflow agent list --state pending` or `careflow agent list --json`.
    """
    if state == "all":
        states = None
    elif state == "live":
        states = list(_LIVE)
    else:
        try:
            states = [ProposalState(state)]
        except ValueError as exc:
            msg = f"unknown state {state!r}; see `careflow agent list --help`"
            raise ConfigError(msg) from exc
    proposals = open_store(data_dir).proposals(states=states, limit=limit)
    if as_json:
        print_json_lines([_row(p) for p in proposals])
        return
    table = ListTable("id", "state", "incident", "action", "params", "age", "why",
                      wide={"params"}, text={"params", "why"}, show_wide=wide)
    for p in proposals:
        table.add_row(str(p.id), p.state, str(p.incident_id), p.action,
                      json.dumps(dict(p.params), sort_keys=True), format_age(p.created_ms),
                      p.why)
    console.print(table.table)
    if not proposals:
        console.print("no proposals" if state == "all" else f"no {state} proposals")


@agent_app.command("show")
def show(proposal_id: Annotated[int, typer.Argument(help="Proposal id.")],
         as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """One proposal: action, parameters, why, dry run, expected result, how it is verified,
    its state and the evidence; exit 1 if there is no such proposal.

    Example: `careflow agent show 7 --json`.
    """
    proposal = open_store(data_dir).proposal(proposal_id)
    if proposal is None:
        msg = f"no proposal {proposal_id}; see `careflow agent list`"
        raise RefusedError(msg)
    _show(proposal, as_json)


@agent_app.command("approve")
def approve(proposal_id: Annotated[int, typer.Argument(help="Proposal id.")],
            by: ByOption = None, as_json: JsonOption = False,
            data_dir: DataDirOption = None) -> None:
    """Approve a pending proposal: the agent's loop (in the hub, or `careflow agent run`) runs
    it and verifies it. Exit 1 if it is not pending or has expired (refusals are audited).

    Example: `careflow agent approve 7 --by ana`.
    """
    _show(_agent(data_dir).approve(proposal_id, by=_who(by)), as_json)


@agent_app.command("reject")
def reject(proposal_id: Annotated[int, typer.Argument(help="Proposal id.")],
           reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit "
                                               "trail).")],
           by: ByOption = None, as_json: JsonOption = False,
           data_dir: DataDirOption = None) -> None:
    """Reject a pending proposal, with why; exit 1 if it is not pending.

    Example: `careflow agent reject 7 --by ana --reason "the technician is on the way"`.
    """
    _show(_agent(data_dir).reject(proposal_id, by=_who(by), reason=reason), as_json)


@agent_app.command("run")
def run(once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
        interval: Annotated[float, typer.Option("--interval", min=0.1,
                                                help="Seconds between passes.")] = 1.0,
        as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """The agent's loop (the hub runs it too, unless the mode is off): propose for new
    incidents, expire stale proposals, run approved ones (in auto, also those the registry
    allows), verify them, escalate a failed verification to on-call. Prints what it did.

    Example: `careflow agent run --once`.
    """
    agent = _agent(data_dir)

    def say(lines: list[str]) -> None:
        if as_json:
            print_json_lines([{"did": line} for line in lines])
        else:
            for line in lines:
                console.print(line)

    if once:
        say(agent.run_once())
        return
    stop = threading.Event()
    try:
        while not stop.is_set():
            say(agent.run_once())
            stop.wait(interval)
    except KeyboardInterrupt:
        stop.set()


def _entry(entry: AuditEntry) -> dict[str, Any]:
    return {"pos": entry.pos, "at": iso_ms(entry.at_ms), "actor": entry.actor,
            "event": entry.event, "subject": entry.subject, "detail": entry.detail,
            "prev_hash": entry.prev_hash, "hash": entry.hash}


@agent_app.command("log")
def log(as_json: JsonOption = False,
        verify: Annotated[bool, typer.Option(
            "--verify", help="Check the hash chain: exit 1 naming the first row edited, "
            "inserted or deleted.")] = False,
        limit: Annotated[int, typer.Option("--limit", "-l", min=1,
                                           help="The newest this many rows.")] = 100,
        data_dir: DataDirOption = None) -> None:
    """The audit trail, oldest first: every proposal's transition, every decision, every mode
    change and every refusal, each chained to the row before by hash (secrets masked).

    Example: `careflow agent log --verify` or `careflow agent log --json`.
    """
    store = open_store(data_dir)
    entries: list[AuditEntry] = []
    after = 0
    while True:  # the whole trail: --verify checks every row
        chunk = store.audit_log(after_pos=after, limit=1000)
        entries += chunk
        if len(chunk) < 1000:
            break
        after = chunk[-1].pos
    if verify:
        broken = chain_problem(entries)
        if broken is not None:
            entry, why = broken
            err_console.print(styled(("FAIL", "red"), f": audit row {entry.pos} ({entry.event} "
                                     f"{entry.subject}): {why}"))
            raise typer.Exit(1)
    shown = entries[-limit:]
    if as_json:
        print_json_lines([_entry(e) for e in shown])
    else:
        for e in shown:
            detail = json.dumps(e.detail, sort_keys=True)
            console.print(styled((f"{e.pos:>5}", "bold"), f"  {iso_ms(e.at_ms)}  {e.actor}  ",
                                 (e.event, "cyan"), f"  {e.subject}  {detail}"),
                          highlight=False)
    if verify:
        sys.stderr.write(f"the audit chain holds ({len(entries)} rows)\n")


@agent_app.command("mode")
def mode(new_mode: Annotated[str | None, typer.Argument(
            metavar="[off|manual|auto]", help="The mode to set; without it, show the mode.")
         ] = None,
         by: ByOption = None,
         reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in the audit "
                                                    "trail); needed to set a mode.")] = None,
         as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """Show or set how far the agent goes: `off` proposes nothing, `manual` (the default) runs
    only what a person approved, `auto` also runs, unapproved, what the registry allows in auto.
    CAREFLOW_AUTOMATION is a ceiling: asking above it is refused (exit 1) and audited.

    Example: `careflow agent mode manual --by ana --reason "storm: people decide tonight"`.
    """
    settings = settings_from(data_dir=data_dir)
    agent = Agent(open_store(data_dir), ceiling=parse_mode(settings.automation))
    if new_mode is not None:
        if not reason:
            msg = "say why with --reason (it goes into the audit trail)"
            raise ConfigError(msg)
        agent.set_mode(parse_mode(new_mode), by=_who(by), reason=reason)
    setting = agent.store.automation_mode()
    row = {"mode": str(agent.mode()), "ceiling": str(agent.ceiling),
           "set": None if setting is None else str(setting.mode),  # above the ceiling: capped
           "set_by": None if setting is None else setting.by,
           "reason": None if setting is None else setting.reason,
           "set_at": None if setting is None else iso_ms(setting.at_ms)}
    if as_json:
        print_json_lines([row])
    else:
        print_fields(row)
