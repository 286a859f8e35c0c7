"""careflow-check.sh proves the pipeline end to end; it must pass on a working checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_it_passes_end_to_end() -> None:
    careflow = Path(sys.executable).parent / "careflow"
    done = subprocess.run(["bash", str(ROOT / "careflow-check.sh")], capture_output=True,
                          text=True, timeout=180, check=False,
                          env={"PATH": "/usr/bin:/bin", "CAREFLOW_BIN": str(careflow)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("PASS")
