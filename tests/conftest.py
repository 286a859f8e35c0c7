"""Shared fixtures: real Mosquitto brokers on free ports, event builders, a hub in a thread."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from careflow.core.config import Settings, load_settings
from careflow.edge.stamper import Stamper
from careflow.hub.alerting.incidents import AlertStage
from careflow.hub.alerting.notify import Channel, load_channels
from careflow.hub.alerting.rules import RuleSet, load_rules
from careflow.hub.app import Auto, build_hub
from careflow.hub.ingest.decode import decode_message
from careflow.hub.sinks.influx.sink import EVENTS_CURSOR
from careflow.hub.store.records import IncomingBatch
from careflow.hub.store.sqlite_store import SqliteStore
from careflow.provisioning.service import Activation
from careflow.schemas import event_topic

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# Every hub a test starts (in-process or `careflow hub` as a child, which inherits this) serves
# its web on a free port, never the default 8080: hubs run side by side in some tests. A test of
# the default passes its own environment.
os.environ["CAREFLOW_HTTP_LISTEN"] = "127.0.0.1:0"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts TCP on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def wait_until(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true or fail the test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


class Mosquitto:
    """A real Mosquitto on a free loopback port with its own config and persistence dir."""

    def __init__(self, workdir: Path, *, max_packet_size: int = 1048576) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            "user root\n"  # as root, Mosquitto would drop to a user who cannot read tmp dirs
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            f"max_packet_size {max_packet_size}\n"
            f"log_dest file {workdir}/mosquitto.log\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def make_settings(data_dir: Path, broker_url: str | None, **env: str) -> Settings:
    """Settings as the CLI would build them, from an explicit environment."""
    base = {"CAREFLOW_DATA_DIR": str(data_dir), "CAREFLOW_SQLITE_SYNC": "normal",
            "CAREFLOW_HTTP_LISTEN": "127.0.0.1:0", **env}
    if broker_url:
        base["CAREFLOW_BROKER_URL"] = broker_url
    return load_settings(base)


class RunningHub:
    """A hub wired by careflow.hub.app.build_hub, ingesting in a background thread of the test
    process: no data directory lock, no InfluxDB snapshots, no dead man's switch; alerting only
    with ``rules``, a notification sender only with ``channels``, the embedded broker only when
    asked, provisioning as given (AUTO: the claim service of CAREFLOW_PKI_DIR), and the on-call
    web only with ``web`` (on a free port: ``hub.web.url``), the operations agent's loop only
    with ``agent``."""

    def __init__(self, settings: Settings, rules: RuleSet | None = None,
                 provisioning: Activation | Auto | None = None, *,
                 channels: Mapping[str, Channel] | None = None,
                 decode_worker: bool = False, embedded_broker: bool = False,
                 web: bool = False, agent: bool = False) -> None:
        self.settings = settings
        self.hub = build_hub(settings, lock=None, embedded_broker=embedded_broker, rules=rules,
                             channels=channels or {}, provisioning=provisioning,
                             decode_worker=decode_worker, influx_snapshots=False, deadman=False,
                             web=web, agent=agent)
        self.store = self.hub.store
        self.service = self.hub.service
        self.alerts = self.hub.alerts
        self.sender = self.hub.sender
        self.provisioning = self.hub.provisioning  # the claim service, with provisioning=AUTO
        self.thread: threading.Thread | None = None

    @property
    def error(self) -> BaseException | None:
        return self.hub.error

    def start(self) -> RunningHub:
        self.hub.start()
        self.thread = self.hub.run_in_thread()
        wait_until(lambda: self.service.ingress.connected or self.error is not None,
                   what="hub to connect")
        if self.error:
            self.hub.close()
            raise self.error
        return self

    def sink_backlog(self) -> int:
        """Events stored but not yet confirmed by InfluxDB."""
        return self.store.last_pos() - self.store.cursor(EVENTS_CURSOR)

    def stop(self) -> None:
        self.hub.close()
        if self.error:
            raise self.error


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., RunningHub]]:
    hubs: list[RunningHub] = []

    def start(broker_url: str, rules: RuleSet | None = None, **env: str) -> RunningHub:
        hub = RunningHub(make_settings(tmp_path / "data", broker_url, **env), rules).start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        if hub.thread is not None and hub.thread.is_alive():
            hub.stop()


# Port 9 (discard) on loopback: notifications are queued for oncall and ops, never delivered.
UNREACHABLE_CHANNELS = {"CAREFLOW_CHANNEL_ONCALL": "json://127.0.0.1:9/a",
                        "CAREFLOW_CHANNEL_OPS": "json://127.0.0.1:9/b"}


def alert_stage(tmp_path: Path, rules: str, **store_options: Any,
                ) -> tuple[SqliteStore, AlertStage]:
    """A store at ``tmp_path``/db and the alert stage of ``rules`` (YAML) over it, on
    UNREACHABLE_CHANNELS; called again on the same path, a restarted hub's."""
    (tmp_path / "r.yaml").write_text(rules)
    store = SqliteStore(tmp_path / "db", **store_options)
    return store, AlertStage(store, load_rules([tmp_path / "r.yaml"]),
                             load_channels(UNREACHABLE_CHANNELS))


