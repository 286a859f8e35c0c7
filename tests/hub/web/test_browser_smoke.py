"""The browser tests' own footing: Debian's chromium under Playwright opens the hub's web."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import PHONE, RunningHub, make_settings, screenshot


def test_chromium_opens_the_hubs_health_probe(tmp_path: Path, mosquitto: Any,
                                              page_at: Any) -> None:
    hub = RunningHub(make_settings(tmp_path / "data", mosquitto.url), web=True).start()
    try:
        assert hub.hub.web is not None
        page = page_at(PHONE)
        response = page.goto(f"{hub.hub.web.url}/healthz")
        assert response is not None and response.status == 200
        assert '"ok"' in page.content()
        assert screenshot(page, "healthz-phone").stat().st_size > 0
    finally:
        hub.stop()
