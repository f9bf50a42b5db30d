"""The benchmark harness stays correct: its smoke mode runs and checks echoes.

Each test runs ``python -m benchmarks --smoke`` for one Python server and one
workload in a subprocess (compiling the C load generator), bounded in time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("gcc") is None, reason="the load generator is compiled with gcc"
    ),
]


def run_smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--duration", "0.5", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_smoke_round_trips_against_trio_and_ours() -> None:
    done = run_smoke("--servers", "ours,trio", "--workloads", "rt")
    assert done.returncode == 0, done.stdout + done.stderr
    # One row per server, each with a positive round-trip rate and CPU figure.
    for server in ("ours", "trio"):
        row = re.search(rf"^\| {server} \(.*$", done.stdout, re.MULTILINE)
        assert row is not None, done.stdout
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        assert "FAILED" not in row.group(0)
        rate = cells[1]
        assert re.fullmatch(r"[\d.]+k?", rate), rate
        assert float(rate.rstrip("k")) > 0
        # A single-process server: the process-tree sum covers one process.
        line = re.search(rf"^round 1 rt +{server} .*$", done.stdout, re.MULTILINE)
        assert line is not None, done.stdout
        assert "procs=1" in line.group(0), line.group(0)
    assert re.search(r"- round trips/s: \d+\.\d\dx", done.stdout), done.stdout


def test_smoke_two_workers_sums_cpu_over_the_process_tree() -> None:
    done = run_smoke("--servers", "ours-2w", "--workloads", "rt")
    assert done.returncode == 0, done.stdout + done.stderr
    row = re.search(r"^\| ours-2w \(.*$", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    assert "FAILED" not in row.group(0)
    cells = [c.strip() for c in row.group(0).strip("|").split("|")]
    # server | round trips/s | p50 | p99 | server CPU µs/rt (no trio: no ratio)
    rate, cpu = cells[1], cells[4]
    assert float(rate.rstrip("k")) > 0, rate
    # The supervisor does no I/O: a CPU figure above 0 means the workers'
    # CPU time was summed in, over a tree of 3 processes.
    assert float(cpu.rstrip("k")) > 0, cpu
    line = re.search(r"^round 1 rt +ours-2w .*$", done.stdout, re.MULTILINE)
    assert line is not None, done.stdout
    assert "procs=3" in line.group(0), line.group(0)


def test_smoke_fails_a_server_that_corrupts_the_echo() -> None:
    done = run_smoke("--servers", "corrupt", "--workloads", "rt")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"FAILED: corrupt rt: \d+ wrong echoes", done.stderr), done.stderr


def test_unknown_server_is_refused() -> None:
    done = run_smoke("--servers", "nginx")
    assert done.returncode != 0
    assert "unknown server 'nginx'" in done.stderr