def careflow_cmd(*args: str) -> list[str]:
    """The careflow CLI of this checkout, run with this interpreter."""
    return [sys.executable, "-m", "careflow.cli", *args]


class HubProcess:
    """``careflow hub`` as a real process, to be killed and started again on the same data.

    ``rules`` (YAML) go in tmp_path/rules, the data in tmp_path/data, every run's output is
    appended to tmp_path/hub.log; channels oncall and ops post to a json:// receiver at
    ``receiver_port``. ``env`` adds settings.
    """

    def __init__(self, tmp_path: Path, broker_url: str, rules: str, receiver_port: int,
                 **env: str) -> None:
        (tmp_path / "rules").mkdir()
        (tmp_path / "rules" / "r.yaml").write_text(rules)
        self.data_dir = tmp_path / "data"
        self.db = self.data_dir / "careflow.db"
        self.log = tmp_path / "hub.log"
        self.env = {**os.environ, "CAREFLOW_DATA_DIR": str(self.data_dir),
                    "CAREFLOW_BROKER_URL": broker_url,
                    "CAREFLOW_RULES_DIR": str(tmp_path / "rules"),
                    "CAREFLOW_CHANNEL_ONCALL": f"json://127.0.0.1:{receiver_port}/oncall",
                    "CAREFLOW_CHANNEL_OPS": f"json://127.0.0.1:{receiver_port}/ops", **env}

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as sink:
            return subprocess.Popen(careflow_cmd("hub"), env=self.env, stdout=sink, stderr=sink)


@pytest.fixture
def stamper() -> Callable[..., Stamper]:
    def make(gateway: str = "gw-1", device: str | None = None, boot: str = "boot-1") -> Stamper:
        return Stamper(gateway=gateway, device=device or gateway, boot=boot)

    return make


def heartbeat(stamper: Stamper, **data: Any) -> dict[str, Any]:
    """A valid heartbeat event from ``stamper``."""
    return stamper.stamp("heartbeat", {"interval_s": 60, **data})


def store_event(store: SqliteStore, stamper: Stamper, type_: str, data: dict[str, object],
                at_ms: int) -> None:
    """Stamp an event at ``at_ms``, decode it as the hub does and store it as received then."""
    event = stamper.stamp(type_, data, at=datetime.fromtimestamp(at_ms / 1000, tz=UTC))
    decoded = decode_message(event_topic(stamper.gateway, stamper.device, type_),
                             json.dumps(event).encode(), max_bytes=1 << 20)
    assert decoded.accepted, decoded.rejected
    store.append(IncomingBatch(accepted=[(decoded.accepted[0], at_ms)], rejected=()))


