"""The attack harness stays runnable: a tiny run of two modes, checked.

``python -m benchmarks.attack`` with 20 attacking connections and a short
window, in a subprocess bounded in time. Only that it runs and that its
figures are there and sane is checked: no timing is asserted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_dribble_and_tls_silent_smoke() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.attack",
            "proxy-dribble",
            "tls-silent",
            "--connections",
            "20",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--rate",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for mode in ("proxy-dribble", "tls-silent"):
        row = re.search(rf"^\| {mode} \|.*$", done.stdout, re.MULTILINE)
        assert row is not None, done.stdout
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        _, attackers, reconnects, ok, p50, p99, cpu, _ = cells
        # All 20 attackers connected, and the server (no limit reached with
        # 20) served every honest client.
        assert attackers == "20", row.group(0)
        assert ok == "10/10", row.group(0)
        assert float(reconnects) >= 0
        assert 0 < float(p50) <= float(p99)
        assert float(cpu) >= 0
