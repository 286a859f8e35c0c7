"""`careflow incidents`: what fired, who has it, and closing it."""

from __future__ import annotations

import getpass
from dataclasses import asdict
from typing import Annotated, Any

import typer

from careflow.cli.common import (
    DataDirOption,
    JsonOption,
    ListTable,
    WideOption,
    console,
    format_age,
    iso_ms,
    print_fields,
    print_json_lines,
    styled,
)
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import RefusedError
from careflow.hub.store.interface import Store
from careflow.hub.store.records import UNRESOLVED, Incident, IncidentAction
from careflow.hub.web.link_pages import typed_name

__all__ = ["incidents_app"]

incidents_app = typer.Typer(help="Incidents opened by alert rules.", no_args_is_help=True)

ByOption = Annotated[str | None, typer.Option("--by", help="Who [default: your login name].")]


def _row(incident: Incident) -> dict[str, Any]:
    row = asdict(incident)
    for key in ("triggered_ms", "acknowledged_ms", "resolved_ms", "first_raised_ms",
                "last_raised_ms"):
        value = row.pop(key)
        row[key.removesuffix("_ms")] = iso_ms(value) if value is not None else None
    if incident.acknowledged_ms is not None:
        row["time_to_acknowledge_s"] = (incident.acknowledged_ms - incident.triggered_ms) / 1000
    if incident.resolved_ms is not None:
        row["time_to_resolve_s"] = (incident.resolved_ms - incident.triggered_ms) / 1000
    return row


@incidents_app.command("list")
def list_incidents(
    state: Annotated[str, typer.Option(
        "--state", help="open, acknowledged, resolved, or active (open + acknowledged), all.")
    ] = "active",
    limit: Annotated[int, typer.Option("--limit", "-l", min=1)] = 50,
    as_json: JsonOption = False,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Incidents, newest first.

    Example: `careflow incidents list --state open` or `careflow incidents list --json`.
    """
    states = {"active": UNRESOLVED, "all": None}.get(state, (state,))
    incidents = open_store(data_dir).incidents(states=states, limit=limit)
    if as_json:
        print_json_lines([_row(i) for i in incidents])
        return
    table = ListTable("id", "state", "severity", "rule", "source", "since", "summary",
                      wide={"severity"}, text={"source", "summary"}, show_wide=wide)
    colours = {"critical": "red", "warning": "yellow"}
    for i in incidents:
        table.add_row(str(i.id), i.state, styled((i.severity, colours.get(i.severity, "white"))),
                      i.rule, f"{i.gateway}/{i.device}", format_age(i.triggered_ms) + " ago",
                      i.summary)
    console.print(table.table)
    if not incidents:
        console.print(f"no {state} incidents")


def _action_row(entry: IncidentAction) -> dict[str, Any]:
    return {"at": iso_ms(entry.at_ms), "action": entry.action, "by": entry.by, "via": entry.via,
            "detail": entry.detail}


def _show(store: Store, incident: Incident, as_json: bool) -> None:
    """The incident, then its timeline: who acknowledged, resolved or silenced it, how."""
    row = _row(incident)
    timeline = [_action_row(entry) for entry in store.incident_actions(incident.id)]
    if as_json:
        print_json_lines([{**row, "timeline": timeline}])
        return
    print_fields(row, width=22)
    console.print(styled((f"{'timeline':>22}", "bold"), "  " + ("" if timeline else "nothing done "
                                                                "by hand yet")), highlight=False)
    for entry in timeline:
        detail = f" ({entry['detail']})" if entry["detail"] else ""
        console.print(styled(f"{'':>22}  {entry['at']}  {entry['action']} by {entry['by']} "
                             f"via {entry['via']}{detail}"), highlight=False)


@incidents_app.command("show")
def show(incident_id: Annotated[int, typer.Argument(help="Incident id.")],
         as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """One incident with its timeline (MTTA and MTTR are exact: times are recorded); exit 1 if
    there is no such incident.

    Example: `careflow incidents show 42`.
    """
    store = open_store(data_dir)
    incident = store.incident(incident_id)
    if incident is None:
        msg = f"no incident {incident_id}; see `careflow incidents list`"
        raise RefusedError(msg)
    _show(store, incident, as_json)


def _who(by: str | None) -> str:
    """Who acts, as one visible line: the name goes into later messages ("acknowledged by
    ..."), where a line break or an invisible character could pass for something else."""
    return typed_name(by or "", "") or getpass.getuser()


@incidents_app.command("ack")
def ack(incident_id: Annotated[int, typer.Argument(help="Incident id.")], by: ByOption = None,
        as_json: JsonOption = False, data_dir: DataDirOption = None) -> None:
    """Acknowledge: you have it (escalation stops); exit 1 if it is not open.

    Example: `careflow incidents ack 42 --by nurse-kari`.
    """
    _act(data_dir, incident_id, "acknowledge", _who(by), as_json)


@incidents_app.command("resolve")
def resolve(incident_id: Annotated[int, typer.Argument(help="Incident id.")],
            by: ByOption = None, as_json: JsonOption = False,
            data_dir: DataDirOption = None) -> None:
    """Resolve by hand (incidents also resolve themselves when the condition clears); exit 1 if
    it is already resolved.

    Example: `careflow incidents resolve 42`.
    """
    _act(data_dir, incident_id, "resolve", _who(by), as_json)




def _act(data_dir: Any, incident_id: int, action: str, by: str,  # noqa: ANN401
         as_json: bool) -> None:
    """Acknowledge or resolve, and record it in the incident's timeline, in one transaction;
    then show the incident."""
    store = open_store(data_dir)
    now_ms = clock.now_ms()
    with store.atomically(f"{action} an incident"):
        change = store.acknowledge_incident if action == "acknowledge" else store.resolve_incident
        incident = change(incident_id, by=by, at_ms=now_ms)
        store.record_action(incident_id, at_ms=now_ms, action=action, by=by, via="cli")
    _show(store, incident, as_json)
