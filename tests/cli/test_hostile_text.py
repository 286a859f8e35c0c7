"""Device-supplied text in every terminal view, shown as the text it is (real CLI processes over a
real hub store): Rich markup in a firmware string once failed `devices list` for the whole fleet.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from careflow.cli.common import literal
from careflow.core import clock
from careflow.edge.stamper import Stamper
from careflow.hub.ingest.decode import decode_message
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.provisioning.claims import hash_token
from careflow.provisioning.registry import SqliteProvisioningRegistry
from careflow.schemas import event_topic
from tests.conftest import careflow_cmd, store_event

# Markup Rich would choke on, markup it would obey, and a hyperlink it would emit.
HOSTILE = ("[/]", "[bold red]x[/]", "[link=http://evil]y")
ESCAPE = "fw\x1b[2J"  # clears the operator's screen if passed through


def _dead_letter(store: SqliteStore, topic: str, payload: bytes, at_ms: int) -> None:
    decoded = decode_message(topic, payload, max_bytes=1 << 20)
    assert decoded.rejected
    store.append(IncomingBatch(accepted=(), rejected=[(r, at_ms) for r in decoded.rejected]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub store where devices said hostile things in every field an operator reads."""
    data = tmp_path_factory.mktemp("hostile") / "data"
    data.mkdir()
    now = clock.now_ms()
    store = SqliteStore(data / "careflow.db", synchronous="normal")
    for index, text in enumerate((*HOSTILE, ESCAPE)):
        gateway = f"gw-{index}"
        gw = Stamper(gateway=gateway, device=gateway, boot="boot-1")
        store_event(store, gw, "provision", {"action": "added", "kind": "gateway", "firmware": text,
                                        "labels": {"site": text}}, now - 3_600_000)
        store_event(store, gw, "heartbeat", {"interval_s": 60, "firmware": text}, now - 1000)
        store_event(store, gw, "error", {"code": "E_X", "message": text}, now - 900)
        _dead_letter(store, event_topic(gateway, gateway, "status"),
                     f"{text} is not JSON".encode(), now - 500)
        _dead_letter(store, f"careflow/v1/{text}/x", b"{}", now - 400)
        incident = store.open_incident(
            rule="error-burst", gateway=gateway, device=gateway, severity="warning",
            summary=f"errors: {text}", detail=f"last message: {text}", at_ms=now - 800,
            notify=[("ops", f"careflow: {text}", f"body {text}")])
        assert incident is not None
        [claimed] = store.claim_notifications(now_ms=now, limit=1)
        store.finish_notification(claimed.id, ok=False, now_ms=now, error=f"refused: {text}",
                                  final=True)
    store.write_health({"connected": True, "problem": f"certificates: {HOSTILE[0]}"})
    store.close()
    registry = SqliteProvisioningRegistry(data / "careflow.db", synchronous="normal")
    registry.register(serial="SN-1", site="lab", gateway_id="gw-sn-1",
                      token_hash=hash_token("t"), token_expires_ms=now + 60_000, replace=False,
                      now_ms=now)
    registry.record_error("SN-1", f"claim refused: csr_invalid: {HOSTILE[1]}", now_ms=now)
    registry.close()
    return data


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_")},
           "CAREFLOW_DATA_DIR": str(data_dir), "COLUMNS": "250"}
    return subprocess.run(careflow_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=60, check=False)


ONE = (HOSTILE[1],)  # views of one record: gw-1, incident 2, serial SN-1


@pytest.mark.parametrize(("command", "expected"), [
    (("devices", "list", "--wide"), HOSTILE),  # site and firmware are wide columns
    (("devices", "show", "gw-1"), ONE),
    (("events", "query", "--type", "error"), HOSTILE),
    (("deadletter", "list"), HOSTILE),
    (("incidents", "list"), HOSTILE),
    (("incidents", "show", "2"), ONE),
    (("notify", "list"), HOSTILE),
    (("report",), HOSTILE),
    (("provision", "list"), ONE),
])
def test_every_view_shows_device_text_literally(data_dir: Path, command: tuple[str, ...],
                                                expected: tuple[str, ...]) -> None:
    done = cli(data_dir, *command)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # no escape sequence reaches the terminal
    for text in expected:
        assert text in done.stdout, done.stdout


def test_control_characters_are_shown_not_obeyed(data_dir: Path) -> None:
    done = cli(data_dir, "devices", "list", "--wide")
    assert "fw\\x1b[2J" in done.stdout and "\x1b" not in done.stdout


def test_status_shows_a_hostile_problem_literally(data_dir: Path) -> None:
    done = cli(data_dir, "status")
    assert "certificates: [/]" in done.stdout, done.stderr
    assert done.returncode in (0, 1)  # 1: the health report is older than 5 s by now


def test_the_terminal_report_shows_hostile_sites(data_dir: Path) -> None:
    done = cli(data_dir, "report", "--days", "1")
    assert done.returncode == 0, done.stderr
    for text in HOSTILE:
        assert text in done.stdout


@pytest.mark.parametrize("mark", ["\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u202a",
                                  "\u202b", "\u202c", "\u202d", "\u200e", "\u200f"])
def test_direction_marks_are_shown_not_obeyed(mark: str) -> None:
    """A right-to-left override in device text (a site label, a dead letter's topic) would make
    ``gw-1\\u202e3-ws`` read as another gateway on the operator's terminal: every bidirectional
    control is shown as its code."""
    shown = literal(f"gw-1{mark}3-ws")
    assert shown == f"gw-1\\u{ord(mark):04x}3-ws"
