"""careflow from wheels, as a new user installs it: a fresh venv, run from an unrelated directory.

The wheels (one per part: core, schemas, provisioning, edge, hub, and the `careflow` command) are
built once per session from a copy of this checkout (the build writes build/ and *.egg-info next
to the sources). Their third-party dependencies come from the test interpreter's site-packages
through a .pth line (they are not what is under test, and installing ~40 packages per run would
cost a minute); careflow itself is imported only from the wheels, which the tests check. What a
gateway install would pull in is asked of pip itself (a dry run that resolves, installs nothing).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from careflow.core.config import TlsFiles
from tests.conftest import Mosquitto, free_port, wait_until
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


# The parts, one distribution per folder; a gateway installs the first four only.
GATEWAY_PARTS = ("core", "schemas", "provisioning", "edge")
PARTS = (*GATEWAY_PARTS, "hub")
# What a gateway must never carry: the hub's dependencies.
HUB_ONLY_DEPENDENCIES = {"amqtt", "apprise", "influxdb-client", "jsonschema"}


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every part's wheel and the `careflow` command's, built by pip from a copy of the sources."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, work / "src", ignore=_not_sources)
    sources = [str(work / "src" / part) for part in PARTS] + [str(work / "src")]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"),
                    *sources], check=True, capture_output=True, timeout=600)
    built = {path.name.split("-")[0].replace("_", "-"): path
             for path in (work / "dist").glob("*.whl")}
    assert set(built) == {"careflow", *(f"careflow-{part}" for part in PARTS)}, built
    return built


@pytest.fixture(scope="session")
def wheel(wheels: dict[str, Path]) -> Path:
    """The `careflow` command's wheel: the operator's install, with rules, runbooks and more."""
    return wheels["careflow"]


def _venv_with(wheels: list[Path], root: Path, *, clear: bool = False) -> Path:
    """A fresh venv with only these wheels of careflow installed (see the module docstring); an
    existing one keeps what it has unless cleared."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *(["--clear"] * clear),
                    str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", *map(str, wheels)], check=True,
                   capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True)
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


@pytest.fixture(scope="session")
def venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full install: every wheel; its bin/ holds the `careflow` script."""
    return _venv_with(list(wheels.values()), tmp_path_factory.mktemp("venv") / "venv")


@pytest.fixture(scope="session")
def gateway_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway's install: the agent, the contract, provisioning and the core; no hub."""
    return _venv_with([wheels[f"careflow-{part}"] for part in GATEWAY_PARTS],
                      tmp_path_factory.mktemp("gateway") / "venv")


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


def test_it_ships_rules_runbooks_broker_templates_and_dashboards(wheels: dict[str, Path]) -> None:
    names = {name for built in wheels.values() for name in zipfile.ZipFile(built).namelist()}
    for wanted in ("careflow/rules/default.yaml", "careflow/rules/tests/default_test.yaml",
                   "careflow/runbooks/device-silent.md", "careflow/mosquitto/careflow-tls.conf",
                   "careflow/mosquitto/device.acl", "careflow/mosquitto/claim.acl",
                   "careflow/mosquitto/mosquitto.conf", "careflow/grafana/dashboards/operational.json",
                   "careflow/grafana/provisioning/datasources/careflow.yaml",
                   "careflow/edge/edge.example.yaml"):
        assert wanted in names, wanted


def test_it_imports_careflow_from_the_wheel_not_the_checkout(venv: Path, elsewhere: Path) -> None:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import careflow.hub, careflow.provisioning, careflow.cli, careflow.core; "
                           "print(careflow.hub.__file__, careflow.provisioning.__file__, "
                           "careflow.cli.__file__, careflow.core.__file__)"],
                          cwd=elsewhere, capture_output=True, text=True, check=True)
    paths = done.stdout.split()
    assert len(paths) == 4 and all(path.startswith(str(venv)) for path in paths), done.stdout


