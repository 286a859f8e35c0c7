"""mqtts:// with a client certificate: the agent reaches a real Mosquitto that requires one."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from careflow.core.config import parse_broker_url
from careflow.edge.agent import AgentConfig, EdgeAgent
from careflow.hub.store.records import EventFilter
from tests.conftest import MOSQUITTO, RunningHub, free_port, wait_for_port, wait_until

pytestmark = pytest.mark.broker


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=pki)
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]),
                        ("gw-tls", [])):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", *extra,
                cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-copy_extensions",
                "copy", cwd=pki)
    plain, secure = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        "user root\nper_listener_settings true\n"
        f"listener {plain} 127.0.0.1\nallow_anonymous true\n"
        f"listener {secure} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"log_dest file {tmp_path}/mosquitto.log\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)])
    wait_for_port(plain)
    wait_for_port(secure)
    yield plain, secure, pki
    proc.terminate()
    proc.wait(timeout=10)


def test_it_publishes_over_mutual_tls(tls_broker: tuple[int, int, Path],
                                      hub_factory: Callable[..., RunningHub],
                                      tmp_path: Path) -> None:
    plain, secure, pki = tls_broker
    hub = hub_factory(f"mqtt://127.0.0.1:{plain}")
    agent = EdgeAgent(AgentConfig(
        gateway="gw-tls", broker=parse_broker_url(f"mqtts://127.0.0.1:{secure}"),
        data_dir=tmp_path / "edge", ca_file=pki / "ca.crt", cert_file=pki / "gw-tls.crt",
        key_file=pki / "gw-tls.key", batch_linger_s=0.1))
    agent.start()
    try:
        wait_until(lambda: agent.connected, what="TLS connection")
        agent.add("gw-tls", "status", {"state": "ok"})
        agent.tick()
        wait_until(lambda: hub.store.count(EventFilter(gateway="gw-tls", type="status")) == 1,
                   what="event over TLS")
    finally:
        agent.shutdown()


def test_it_is_refused_without_a_client_certificate(tls_broker: tuple[int, int, Path],
                                                    tmp_path: Path) -> None:
    _, secure, pki = tls_broker
    agent = EdgeAgent(AgentConfig(
        gateway="gw-anon", broker=parse_broker_url(f"mqtts://127.0.0.1:{secure}"),
        data_dir=tmp_path / "edge", ca_file=pki / "ca.crt"))
    agent.start()
    try:
        with pytest.raises(pytest.fail.Exception):
            wait_until(lambda: agent.connected, timeout_s=3, what="a refused connection")
    finally:
        agent.shutdown()
