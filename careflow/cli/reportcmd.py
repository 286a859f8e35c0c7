"""`careflow report`: the management summary from the hub's store, in the terminal or as HTML."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Protocol

import typer
from rich.table import Table

from careflow.cli.common import DataDirOption, JsonOption, console, format_ms, styled
from careflow.cli.ops import open_store
from careflow.core import clock
from careflow.core.errors import ConfigError
from careflow.hub.report.html_page import format_duration, format_pct, render_html
from careflow.hub.report.summary import DAY_MS, Report, build_report
from careflow.hub.store.interface import EventLog, Fleet, Incidents
from careflow.hub.store.records import EventFilter, Incident, PresenceChange

__all__ = ["report"]

_PAGE = 10_000


class ReportStore(EventLog, Fleet, Incidents, Protocol):
    """What the report reads: provisions from the log, the registry, presence, incidents."""


def _presence_log(store: Fleet) -> list[PresenceChange]:
    changes: list[PresenceChange] = []
    while page := store.presence_changes(after_pos=changes[-1].pos if changes else 0,
                                         limit=_PAGE):
        changes += page
    return changes


def collect(store: ReportStore, *, days: int, now_ms: int) -> Report:
    """Read what the report needs from the store and compute it."""
    start_ms = now_ms - days * DAY_MS
    incidents: list[Incident] = []
    while page := store.incidents_changed(since_ms=start_ms,
                                          after_id=incidents[-1].id if incidents else 0,
                                          limit=_PAGE):
        incidents += page
    return build_report(
        start_ms=start_ms, end_ms=now_ms, changes=_presence_log(store), incidents=incidents,
        provisions=store.query(EventFilter(type="provision", until_ms=now_ms),
                               newest_first=False),
        devices=store.devices())


def _print(report: Report, days: int) -> None:
    console.print(styled(("careflow report", "bold"), f" — last {days} days "
                         f"({format_ms(report.start_ms)} to {format_ms(report.end_ms)} UTC)"),
                  highlight=False)
    summary = Table.grid(padding=(0, 2))
    for name, value in (
        ("gateway uptime", format_pct(report.uptime_pct)),
        ("incidents opened", str(report.incidents_total)),
        ("MTTA", f"{format_duration(report.mtta_s)} (over {report.acknowledged} acknowledged)"),
        ("MTTR", f"{format_duration(report.mttr_s)} (over {report.resolved} resolved)"),
        ("devices provisioned", str(sum(report.provisioned.values()))),
        ("devices active / known", f"{report.devices_active} / {report.devices_total}"),
    ):
        summary.add_row(styled((name, "bold")), value)
    console.print(summary)

    sites = Table("site", "gateways", "uptime", title="Uptime by site")
    for site in report.sites:
        colour = "green" if (site.pct or 0) >= 99.9 else "yellow" if (site.pct or 0) >= 99 else "red"
        sites.add_row(site.site, str(site.gateways), styled((format_pct(site.pct), colour)))
    console.print(sites if report.sites else "no gateways known yet")

    incidents = Table("rule", "severity", "incidents", title="Incidents by rule and severity")
    colours = {"critical": "red", "warning": "yellow"}
    for item in report.incidents:
        incidents.add_row(item.rule, styled((item.severity, colours.get(item.severity, "white"))),
                          str(item.count))
    console.print(incidents if report.incidents else "no incidents in this period")

    if report.provisioned:
        added = Table("kind", "added", title="Devices provisioned")
        for kind, count in report.provisioned.items():
            added.add_row(kind, str(count))
        console.print(added)


def report(
    days: Annotated[int, typer.Option(
        "--days", min=1, max=3660, help="The period: the last N days (7 and 30 are the usual).")
    ] = 7,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write the report as one self-contained HTML file (charts inline, "
        "nothing fetched from the internet).", dir_okay=False, writable=True)] = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """The management summary: gateway uptime by site, incidents by rule and severity, MTTA and
    MTTR, devices provisioned and active, over the last --days.

    Computed from the hub's own store (no InfluxDB or Grafana needed): uptime from the gateways'
    presence log, mean times from the incidents' exact trigger, acknowledge and resolve times.

    Examples:

    * `careflow report` — the last 7 days in the terminal
    * `careflow report --days 30 --html report.html` — the month as a page to mail or archive
    * `careflow report --json | jq .sites` — for scripts
    """
    now_ms = clock.now_ms()
    store = open_store(data_dir)
    try:
        result = collect(store, days=days, now_ms=now_ms)
    finally:
        store.close()
    if html is not None:
        try:
            html.write_text(render_html(result, generated_ms=now_ms), encoding="utf-8")
        except OSError as exc:
            msg = f"cannot write the HTML report to {html}: {exc}"
            raise ConfigError(msg) from exc
    if as_json:
        sys.stdout.write(json.dumps({"days": days, **result.as_dict()},
                                    separators=(",", ":")) + "\n")
        return
    _print(result, days)
    if html is not None:
        console.print(f"wrote {html}", highlight=False)