def test_a_gateway_install_has_the_agent_and_cannot_import_the_hub(gateway_venv: Path,
                                                                  elsewhere: Path) -> None:
    python = str(gateway_venv / "bin" / "python")
    agent = subprocess.run([python, "-c", "import careflow.edge.agent, careflow.edge.cli; "
                            "print(careflow.edge.agent.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True)
    assert agent.stdout.startswith(str(gateway_venv)), agent.stdout
    for absent in ("careflow.hub", "careflow.cli"):
        imported = subprocess.run([python, "-c", f"import {absent}"], cwd=elsewhere,
                                  capture_output=True, text=True, check=False)
        assert imported.returncode == 1 and "ModuleNotFoundError" in imported.stderr, absent
    assert not (gateway_venv / "bin" / "careflow").exists()
    helped = subprocess.run([str(gateway_venv / "bin" / "careflow-edge"), "run", "--help"],
                            cwd=elsewhere, capture_output=True, text=True, check=True)
    assert "--gateway" in helped.stdout


def test_a_gateway_install_pulls_in_none_of_the_hubs_dependencies(wheels: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """pip resolves the gateway's wheels against the package index and installs nothing."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                           "-q", "--report", str(report),
                           *(str(wheels[f"careflow-{part}"]) for part in GATEWAY_PARTS)],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip(f"the package index is not reachable: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"careflow-edge", "paho-mqtt", "cryptography", "pydantic"} <= names, names
    assert not names & HUB_ONLY_DEPENDENCIES, names & HUB_ONLY_DEPENDENCIES
    assert "careflow-hub" not in names and "careflow" not in names


def test_the_gateway_command_runs_the_agent_against_mosquitto(gateway_venv: Path, elsewhere: Path,
                                                             mosquitto: Mosquitto,
                                                             tmp_path: Path) -> None:
    heard: list[bytes] = []
    listener = paho.Client(paho.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda _c, _u, message: heard.append(message.payload)
    listener.connect("127.0.0.1", mosquitto.port)
    listener.subscribe("careflow/v1/gw-edge-1/#", qos=1)
    listener.loop_start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREFLOW_") and k != "PYTHONPATH"}
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen([str(gateway_venv / "bin" / "careflow-edge"), "run",
                                  "--gateway", "gw-edge-1", "--broker", mosquitto.url,
                                  "--data-dir", str(tmp_path / "edge"), "--heartbeat-interval", "1"],
                                 cwd=elsewhere, env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: any(b'"type":"heartbeat"' in payload.replace(b" ", b"") for payload in heard)
                   or agent.poll() is not None, what="a heartbeat from the gateway install")
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
    finally:
        listener.loop_stop()
        listener.disconnect()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, (tmp_path / "agent.log").read_text()


def test_it_checks_and_tests_the_shipped_rules_and_runbooks_from_any_directory(
        venv: Path, elsewhere: Path) -> None:
    checked = run(venv, elsewhere, "rules", "check")
    assert "rule(s) OK" in checked.stdout
    tested = run(venv, elsewhere, "rules", "test")
    assert " 0 failed" in tested.stdout and "passed" in tested.stdout
    runbooks = json.loads(run(venv, elsewhere, "runbooks", "check", "--json").stdout)
    shipped = len(list((ROOT / "runbooks").glob("*.md"))) - 1  # README.md is no runbook
    assert runbooks["ok"] and runbooks["runbooks"] == shipped, runbooks
    assert not runbooks["rules_not_loaded"], runbooks


def test_it_runs_the_hub_on_the_embedded_default_and_stores_events(venv: Path, elsewhere: Path,
                                                                    tmp_path: Path) -> None:
    web = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "CAREFLOW_DATA_DIR": str(tmp_path / "data"),
           "CAREFLOW_LISTEN": f"127.0.0.1:{free_port()}", "CAREFLOW_HTTP_LISTEN": web}
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
        # the web, its templates read from the installed wheel
        with urllib.request.urlopen(f"http://{web}/readyz", timeout=10) as ready:
            assert ready.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{web}/l/not-a-link", timeout=10)
        assert "This link is not valid" in refused.value.read().decode()
        with urllib.request.urlopen(f"http://{web}/login", timeout=10) as login:
            page = login.read().decode()
        assert 'type="password"' in page and "csrf" in page, page
        assert f"web console: http://{web}" in (tmp_path / "hub.log").read_text()
        # the agent, its runbooks read from the installed wheel: an error burst gets a proposal
        run(venv, elsewhere, "events", "publish", "--gateway", "gw-1", "--type", "error",
            "--count", "11", env=env)

        def burst() -> str | None:
            listed = run(venv, elsewhere, "incidents", "list", "--json", env=env).stdout
            return next((str(row["id"]) for row in map(json.loads, listed.splitlines())
                         if row.get("rule") == "error-burst"), None)
        wait_until(lambda: burst() is not None, what="an error-burst incident")
        incident = burst()
        assert incident is not None
        made = json.loads(run(venv, elsewhere, "agent", "propose", incident, "--json",
                              env=env).stdout.splitlines()[0])
        assert made["proposal"]["action"], made
        listed = [json.loads(line) for line in
                  run(venv, elsewhere, "agent", "list", "--json", env=env).stdout.splitlines()]
        assert made["proposal"]["id"] in [row["id"] for row in listed], listed
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


def _release_0_1_0_wheel(folder: Path) -> Path:
    """A stand-in for careflow 0.1.0's wheel: one distribution, ``careflow``, that held every
    part in the folders the parts install into now, a regular ``careflow`` package, and its own
    ``careflow`` command (which prints ``careflow 0.1.0``)."""
    files = {"careflow/__init__.py": '"""careflow."""\n',
             "careflow/cli/__init__.py": "def main() -> None:\n    print('careflow 0.1.0')\n",
             "careflow/hub/service.py": "", "careflow/edge/agent.py": "",
             **{f"careflow/{part}/__init__.py": "" for part in ("hub", "edge", "schemas",
                                                                 "provisioning")}}
    info = "careflow-0.1.0.dist-info"
    files |= {f"{info}/METADATA": "Metadata-Version: 2.1\nName: careflow\nVersion: 0.1.0\n",
              f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n",
              f"{info}/entry_points.txt": "[console_scripts]\ncareflow = careflow.cli:main\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = folder / "careflow-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as built:
        for name, text in files.items():
            built.writestr(name, text)
    return path


def test_it_upgrades_an_install_of_release_0_1_0_as_the_deploy_readme_says(
        wheels: dict[str, Path], tmp_path: Path, elsewhere: Path) -> None:
    """0.1.0 was one distribution named careflow: installed over it without emptying the venv,
    the new parts ran under its old command (the same version number, so pip kept it), or lost
    files when pip removed it. deploy/README.md's upgrade reinstalls with ``venv --clear``."""
    upgrade = (ROOT / "deploy" / "README.md").read_text().split("## Upgrading", 1)[1]
    (reinstall,) = [line for line in upgrade.splitlines()
                    if "python3 -m venv" in line and "bin/pip install dist/careflow*.whl" in line]
    venv = _venv_with([_release_0_1_0_wheel(tmp_path)], tmp_path / "opt-careflow")
    assert run(venv, elsewhere, "--help").stdout.strip() == "careflow 0.1.0"
    _venv_with(list(wheels.values()), venv, clear="--clear" in reinstall.split())
    helped = run(venv, elsewhere, "--help")
    assert "careflow hub" in " ".join(helped.stdout.split()), helped.stdout
    site = next((venv / "lib").glob("python3*/site-packages"))
    leftovers = [name for name in ("careflow/__init__.py", "careflow/hub/service.py")
                 if (site / name).exists()]
    assert not leftovers, leftovers


def test_the_documented_wheel_build_ships_nothing_an_earlier_build_left(tmp_path: Path) -> None:
    """setuptools builds through build/, and a wheel takes what an earlier build left there: a
    module or a rule file deleted since would ship (and the hub would load that rule)."""
    deploy = (ROOT / "deploy" / "README.md").read_text()
    (command,) = [line for line in deploy.splitlines() if "pip wheel" in line]
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_not_sources)
    left = [src / "build" / "lib" / "careflow" / "rules" / "removed.yaml",
            src / "hub" / "build" / "lib" / "careflow" / "hub" / "removed.py"]
    for path in left:
        path.parent.mkdir(parents=True)
        path.write_text("")
    subprocess.run(["bash", "-c", command.replace("pip wheel", f"{sys.executable} -m pip wheel -q")],
                   cwd=src, check=True, capture_output=True, timeout=600)
    names = {name for built in (src / "dist").glob("*.whl")
             for name in zipfile.ZipFile(built).namelist()}
    assert "careflow/rules/default.yaml" in names
    assert not {"careflow/rules/removed.yaml", "careflow/hub/removed.py"} & names