class HttpReceiver:
    """A real HTTP server on a free loopback port that records what it is sent (webhooks,
    dead man's switch pings): ``requests`` holds (method, path, JSON body or None, time)."""

    def __init__(self) -> None:
        import json  # noqa: PLC0415
        from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: PLC0415

        self.requests: list[tuple[str, str, Any, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                receiver.requests.append((self.command, self.path, body, time.time()))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = _record  # noqa: N815

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def bodies(self) -> list[Any]:
        """The JSON bodies received, in order."""
        return [body for _, _, body, _ in self.requests if body is not None]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


class JsonReceiver:
    """A real threaded HTTP server behind Apprise ``json://`` channels: records each request
    (path, JSON body) as it arrives, answers ``status`` (400 to a message longer than
    ``max_chars``, as Discord does), and holds the answer to requests on ``hold_path`` (only the
    first one if ``hold_first_only``) until ``release`` is set: a channel slow to answer."""

    def __init__(self, *, status: int = 200, hold_path: str | None = None,
                 hold_first_only: bool = False, max_chars: int | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415

        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.status = status  # what it answers from now on
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((self.path, body))
                if self.path == hold_path and (
                        not hold_first_only or len(receiver.to(self.path)) == 1):
                    receiver.release.wait(60)
                too_long = max_chars is not None and len(body["message"]) > max_chars
                self.send_response(400 if too_long else receiver.status)
                self.end_headers()
                self.wfile.write(b"answer from the receiver")

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str, query: str = "") -> str:
        return f"json://127.0.0.1:{self.port}{path}{query}"

    def to(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.requests if p == path]

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"


class Influxd:
    """A real InfluxDB 1.x (Debian's influxd) on free loopback ports with temporary data/meta dirs.

    It serves `/write` and InfluxQL `/query`; InfluxDB 1.6 has no `/api/v2/write`.
    """

    def __init__(self, workdir: Path, *, max_body_size: int = 25_000_000) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "influxdb.conf"
        self.conf.write_text(
            "reporting-enabled = false\n"
            f'bind-address = "127.0.0.1:{free_port()}"\n'
            f'[meta]\n  dir = "{workdir}/meta"\n'
            f'[data]\n  dir = "{workdir}/data"\n  wal-dir = "{workdir}/wal"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            f"  max-body-size = {max_body_size}\n"
            "[continuous_queries]\n  enabled = false\n"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not os.path.exists(INFLUXD):
            pytest.skip("influxd is not installed (apt-get install influxdb; .ci/run does)")
        log = (self.workdir / "influxd.log").open("ab")
        self.proc = subprocess.Popen([INFLUXD, "-config", str(self.conf)],
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._pings, timeout_s=20, what="influxd to answer /ping")

    def _pings(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as response:
                return int(response.status) == 204
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def query(self, q: str, db: str = "careflow") -> list[dict[str, Any]]:
        """Run InfluxQL; the series of the first statement (raises on an error result)."""
        body = urllib.parse.urlencode({"q": q, "db": db, "epoch": "ms"}).encode()
        with urllib.request.urlopen(f"{self.url}/query", data=body, timeout=10) as response:
            result = json.loads(response.read())["results"][0]
        if "error" in result:
            raise AssertionError(f"InfluxQL error for {q!r}: {result['error']}")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def create_database(self, db: str = "careflow") -> None:
        self.query(f'CREATE DATABASE "{db}"', db=db)


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[Influxd]:
    workdir = tmp_path / "influxd"
    workdir.mkdir()
    server = Influxd(workdir)
    server.start()
    yield server
    server.stop()


# -- a real browser: Debian's chromium, driven by Playwright (no browser download) ------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots and other artefacts of the browser tests, kept after the run to be looked at.
ARTIFACTS = Path(os.environ.get("CAREFLOW_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent.parent / "build" / "test-artifacts")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless chromium for the session (a page per test: see ``page_at``)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("the browser tests need Debian's chromium (apt-get install chromium; "
                    ".ci/run does)")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 (only browser tests)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page_at(chromium: Any) -> Iterator[Callable[..., Any]]:
    """New pages in a fresh browser context (its own cookies) at a viewport (``PHONE`` or
    ``DESKTOP``), closed after the test."""
    contexts: list[Any] = []

    def open_page(viewport: Mapping[str, int] = DESKTOP) -> Any:
        context = chromium.new_context(viewport=dict(viewport))
        contexts.append(context)
        return context.new_page()

    yield open_page
    for context in contexts:
        context.close()


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as a test artefact (build/test-artifacts/screenshots)."""
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path
