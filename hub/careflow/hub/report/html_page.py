"""The management report as one self-contained HTML page, with charts drawn as inline SVG.

For people without Grafana: the file is mailed or put on a share and opened anywhere, years later,
offline. So nothing is fetched: no scripts, no web fonts, no stylesheets from a CDN; the charts
are SVG written here, and every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from careflow.hub.report.summary import Report

__all__ = ["format_duration", "format_pct", "nice_ceiling", "render_html"]

_GREEN, _ORANGE, _RED, _GREY, _BLUE, _PURPLE = ("#2e7d32", "#ef6c00", "#c62828", "#9e9e9e",
                                               "#1565c0", "#6a1b9a")
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
  color:#212121;background:#fafafa}
main{max-width:960px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#616161;font-size:13px}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.tile{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 12px;flex:1 1 110px}
.tile b{display:block;font-size:22px}.tile span{color:#616161;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px;min-width:50%}
th,td{border-bottom:1px solid #eee;padding:5px 10px;text-align:left}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px}
.card svg{width:100%;height:auto;display:block}
svg text{font-family:inherit;font-size:11px;fill:#424242}
footer{color:#9e9e9e;font-size:11px;margin-top:28px}
"""


def format_pct(value: float | None) -> str:
    """``99.95 %``, or ``-`` when nothing is known."""
    return "-" if value is None else f"{value:.2f} %"


def format_duration(seconds: float | None) -> str:
    """A mean time the way people say it: ``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 4 h``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _uptime_colour(pct: float | None) -> str:
    if pct is None:
        return _GREY
    pct = round(pct, 2)  # the colour agrees with the figure printed next to it
    return _GREEN if pct >= 99.9 else _ORANGE if pct >= 99 else _RED


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def nice_ceiling(value: float) -> float:
    """The axis top for ``value``: the next 1, 2, 2.5 or 5 times a power of ten (384 -> 500)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10)
                if step * magnitude >= value - 1e-9)


def _runs(points: Sequence[tuple[float, float, str, float]],
          slot: float) -> list[Sequence[tuple[float, float, str, float]]]:
    """Points split where a day is missing, so a line never bridges days without a figure."""
    runs: list[list[tuple[float, float, str, float]]] = []
    for point in points:
        if runs and point[0] - runs[-1][-1][0] < slot * 1.5:
            runs[-1].append(point)
        else:
            runs.append([point])
    return [run for run in runs if len(run) > 1]


def _svg(width: int, height: int, body: Sequence[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            + "".join(body) + "</svg>")


def uptime_bars(report: Report) -> str:
    """Horizontal bars, one per site, 0..100 %."""
    label_w, bar_w, row_h = 160, 560, 26
    height = 24 + row_h * max(1, len(report.sites))
    parts = []
    for tick in (0, 25, 50, 75, 100):
        x = label_w + bar_w * tick / 100
        parts.append(f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{height - 18}" '
                     'stroke="#e0e0e0"/>'
                     f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle">{tick} %</text>')
    for row, site in enumerate(report.sites):
        y = 6 + row * row_h
        width = bar_w * (site.pct or 0) / 100
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end">{escape(site.site)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="18" rx="2" '
            f'fill="{_uptime_colour(site.pct)}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 14}">{format_pct(site.pct)}</text>')
    if not report.sites:
        parts.append(f'<text x="{label_w}" y="20">no gateway reported its presence</text>')
    return _svg(label_w + bar_w + 90, height, parts, "uptime by site")


def _grid_lines(peak: float, *, bottom: float, scale: float, plot_w: float) -> list[str]:
    """Horizontal grid lines with labels at zero, half and the top of the scale."""
    parts = []
    for value in (0.0, peak / 2, peak):
        y = bottom - value * scale
        parts.append(f'<line x1="40" y1="{y:.1f}" x2="{40 + plot_w}" y2="{y:.1f}" '
                     f'stroke="#eeeeee"/><text x="34" y="{y + 4:.1f}" '
                     f'text-anchor="end">{value:g}</text>')
    return parts


def _day_axis(report: Report, x_of: dict[int, float], top: int, bottom: int) -> list[str]:
    step = max(1, len(report.per_day) // 10)  # at most ~10 labels, readable at 30 days
    return [f'<text x="{x_of[d.day_ms]:.1f}" y="{bottom + 17}" text-anchor="middle">'
            f"{d.day[5:]}</text>" for n, d in enumerate(report.per_day) if n % step == 0] + [
        f'<line x1="40" y1="{bottom}" x2="{max(x_of.values(), default=40) + 20:.1f}" '
        f'y2="{bottom}" stroke="#9e9e9e"/>', f'<line x1="40" y1="{top}" x2="40" y2="{bottom}" '
        'stroke="#9e9e9e"/>']


def incidents_per_day(report: Report) -> str:
    """Vertical bars per UTC day: critical stacked under the rest."""
    top, bottom, plot_w = 30, 190, 660
    days = report.per_day
    slot = plot_w / max(1, len(days))
    x_of = {d.day_ms: 40 + slot * (n + 0.5) for n, d in enumerate(days)}
    peak = int(nice_ceiling(max([d.incidents for d in days] + [1])))
    peak += peak % 2  # counts: the middle grid line stays a whole number
    scale = (bottom - top) / peak
    parts = _grid_lines(float(peak), bottom=bottom, scale=scale, plot_w=plot_w)
    bar = max(2.0, slot * 0.7)
    for d in days:
        x = x_of[d.day_ms] - bar / 2
        other = d.incidents - d.critical
        if d.critical:
            parts.append(f'<rect x="{x:.1f}" y="{bottom - d.critical * scale:.1f}" '
                         f'width="{bar:.1f}" height="{d.critical * scale:.1f}" fill="{_RED}">'
                         f"<title>{d.day}: {d.critical} critical</title></rect>")
        if other:
            parts.append(f'<rect x="{x:.1f}" y="{bottom - d.incidents * scale:.1f}" '
                         f'width="{bar:.1f}" height="{other * scale:.1f}" fill="{_ORANGE}">'
                         f"<title>{d.day}: {other} other</title></rect>")
    parts += _day_axis(report, x_of, top, bottom)
    parts.append(_legend(40 + plot_w - 170, top - 24, [(_RED, "critical"), (_ORANGE, "other")]))
    return _svg(40 + plot_w + 20, bottom + 22, parts, "incidents per day")


def _legend(x: float, y: float, items: Sequence[tuple[str, str]]) -> str:
    return "".join(f'<rect x="{x + n * 85:.1f}" y="{y}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + n * 85 + 14:.1f}" y="{y + 9}">{escape(name)}</text>'
                   for n, (colour, name) in enumerate(items))


def mean_times_trend(report: Report) -> str:
    """MTTA and MTTR per day as lines (minutes); a day without a figure breaks the line."""
    top, bottom, plot_w = 30, 190, 660
    days = report.per_day
    slot = plot_w / max(1, len(days))
    x_of = {d.day_ms: 40 + slot * (n + 0.5) for n, d in enumerate(days)}
    values = [v / 60 for d in days for v in (d.mtta_s, d.mttr_s) if v is not None]
    peak = nice_ceiling(max([*values, 1.0]))
    scale = (bottom - top) / peak
    parts = _grid_lines(float(peak), bottom=bottom, scale=scale, plot_w=plot_w)
    parts.append(f'<text x="4" y="{top - 14}" text-anchor="start">minutes</text>')
    for colour, name, pick in ((_BLUE, "MTTA", 0), (_PURPLE, "MTTR", 1)):
        points = [(x_of[d.day_ms], bottom - (v / 60) * scale, d.day, v) for d in days
                  if (v := (d.mtta_s, d.mttr_s)[pick]) is not None]
        for run in _runs(points, slot):
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in run)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         'stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                  f"<title>{day}: {name} {format_duration(v)}</title></circle>"
                  for x, y, day, v in points]
    parts += _day_axis(report, x_of, top, bottom)
    parts.append(_legend(40 + plot_w - 170, top - 24, [(_BLUE, "MTTA"), (_PURPLE, "MTTR")]))
    return _svg(40 + plot_w + 20, bottom + 22, parts, "MTTA and MTTR per day")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    cells = "".join(
        "<tr>" + "".join(f'<td class="n">{escape(c)}</td>' if n in numeric
                         else f"<td>{escape(c)}</td>" for n, c in enumerate(row)) + "</tr>"
        for row in rows)
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" + cells
            + "</table>")


