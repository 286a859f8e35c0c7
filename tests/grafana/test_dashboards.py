"""The Grafana dashboards as code: they import as they are, and every panel query runs.

Structure is checked on the JSON; then every panel query of both dashboards is executed against a
real InfluxDB 1.x (the ``Influxd`` of tests/conftest.py) over a synthetic week written through the
sink's own point builders (``careflow.hub.sinks.influx.points``), so the dashboards and the sink cannot
drift apart unnoticed. Variables are substituted the way Grafana does it: ``$timeFilter`` as
``time >= <from>ms and time <= <to>ms``, ``$__interval`` as ``1h``, and "All" of a multi-value
variable as its custom all value ``.*`` (a selection of values as ``(a|b)``).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from careflow.core import clock
from careflow.hub.fleet.sites import SiteBook
from careflow.hub.sinks.influx.points import (
    DeviceSnapshot,
    device_status_points,
    event_points,
    hub_points,
    incident_points,
    presence_points,
)
from careflow.hub.store.records import Incident, PresenceChange, StoredEvent
from tests.conftest import Influxd

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARDS = {path.stem: json.loads(path.read_text())
              for path in sorted((GRAFANA / "dashboards").glob("*.json"))}

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
NOW_MS = clock.now_ms() // MINUTE_MS * MINUTE_MS
START_MS = NOW_MS - 7 * DAY_MS  # the synthetic week
MID_MS = START_MS + 7 * DAY_MS // 2  # gw-3 goes offline here and stays offline
SNAPSHOT_EVERY_MS = 10 * MINUTE_MS  # the sink writes each minute; coarser is the same mean

# gateway -> (site, sensors)
FLEET = {"gw-1": ("oslo-12", ("fall-1", "door-1")),
         "gw-2": ("oslo-12", ("sos-2",)),
         "gw-3": ("bergen-3", ("door-3",))}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries() -> list[Any]:
    """(dashboard, panel title, refId, query) for every target, as pytest params."""
    return [pytest.param(name, panel["title"], target["refId"], target["query"],
                         id=f"{name}:{panel['title']}:{target['refId']}")
            for name, dashboard in DASHBOARDS.items() for panel in panels(dashboard)
            for target in panel.get("targets", [])]


def interpolate(query: str, *, site: str = ".*", gateway: str = ".*") -> str:
    """What Grafana sends for ``query`` over the synthetic week."""
    time_filter = f"time >= {START_MS - HOUR_MS}ms and time <= {NOW_MS + MINUTE_MS}ms"
    return (query.replace("$timeFilter", time_filter).replace("$__interval", "1h")
            .replace("$site", site).replace("$gateway", gateway))


# -- the synthetic week ------------------------------------------------------------------------


class Week:
    """Builds the records of a week of a small fleet and their points, as the sink would."""

    def __init__(self) -> None:
        self.sites = SiteBook()
        self.points: list[str] = []
        self.pos = 0
        self.seq: dict[str, int] = {}

    def event(self, gateway: str, device: str, type_: str, at_ms: int,
              data: dict[str, Any]) -> None:
        self.pos += 1
        seq = self.seq[device] = self.seq.get(device, 0) + 1
        body = {"v": 1, "id": f"ev-{self.pos}", "type": type_, "gateway": gateway,
                "device": device, "time": "", "boot": "boot-1", "seq": seq, "data": data}
        event = StoredEvent(self.pos, f"ev-{self.pos}", gateway, device, type_, "", at_ms,
                            at_ms + 40, "boot-1", seq, json.dumps(body))
        self.sites.learn(event, data)
        self.points += event_points(event, data, self.sites.site_of(gateway))

    def build(self) -> list[str]:
        for gateway, (site, sensors) in FLEET.items():
            self.event(gateway, gateway, "provision", START_MS, {
                "action": "added", "kind": "gateway", "serial": f"GW-{gateway}",
                "labels": {"site": site}})
            for sensor in sensors:
                self.event(gateway, sensor, "provision", START_MS + MINUTE_MS, {
                    "action": "added", "kind": sensor.split("-")[0] + "-sensor",
                    "serial": f"S-{sensor}", "labels": {"site": site}})
        self._traffic()
        self._presence()
        self._incidents()
        self._snapshots()
        return self.points

    def _traffic(self) -> None:
        for step, at_ms in enumerate(range(START_MS + HOUR_MS, NOW_MS, HOUR_MS)):
            for gateway, (_site, sensors) in FLEET.items():
                if gateway == "gw-3" and at_ms >= MID_MS:
                    continue  # offline: says nothing
                self.event(gateway, gateway, "heartbeat", at_ms, {
                    "interval_s": 60, "uptime_s": step * 3600.0, "cpu_pct": 10 + step % 7,
                    "firmware": "gw-2.4.1"})
                for sensor in sensors:
                    battery = 12 if sensor == "door-1" and at_ms > NOW_MS - DAY_MS else 80
                    self.event(gateway, sensor, "heartbeat", at_ms + MINUTE_MS,
                               {"interval_s": 300, "battery_pct": battery})
        self.event("gw-1", "door-1", "status", NOW_MS - 2 * HOUR_MS, {
            "state": "degraded", "battery_pct": 12, "message": "battery low"})
        for n in range(12):
            self.event("gw-2", "gw-2", "error", START_MS + DAY_MS + n * MINUTE_MS, {
                "code": "ZB_COORDINATOR_RESET", "message": "Zigbee coordinator reset",
                "severity": "error", "component": "zigbee"})
        self.event("gw-1", "fall-1", "alert", NOW_MS - 3 * HOUR_MS, {
            "kind": "fall", "state": "raised", "location": "bathroom"})
        self.event("gw-1", "fall-1", "alert", NOW_MS - 3 * HOUR_MS + 5 * MINUTE_MS, {
            "kind": "fall", "state": "cleared", "location": "bathroom"})
        self.event("gw-2", "sos-2", "alert", NOW_MS - 30 * HOUR_MS, {
            "kind": "sos", "state": "raised"})

    def _presence(self) -> None:
        changes = [PresenceChange(n + 1, gw, "online", 1, "boot-1", START_MS, None)
                   for n, gw in enumerate(FLEET)]
        changes.append(PresenceChange(4, "gw-3", "offline", 1, "boot-1", MID_MS, "will"))
        for change in changes:
            self.points += presence_points(change, self.sites.site_of(change.gateway))

    def _incidents(self) -> None:
        def incident(id_: int, rule: str, gateway: str, device: str, severity: str,
                     at_ms: int, ack_s: int | None, resolve_s: int | None) -> Incident:
            state = "resolved" if resolve_s else "acknowledged" if ack_s else "open"
            return Incident(id_, rule, gateway, device, severity, state, f"{rule} {device}", "",
                            at_ms, at_ms + ack_s * 1000 if ack_s else None,
                            "ana" if ack_s else None,
                            at_ms + resolve_s * 1000 if resolve_s else None,
                            "rules" if resolve_s else None)
        for item in (
            incident(1, "error-burst", "gw-2", "gw-2", "warning", START_MS + DAY_MS, 120, 1800),
            incident(2, "care-alarm", "gw-2", "sos-2", "critical", NOW_MS - 30 * HOUR_MS,
                     240, 3600),
            incident(3, "gateway-offline", "gw-3", "gw-3", "critical", MID_MS + 2 * MINUTE_MS,
                     300, None),
            incident(4, "battery-low", "gw-1", "door-1", "warning", NOW_MS - DAY_MS + HOUR_MS,
                     None, None),
        ):
            self.points += incident_points(item, self.sites.site_of(item.gateway))

    def _snapshots(self) -> None:
        for at_ms in range(START_MS, NOW_MS + 1, SNAPSHOT_EVERY_MS):
            snaps = []
            for gateway, (_site, sensors) in FLEET.items():
                up = not (gateway == "gw-3" and at_ms >= MID_MS)
                last_seen = at_ms if up else MID_MS
                for device in (gateway, *sensors):
                    snaps.append(DeviceSnapshot(gateway, device, up,
                                                (at_ms - last_seen) / 1000, last_seen))
            self.points += device_status_points(snaps, self.sites, at_ms)
            self.points += hub_points(
                {"events_per_s": 3.5, "commit_latency_ms": 4.2, "event_age_ms": 80.0,
                 "queue_depth": 0, "dead_lettered": 2, "connected": True},
                hub="hub-1", backlog_events=0, open_incidents=2, now_ms=at_ms)


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    """One InfluxDB for the module, holding the synthetic week."""
    server = Influxd(tmp_path_factory.mktemp("influxd"))
    server.start()
    server.create_database()
    body = "\n".join(Week().build()).encode()
    request = urllib.request.Request(f"{server.url}/write?db=careflow&precision=ns", data=body)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204
    yield server
    server.stop()


def rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Series flattened to one dict per row, tags included."""
    return [{**s.get("tags", {}), **dict(zip(s["columns"], values, strict=True))}
            for s in series for values in s["values"]]


