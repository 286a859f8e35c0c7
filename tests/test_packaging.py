"""careflow from a wheel, as a new user installs it: a fresh venv, run from an unrelated directory.

The wheel is built once per session from a copy of this checkout (the build writes build/ and
*.egg-info next to the sources). Its dependencies come from the test interpreter's site-packages
through a .pth line (they are not what is under test, and installing ~40 packages per run would
cost a minute); careflow itself is imported only from the wheel, which the test checks.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from careflow.config import TlsFiles
from tests.conftest import free_port, wait_until
from tests.provisioning.conftest import mqtt_handshake

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
_BUILD_LEFTOVERS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                          "__pycache__", ".*_cache", ".hypothesis", "careflow-data")


def _not_sources(folder: str, names: list[str]) -> set[str]:
    """What the wheel is not built from: build leftovers, and the checkout's own tests."""
    skipped = set(_BUILD_LEFTOVERS(folder, names))
    if Path(folder) == ROOT:
        skipped |= {"tests", "bench"} & set(names)
    return skipped

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """careflow's wheel, built by pip from a copy of the sources."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, work / "src", ignore=_not_sources)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"),
                    str(work / "src")], check=True, capture_output=True, timeout=300)
    (built,) = (work / "dist").glob("careflow-*.whl")
    return built


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed; its bin/ holds the `careflow` script."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True)
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An unrelated working directory: no rules/, runbooks/ or mosquitto/ next to it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


def run(venv: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in (env or os.environ).items()
             if not k.startswith("CAREFLOW_") and k != "PYTHONPATH"}
    clean.update({k: v for k, v in (env or {}).items() if k.startswith("CAREFLOW_")})
    done = subprocess.run([str(venv / "bin" / "careflow"), *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=120, check=False)
    if ok and done.returncode != 0:
        pytest.fail(f"careflow {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n"
                    f"{done.stderr}")
    return done


def test_it_ships_rules_runbooks_broker_templates_and_dashboards(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for wanted in ("careflow/rules/default.yaml", "careflow/rules/tests/default_test.yaml",
                   "careflow/runbooks/device-silent.md", "careflow/mosquitto/careflow-tls.conf",
                   "careflow/mosquitto/device.acl", "careflow/mosquitto/claim.acl",
                   "careflow/mosquitto/mosquitto.conf", "careflow/grafana/dashboards/operational.json",
                   "careflow/grafana/provisioning/datasources/careflow.yaml",
                   "careflow/edge/edge.example.yaml"):
        assert wanted in names, wanted


def test_it_imports_careflow_from_the_wheel_not_the_checkout(venv: Path, elsewhere: Path) -> None:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import careflow.hub, careflow.provisioning; "
                           "print(careflow.hub.__file__, careflow.provisioning.__file__)"],
                          cwd=elsewhere, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(venv)) for path in done.stdout.split()), done.stdout


def test_it_checks_and_tests_the_shipped_rules_from_any_directory(venv: Path,
                                                                    elsewhere: Path) -> None:
    checked = run(venv, elsewhere, "rules", "check")
    assert "rule(s) OK" in checked.stdout
    tested = run(venv, elsewhere, "rules", "test")
    assert " 0 failed" in tested.stdout and "passed" in tested.stdout


def test_it_runs_the_hub_on_the_embedded_default_and_stores_events(venv: Path, elsewhere: Path,
                                                                    tmp_path: Path) -> None:
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(tmp_path / "data"),
           "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}"}
    with (tmp_path / "hub.log").open("wb") as log:
        hub = subprocess.Popen([str(venv / "bin" / "careflow"), "hub"], cwd=elsewhere, env=env,
                               stdout=log, stderr=log)
    try:
        wait_until(lambda: run(venv, elsewhere, "status", env=env, ok=False).returncode == 0
                   or hub.poll() is not None, what="hub healthy")
        assert hub.poll() is None, (tmp_path / "hub.log").read_text()
        run(venv, elsewhere, "events", "publish", "--gateway", "gw-1", "--count", "3", env=env)
        wait_until(lambda: run(venv, elsewhere, "events", "count", env=env).stdout.strip() == "3",
                   what="3 events stored")
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=30) == 0, (tmp_path / "hub.log").read_text()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own tmp dirs are 0700 to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="careflow-pki-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_it_renders_a_pki_whose_broker_config_mosquitto_loads(venv: Path, elsewhere: Path,
                                                               reachable_dir: Path) -> None:
    """The command `ca init` prints, run as printed. As root, Mosquitto drops to user mosquitto
    (Debian's package creates it), which must be able to read everything its config names."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("needs the mosquitto binary (Debian package mosquitto; .ci/run installs it)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
        except KeyError:
            pytest.skip("as root, Mosquitto drops to user mosquitto, which does not exist here")
    pki = reachable_dir / "pki"
    device, claim = free_port(), free_port()
    done = run(venv, elsewhere, "ca", "init", "--dir", str(pki), "--device-port", str(device),
               "--claim-port", str(claim), "--bind", "127.0.0.1",
               env={**os.environ, "COLUMNS": "200"})
    conf = pki / "mosquitto-careflow.conf"
    assert f"mosquitto -c {conf}" in " ".join(done.stdout.split())
    log = reachable_dir / "mosquitto.log"
    hub = TlsFiles(ca=pki / "device-ca.crt", cert=pki / "hub.crt", key=pki / "hub.key")
    claimer = TlsFiles(ca=pki / "device-ca.crt", cert=pki / "claim.crt", key=pki / "claim.key")
    with log.open("wb") as out:
        broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], cwd=elsewhere, stdout=out,
                                  stderr=out)
    try:
        # A CONNACK on both listeners: certificates, CRL and ACLs were all loaded (a broker that
        # cannot read its ACL logs "Unable to open acl_file" and exits after binding its ports).
        wait_until(lambda: (mqtt_handshake(device, hub, "careflow-hub-test")
                            and mqtt_handshake(claim, claimer, "gw-new"))
                   or broker.poll() is not None, what="mosquitto answering, or exited")
        assert broker.poll() is None, log.read_text()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    assert "Unable to" not in log.read_text(), log.read_text()
