"""The http workload: wrk against an HTTP/1.1 server, server CPU from /proc.

:func:`measure` runs wrk (keep-alive, ``GET /``) against a server already
listening, and reads the server's CPU time, summed over its process tree as
``benchmarks/c/loadgen.c`` does for the echo workloads, right before wrk
starts and right after it exits. The window is therefore wrk's whole run,
its connects and closes included (50 of each against thousands of requests
per second); requests/s is wrk's own count over wrk's own duration.

wrk takes whole seconds (``-d1s``): a duration is rounded up, 1 s at least.
A warm-up below half a second is skipped (smoke mode's 0.2 s would cost a
whole wrk second): the readiness probe then is the only warm-up.

Error handling: wrk failing or printing no summary raises
:class:`RuntimeError`; errors wrk counted (socket errors, non-2xx answers)
are returned for the caller to judge.

Resource handling: each wrk run is a child waited for with a timeout
(``subprocess.run`` kills it when the timeout expires).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable

SCRIPT: Final = Path(__file__).resolve().parent / "wrk_report.lua"
#: The line wrk_report.lua's done() prints.
MARKER: Final = "WRK-JSON "
#: wrk's per-request timeout: past it a request counts as an error.
REQUEST_TIMEOUT: Final = "5s"
PROBE: Final = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def available() -> bool:
    return shutil.which("wrk") is not None


def probe(port: int) -> None:
    """One ``GET /`` with ``Connection: close``; RuntimeError if not a 200.

    Raises:
        OSError: nothing accepts on the port yet (the caller retries).
        RuntimeError: something answered, but not HTTP/1.1 200.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(PROBE)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    if not reply.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"readiness probe got {reply[:60]!r}, not a 200")


def tree_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds (utime+stime) of ``pid`` and its descendants, and their count.

    Every process is read from /proc/N/stat; one that exits mid-scan is
    left out (its CPU time goes with it, as in loadgen.c).
    """
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 of proc(5): ppid is 4, utime 14, stime 15.
        stats[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for p, (ppid, _ticks) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK"), len(tree & stats.keys())


def seconds(value: float) -> str:
    """A duration as wrk takes it: whole seconds, rounded up, 1 at least."""
    return f"{max(1, math.ceil(value))}s"


def measure(
    port: int,
    pid: int,
    *,
    conns: int,
    duration: float,
    warmup: float,
    threads: int,
    pin: Callable[[list[str]], list[str]],
    timeout: float,
) -> dict[str, Any]:
    """Warm up, then one measured wrk run; wrk's summary plus the server's CPU.

    Args:
        port: the server's port on 127.0.0.1.
        pid: the server's pid, the root of the process tree measured.
        conns: wrk's connections (``-c``).
        duration: seconds measured (rounded up to whole seconds).
        warmup: seconds of wrk before the measurement (skipped below 0.5).
        threads: wrk's threads (``-t``), one per CPU it is pinned to.
        pin: turns a command line into the pinned one (``taskset``).
        timeout: seconds past which a wrk run is killed.

    Returns:
        The summary keys of wrk_report.lua (``requests``, ``duration_us``,
        ``connect``, ``read``, ``write``, ``status``, ``timeout``,
        ``p50_us``, ``p99_us``) plus ``cpu_s`` and ``server_procs``.

    Raises:
        RuntimeError: wrk failed, or printed no summary line.
        subprocess.TimeoutExpired: a run outlasted ``timeout``.
    """
    url = f"http://127.0.0.1:{port}/"
    base = ["wrk", "-t", str(max(1, min(threads, conns))), "-c", str(conns)]
    base += ["--timeout", REQUEST_TIMEOUT]
    if warmup >= 0.5:
        run(pin([*base, "-d", seconds(warmup), url]), timeout)
    cpu0, _ = tree_cpu(pid)
    out = run(pin([*base, "-d", seconds(duration), "-s", str(SCRIPT), url]), timeout)
    cpu1, procs = tree_cpu(pid)
    for line in out.splitlines():
        if line.startswith(MARKER):
            summary: dict[str, Any] = json.loads(line[len(MARKER) :])
            return {**summary, "cpu_s": cpu1 - cpu0, "server_procs": procs}
    raise RuntimeError(f"wrk printed no {MARKER.strip()} line: {out[-300:]!r}")


def run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