# -- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_it_is_an_importable_dashboard(name: str) -> None:
    dashboard = DASHBOARDS[name]
    assert dashboard["uid"] == f"careflow-{name}"
    assert dashboard["title"].startswith("careflow")
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None  # an id would clash on import
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in panels(dashboard)]
    assert len(titles) == len(set(titles))  # people (and these tests) find panels by title
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys()
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "influxdb", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["rawQuery"] is True
            assert target["query"].strip()
            assert target["resultFormat"] in {"time_series", "table"}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_it_has_the_datasource_site_and_gateway_variables(name: str) -> None:
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "influxdb"
    for key in ("site", "gateway"):
        variable = variables[key]
        assert variable["type"] == "query"
        assert variable["multi"] and variable["includeAll"]
        assert variable["allValue"] == ".*"
        assert variable["datasource"] == {"type": "influxdb", "uid": "${datasource}"}


def test_it_uses_only_standard_macros_and_its_own_variables() -> None:
    allowed = {"timeFilter", "__interval", "site", "gateway", "tag_gateway", "tag_site",
               "tag_kind", "tag_device", "tag_severity", "tag_hub", "col"}
    for name, dashboard in DASHBOARDS.items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                text = target["query"] + " " + target.get("alias", "")
                used = set(re.findall(r"\$\{?(\w+)", text)) - {"$"}
                assert used <= allowed, (name, panel["title"], used - allowed)


