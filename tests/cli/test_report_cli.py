"""`careflow report` over a real hub store: terminal, --json and the self-contained --html page."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import PresenceUpdate
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from tests.conftest import careflow_cmd, store_event

DAY_MS = 86_400_000


def _presence(store: SqliteStore, gateway: str, state: str, at_ms: int) -> None:
    update = PresenceUpdate(gateway, state, 1, "boot-1", "will" if state == "offline" else None)
    store.append(IncomingBatch(accepted=(), rejected=(), presence=[(update, at_ms)]))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A hub store with a week: gw-1 (oslo-12) always online, gw-2 (bergen-3) down half of it."""
    now = clock.now_ms()
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteStore(data / "careflow.db", synchronous="normal")
    for gateway, site in (("gw-1", "oslo-12"), ("gw-2", "bergen-3")):
        gw = Stamper(gateway=gateway, device=gateway, boot="boot-1")
        store_event(store, gw, "provision", {"action": "added", "kind": "gateway",
                                        "labels": {"site": site}}, now - 6 * DAY_MS)
        store_event(store, gw, "heartbeat", {"interval_s": 60}, now - DAY_MS)
        _presence(store, gateway, "online", now - 10 * DAY_MS)
    door = Stamper(gateway="gw-1", device="door-1", boot="boot-1")
    store_event(store, door, "provision", {"action": "added", "kind": "door-sensor",
                                      "labels": {"site": "oslo-12"}}, now - 5 * DAY_MS)
    _presence(store, "gw-2", "offline", now - 7 * DAY_MS // 2)
    first = store.open_incident(rule="gateway-offline", gateway="gw-2", device="gw-2",
                                severity="critical", summary="gw-2 offline", detail="",
                                at_ms=now - 7 * DAY_MS // 2)
    assert first is not None
    store.acknowledge_incident(first, by="ana", at_ms=now - 7 * DAY_MS // 2 + 300_000)
    second = store.open_incident(rule="error-burst", gateway="gw-1", device="gw-1",
                                 severity="warning", summary="errors", detail="",
                                 at_ms=now - 2 * DAY_MS)
    assert second is not None
    store.acknowledge_incident(second, by="ana", at_ms=now - 2 * DAY_MS + 120_000)
    store.resolve_incident(second, by="rules", at_ms=now - 2 * DAY_MS + 1_800_000)
    store.close()
    return data


def report(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(careflow_cmd("report", "--data-dir", str(data_dir), *args),
                          env={**os.environ, "COLUMNS": "120"}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_it_reports_uptime_incidents_and_mean_times_as_json(data_dir: Path) -> None:
    result = json.loads(report(data_dir, "--json").stdout)
    assert result["days"] == 7
    sites = {s["site"]: s["uptime_pct"] for s in result["sites"]}
    assert sites["oslo-12"] == pytest.approx(100)
    assert sites["bergen-3"] == pytest.approx(50, abs=0.1)
    assert result["uptime_pct"] == pytest.approx(75, abs=0.1)
    assert {(i["rule"], i["severity"], i["count"]) for i in result["incidents"]} == {
        ("gateway-offline", "critical", 1), ("error-burst", "warning", 1)}
    assert result["mtta_s"] == pytest.approx((300 + 120) / 2)
    assert result["mttr_s"] == pytest.approx(1800)
    assert result["provisioned"] == {"door-sensor": 1, "gateway": 2}
    assert (result["devices_active"], result["devices_total"]) == (3, 3)
    assert len(result["per_day"]) == 8  # 7 days from now back touch 8 UTC dates


def test_it_prints_the_summary_in_the_terminal(data_dir: Path) -> None:
    out = report(data_dir, "--days", "30").stdout
    assert "last 30 days" in out
    assert "Uptime by site" in out and "bergen-3" in out and "oslo-12" in out
    assert "gateway-offline" in out and "MTTA" in out


def test_it_writes_a_self_contained_html_page(data_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    report(data_dir, "--days", "30", "--html", str(page))
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("<svg") == 3
    assert "bergen-3" in html and "gateway-offline" in html
    # nothing is fetched: no scripts, links, images, imports or URLs but the SVG namespace
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|src=|href=", html, re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}


def test_it_says_where_to_look_when_there_is_no_store(tmp_path: Path) -> None:
    done = subprocess.run(careflow_cmd("report", "--data-dir", str(tmp_path / "none")),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "careflow hub" in done.stdout + done.stderr
