"""The systemd units in deploy/: valid for systemd itself, hardened, restarting the agent on 75."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from careflow.cli import EXIT_SESSION_TAKEN
from careflow.edge.cli import EXIT_RESTART_REQUESTED

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("careflow-hub.service", "careflow-edge.service")
INSTALLED_AT = "/opt/careflow/bin/careflow"  # where deploy/README.md installs careflow
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes", "CapabilityBoundingSet": ""}


def service(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser["Service"]


@pytest.mark.parametrize("name", UNITS)
def test_it_ships_units_that_systemd_accepts_without_a_warning(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd; .ci/run does not "
                    "install it, as it is heavy in a container)")
    careflow = Path(sys.executable).with_name("careflow")  # this checkout's, as the unit's would be
    text = (DEPLOY / name).read_text()
    assert INSTALLED_AT in text
    (tmp_path / name).write_text(text.replace(INSTALLED_AT, str(careflow)))
    done = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr.strip() == "" and done.stdout.strip() == "", (
        done.stdout + done.stderr)


@pytest.mark.parametrize("name", UNITS)
def test_it_hardens_both_units_and_keeps_secrets_out_of_them(name: str) -> None:
    unit = service(name)
    for key, value in HARDENING.items():
        assert unit.get(key) == value, key
    assert unit.get("User") and unit.get("StateDirectory")
    assert unit.get("EnvironmentFile", "").lstrip("-").startswith("/etc/careflow/")
    environment = unit.get("Environment", "")
    assert not any(word in environment.upper() for word in ("PASSWORD", "TOKEN", "SECRET"))


def test_it_restarts_the_agent_when_it_exits_75_and_after_a_failure() -> None:
    """`careflow edge run` exits 75 after a remote restart command (edge/careflow/edge/cli.py)."""
    unit = service("careflow-edge.service")
    assert unit.get("Restart") == "on-failure"
    assert EXIT_RESTART_REQUESTED == 75  # what deploy/README.md says
    assert unit.get("RestartForceExitStatus") == str(EXIT_RESTART_REQUESTED)
    assert unit.get("SuccessExitStatus") == str(EXIT_RESTART_REQUESTED)
    assert service("careflow-hub.service").get("Restart") == "on-failure"


def test_a_hub_that_yields_its_session_to_another_is_not_restarted_into_the_fight() -> None:
    """The finding: a hub that found another client on its client id stopped (exit 2), and
    systemd restarted it 5 s later into the same fight, for ever: each time it took the session
    over three times, and what the broker delivered meanwhile was stored in its own data
    directory, never seen by the hub that keeps the session (its rules, its notifications)."""
    unit = service("careflow-hub.service")
    assert unit.get("RestartPreventExitStatus") == str(EXIT_SESSION_TAKEN)