def test_it_defaults_management_to_a_week_with_7d_and_30d_at_hand() -> None:
    management = DASHBOARDS["management"]
    assert management["time"] == {"from": "now-7d", "to": "now"}
    assert management["timepicker"]["time_options"] == ["7d", "30d"]
    urls = [link.get("url", "") for link in management["links"]]
    assert any("from=now-7d" in url for url in urls)
    assert any("from=now-30d" in url for url in urls)


def test_it_provisions_the_datasource_from_the_environment() -> None:
    text = (GRAFANA / "provisioning" / "datasources" / "careflow.yaml").read_text()
    assert "uid: careflow-influx" in text
    assert "type: influxdb" in text
    assert "$CAREFLOW_INFLUX_URL" in text
    assert "InfluxQL" in text
    provider = (GRAFANA / "provisioning" / "dashboards" / "careflow.yaml").read_text()
    assert "type: file" in provider


# -- every query runs against a real InfluxDB --------------------------------------------------


@pytest.mark.parametrize(("name", "title", "ref_id", "query"), queries())
def test_it_answers_every_panel_query(influx: Influxd, name: str, title: str, ref_id: str,
                                      query: str) -> None:
    series = influx.query(interpolate(query))
    assert rows(series), f"{name} / {title} / {ref_id} returned nothing"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_it_answers_the_variable_queries(influx: Influxd, name: str) -> None:
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    sites = {row["value"] for row in rows(influx.query(interpolate(variables["site"]["query"])))}
    assert sites == {"oslo-12", "bergen-3"}
    gateways = rows(influx.query(interpolate(variables["gateway"]["query"], site="(bergen-3)")))
    assert {row["value"] for row in gateways} == {"gw-3"}


def target(dashboard: str, title: str, ref_id: str = "A") -> str:
    """The query of one panel target."""
    panel = next(p for p in panels(DASHBOARDS[dashboard]) if p["title"] == title)
    return str(next(t for t in panel["targets"] if t["refId"] == ref_id)["query"])


def test_it_shows_half_uptime_for_a_site_whose_only_gateway_was_down_half_the_week(
        influx: Influxd) -> None:
    result = rows(influx.query(interpolate(target("management", "Uptime % by site"))))
    uptime = {row["site"]: row["uptime"] for row in result}
    assert uptime["oslo-12"] == pytest.approx(100)
    assert uptime["bergen-3"] == pytest.approx(50, abs=1)
    only = rows(influx.query(interpolate(target("management", "Uptime % by site"),
                                         site="(bergen-3)")))
    assert [row["site"] for row in only] == ["bergen-3"]


def test_it_lists_what_is_offline_now_and_what_is_still_open(influx: Influxd) -> None:
    offline = rows(influx.query(interpolate(target("operational", "Offline gateways and devices"))))
    assert {(row["gateway"], row["device"]) for row in offline} == {("gw-3", "gw-3"),
                                                                   ("gw-3", "door-3")}
    assert all(row["last_seen_ms"] == MID_MS for row in offline)
    still_open = rows(influx.query(interpolate(
        target("operational", "Open incidents by rule and gateway"))))
    assert {(row["rule"], row["gateway"]) for row in still_open} == {
        ("gateway-offline", "gw-3"), ("battery-low", "gw-1")}
    online = rows(influx.query(interpolate(target("operational", "Fleet online now"))))
    assert online[0]["gateways online"] == 2 and online[0]["gateways"] == 3


def test_it_finds_the_low_battery_and_the_mean_times(influx: Influxd) -> None:
    low = rows(influx.query(interpolate(target("operational", "Low batteries"))))
    assert [(row["device"], row["pct"]) for row in low] == [("door-1", 12)]
    mtta = rows(influx.query(interpolate(target("management", "MTTA"))))
    assert mtta[0]["MTTA"] == pytest.approx((120 + 240 + 300) / 3)
    mttr = rows(influx.query(interpolate(target("management", "MTTR"))))
    assert mttr[0]["MTTR"] == pytest.approx((1800 + 3600) / 2)
    provisioned = rows(influx.query(interpolate(target("management", "Devices provisioned"))))
    assert provisioned[0]["provisioned"] == 7