def render_html(report: Report, *, title: str = "careflow report", generated_ms: int) -> str:
    """The whole page.

    Args:
        report: the figures.
        title: the page heading.
        generated_ms: when it was made (shown in the footer).

    Returns:
        A complete HTML document that references nothing outside itself.
    """
    days = round((report.end_ms - report.start_ms) / 86_400_000)
    tiles = [
        (format_pct(report.uptime_pct), "gateway uptime"),
        (str(report.incidents_total), "incidents opened"),
        (format_duration(report.mtta_s), f"MTTA ({report.acknowledged} acknowledged)"),
        (format_duration(report.mttr_s), f"MTTR ({report.resolved} resolved)"),
        (str(sum(report.provisioned.values())), "devices provisioned"),
        (f"{report.devices_active} / {report.devices_total}", "devices active / known"),
    ]
    gateways = _table(
        ("gateway", "site", "uptime", "online", "known"),
        [(g.gateway, g.site, format_pct(g.pct), format_duration(g.online_ms / 1000),
          format_duration(g.known_ms / 1000)) for g in report.gateways], {2, 3, 4})
    incidents = _table(("rule", "severity", "incidents"),
                       [(i.rule, i.severity, str(i.count)) for i in report.incidents], {2})
    provisioned = _table(("kind", "added"),
                         [(kind, str(n)) for kind, n in report.provisioned.items()], {1})
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">last {days} days: {_date(report.start_ms)} to '
        f"{_date(report.end_ms)}</div>",
        '<div class="tiles">' + "".join(f'<div class="tile"><b>{escape(v)}</b>'
                                        f"<span>{escape(k)}</span></div>" for v, k in tiles)
        + "</div>",
        "<h2>Gateway uptime by site</h2>", f'<div class="card">{uptime_bars(report)}</div>',
        "<h2>Incidents per day</h2>", f'<div class="card">{incidents_per_day(report)}</div>',
        "<h2>Mean time to acknowledge and to resolve, per day</h2>",
        f'<div class="card">{mean_times_trend(report)}</div>',
        "<h2>Incidents by rule and severity</h2>",
        incidents if report.incidents else "<p>no incidents in this period</p>",
        "<h2>Gateways</h2>", gateways if report.gateways else "<p>no gateways known yet</p>",
        "<h2>Devices provisioned</h2>",
        provisioned if report.provisioned else "<p>no devices added in this period</p>",
        f"<footer>careflow report, generated {_date(generated_ms)} from the hub's event store. "
        "Uptime is the share of time a gateway was known online (its presence log); MTTA and "
        "MTTR are means over incidents acknowledged or resolved in the period.</footer>",
    ]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
