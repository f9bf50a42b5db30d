"""The benchmark harness stays correct: its smoke mode runs and checks echoes.

Each smoke test runs ``python -m benchmarks --smoke`` for one Python server
and one workload in a subprocess (compiling the C load generator), bounded in
time. The http workload's pieces (wrk's summary, the /proc CPU reading) are
also checked in process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

try:
    from benchmarks import drain_load, wrk
    from benchmarks.report import Cell, Workload
    from benchmarks.run import free_port
except ImportError:  # .ci/wheel-check copies tests/, not benchmarks/
    pytest.skip("benchmarks/ is not beside tests/", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent

needs_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="the load generator is compiled with gcc"
)
needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)


def run_smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--duration", "0.5", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@needs_gcc
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


@pytest.mark.slow
@needs_gcc
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


@pytest.mark.slow
@needs_gcc
def test_smoke_fails_a_server_that_corrupts_the_echo() -> None:
    done = run_smoke("--servers", "corrupt", "--workloads", "rt")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"FAILED: corrupt rt: \d+ wrong echoes", done.stderr), done.stderr


@pytest.mark.slow
@needs_gcc
def test_unknown_server_is_refused() -> None:
    done = run_smoke("--servers", "nginx")
    assert done.returncode != 0
    assert "unknown server 'nginx'" in done.stderr


def table_row(stdout: str, server: str) -> list[str]:
    row = re.search(rf"^\| {re.escape(server)} \(.*$", stdout, re.MULTILINE)
    assert row is not None, stdout
    return [c.strip() for c in row.group(0).strip("|").split("|")]


@pytest.mark.slow
@needs_gcc
@needs_wrk
def test_smoke_http_against_trio_and_ours() -> None:
    done = run_smoke("--servers", "ours,trio,libevent-c", "--workloads", "http")
    assert done.returncode == 0, done.stdout + done.stderr
    # libevent-c speaks no HTTP: no cell, no row, not a failure.
    assert "libevent-c" not in done.stdout.split("\n", 1)[1], done.stdout
    for server, what in (("ours", "examples/http_server.py"), ("trio", "serve_http")):
        cells = table_row(done.stdout, server)
        assert what in cells[0]
        # server | requests/s | x trio | p50 | p99 | server CPU µs/req | x trio
        assert float(cells[1].rstrip("k")) > 0, cells
        assert float(cells[5].rstrip("k")) > 0, cells
        line = re.search(rf"^round 1 http +{server} .*$", done.stdout, re.MULTILINE)
        assert line is not None, done.stdout
        assert "procs=1" in line.group(0), line.group(0)
    assert re.search(r"- HTTP requests/s \(h11, wrk\): \d+\.\d\dx", done.stdout)
    assert re.search(r"- server CPU per HTTP request: \d+\.\d\dx", done.stdout)


@pytest.mark.slow
@needs_gcc
@needs_wrk
def test_smoke_http_fails_a_server_that_answers_500s() -> None:
    done = run_smoke("--servers", "corrupt", "--workloads", "http")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"FAILED: corrupt http: \d+ non-2xx responses", done.stderr)


def test_http_with_no_http_server_is_refused() -> None:
    done = run_smoke("--servers", "epoll-c", "--workloads", "http")
    assert done.returncode != 0
    assert "none of epoll-c runs http" in done.stderr


HTTP = Workload("http", "test", 50)


def wrk_summary(**changes: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": 20000,
        "duration_us": 2_000_000,
        "connect": 0,
        "read": 0,
        "write": 0,
        "status": 0,
        "timeout": 0,
        "p50_us": 900,
        "p99_us": 4000,
        "cpu_s": 1.5,
        "server_procs": 1,
    }
    return {**out, **changes}


def test_wrk_cell_metrics() -> None:
    cell = Cell.from_wrk("ours", HTTP, wrk_summary())
    assert cell.ok
    assert cell.metrics == {
        "per_s": 10000.0,
        "p50_us": 900.0,
        "p99_us": 4000.0,
        "cpu_us": 75.0,
        "procs": 1.0,
    }


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"status": 3}, "3 non-2xx responses"),
        ({"read": 2}, "socket errors connect 0, read 2, write 0, timeout 0"),
        ({"timeout": 1}, "socket errors connect 0, read 0, write 0, timeout 1"),
        ({"requests": 0}, "no request completed"),
    ],
)
def test_wrk_cell_fails_on_what_wrk_counted(
    changes: dict[str, int], error: str
) -> None:
    cell = Cell.from_wrk("ours", HTTP, wrk_summary(**changes))
    assert (cell.ok, cell.error, cell.metrics) == (False, error, {})


def test_wrk_takes_whole_seconds() -> None:
    assert [wrk.seconds(x) for x in (0.2, 0.5, 1.0, 1.01, 3)] == ["1s"] * 3 + [
        "2s",
        "3s",
    ]


BUSY_CHILD = """
import time
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
print(flush=True)
time.sleep(30)
"""


def test_tree_cpu_sums_a_process_and_its_children() -> None:
    """A busy child's CPU time is in its parent's tree, and counted as one more."""
    alone, before = wrk.tree_cpu(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_CHILD], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "\n"  # it has burnt 0.3 s of CPU
        total, after = wrk.tree_cpu(os.getpid())
        child_only, one = wrk.tree_cpu(child.pid)
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert (after, one) == (before + 1, 1)
    assert child_only >= 0.25
    assert total >= alone + child_only - 0.02  # clock ticks are 10 ms


@pytest.mark.slow
def test_stream_micro_runs_and_reports_every_stream() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.stream_micro", "--rounds", "1"),
            *("--round-trips", "200", "--bulk-mib", "1", "--many", "50"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("trio", "ours", "floor", "bare"):
        assert name in done.stdout


def test_engine_micro_runs_and_reports_every_row() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.engine_micro", "--rounds", "1"),
            *("--wakes", "200", "--events", "640", "--conns", "8"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in (
        "wait_readable",
        "look+checkpoint",
        "checkpoint",
        "poll(0)",
        "asyncio reader",
        "engine._serve",
        "fake recv+send",
    ):
        assert name in done.stdout


@pytest.mark.slow
def test_drain_load_counts_what_a_stopped_server_lost() -> None:
    """Each server kind runs under load, is stopped, and every attempt is counted."""
    kinds = ("single", "workers", "reference")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.drain_load", "--server"),
            ",".join(kinds),
            *("--clients", "20", "--runs", "1", "--load", "0.3"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for kind in kinds:
        assert re.search(
            rf"^{kind}, 20 clients, 1 runs: lost after SIGTERM median \d+ "
            r"\(min \d+, max \d+\)",
            done.stdout,
            re.MULTILINE,
        ), done.stdout
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["benchmark"] == "drain_load"
    assert set(result["servers"]) == set(kinds)
    for kind in kinds:
        (run,) = result["servers"][kind]["runs"]
        before, after = run["before"], run["after"]
        assert before["ok"] > 0, (kind, run)  # the server was serving
        # Nothing is lost while it runs, and nothing goes uncounted.
        assert before["lost_reset"] + before["lost_eof"] == 0, (kind, run)
        assert after["unresolved"] == after["other"] == 0, (kind, run)
        assert after["refused"] > 0, (kind, run)  # once it is gone: refused
        assert run["lost"] == after["lost_reset"] + after["lost_eof"]
        assert result["servers"][kind]["lost_max"] == run["lost"]
        assert run["server_cpu"] > 0, run
        assert len(run["clients_cpu"]) == 2, run
        if kind != "workers":
            assert set(run["server"]) == {"queued", "accepted_since"}, run
    # An exact drain loses at most the connections that race its close: the
    # harness counts no loss of its own making.
    assert result["servers"]["reference"]["lost_max"] <= 2, done.stdout


def test_drain_load_refuses_an_unknown_server() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.drain_load", "--server", "nginx"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--server takes single, workers, echo-cli, reference, not 'nginx'" in (
        done.stderr
    )


def test_drain_load_source_addresses_are_distinct_loopback_hosts() -> None:
    sources = drain_load.source_addresses(70_000)
    assert len(set(sources)) == 70_000
    assert sources[:2] == ["127.1.0.1", "127.1.0.2"]
    for address in sources:
        octets = [int(o) for o in address.split(".")]
        assert octets[0] == 127, address
        assert 1 <= octets[3] <= 254, address


def one_attempt(
    port: int, listener: socket.socket | None, server_side: str
) -> drain_load.Counts:
    """One client attempt against ``listener`` (None: nothing listens on ``port``).

    ``server_side``: what the listener does once it accepted: ``"echo"``,
    ``"eof"`` (read the line, close without echoing) or ``"reset"`` (close
    with an RST).
    """
    load = drain_load.Load(port, 1, ["127.1.0.1"], os.getpid())
    try:
        load.start()
        if listener is not None:
            listener.settimeout(5)
            conn, addr = listener.accept()
            with conn:
                assert addr[0] == "127.1.0.1"  # bound to the source given
                line = conn.recv(4096)
                if server_side == "echo":
                    conn.sendall(line)
                elif server_side == "reset":
                    linger = struct.pack("ii", 1, 0)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        deadline = time.monotonic() + 5
        while load.conns and time.monotonic() < deadline:
            for fd, _ in load.ep.poll(0.1):
                load.event(fd)
        assert not load.conns
        return load.share.before
    finally:
        load.close()


@pytest.mark.parametrize(
    ("server_side", "expected"),
    [
        ("echo", drain_load.Counts(ok=1)),
        ("eof", drain_load.Counts(lost_eof=1)),
        ("reset", drain_load.Counts(lost_reset=1)),
        ("closed", drain_load.Counts(refused=1)),
    ],
)
def test_drain_load_sorts_each_outcome(
    server_side: str, expected: drain_load.Counts
) -> None:
    """Real loopback connections, ended each way the harness has a name for."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        if server_side == "closed":
            lsock.close()  # nothing listens there now: refused
            assert one_attempt(port, None, server_side) == expected
        else:
            lsock.listen()
            assert one_attempt(port, lsock, server_side) == expected


def run_tls_latency(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.tls_latency", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_tls_latency_runs_every_server_and_reports_each_cell() -> None:
    servers = ["ours", "ours-noquickack", "trio", "trio-quickack"]
    done = run_tls_latency(
        "-n", "2", "--clients", "python", "--servers", *[",".join(servers)]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The servers were stopped quietly (no traceback from their teardown).
    assert done.stderr == "", done.stderr
    for server in servers:
        row = re.search(rf"^\| python \| {server} \|(.*)$", done.stdout, re.MULTILINE)
        assert row is not None, done.stdout
        median, low, high, n = (c.strip() for c in row.group(1).strip("|").split("|"))
        assert 0 < float(low) <= float(median) <= float(high), row.group(0)
        assert n == "2"


def test_tls_latency_refuses_an_unknown_client() -> None:
    done = run_tls_latency("--clients", "wget")
    assert done.returncode == 2
    assert "unknown client 'wget'" in done.stderr


def read_response(sock: socket.socket) -> bytes:
    """One response to ``GET /`` (its body ends the example's)."""
    data = b""
    while not data.endswith(b"Hello, world!\n"):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "ours-http",
        "trio-http",
        "asyncio-http",
        "asyncio-protocol-http",
        "uvloop-protocol-http",
    ],
)
def test_http_servers_drain_as_the_example_does(kind: str) -> None:
    """SIGTERM: an idle keep-alive connection is closed at once, a request
    under way is answered with Connection: close, and the server exits 0."""
    if kind.startswith("uvloop"):
        # In the bench extra only; .ci/run's per-version runs have [test].
        pytest.importorskip(
            "uvloop", reason="uvloop is not installed (pip install -e '.[bench]')"
        )
    port = free_port()
    argv = [sys.executable, str(ROOT / "benchmarks" / "pyservers.py"), kind, str(port)]
    # The with block closes the pipes however the test ends (a server that
    # failed to start included), so no fd outlives it.
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        _drain_and_check(proc, port)


def _drain_and_check(proc: subprocess.Popen[bytes], port: int) -> None:
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                wrk.probe(port)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)  # a subprocess starting: nothing to wait on
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as idle,
            socket.create_connection(("127.0.0.1", port), timeout=10) as busy,
        ):
            idle.sendall(GET)
            assert b"Connection: close" not in read_response(idle)
            busy.sendall(GET)
            read_response(busy)
            busy.sendall(GET[:20])
            proc.send_signal(signal.SIGTERM)
            assert idle.recv(1) == b""  # closed by the drain, not a timeout
            busy.sendall(GET[20:])
            reply = read_response(busy)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
            assert b"\r\nConnection: close\r\n" in reply
            assert busy.recv(1) == b""
        _, err = proc.communicate(timeout=15)
        assert (proc.returncode, err) == (0, b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=15)


GET = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


@pytest.mark.slow
@needs_gcc
def test_smoke_overload_runs_ours_with_and_without_the_bound_beside_trio() -> None:
    done = run_smoke(
        "--servers", "ours,ours-lag,trio,asyncio-streams", "--workloads", "overload"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for server in ("ours", "ours-lag", "trio", "asyncio-streams"):
        row = re.search(rf"^\| {server} \(.*$", done.stdout, re.MULTILINE)
        assert row is not None, done.stdout
        assert "FAILED" not in row.group(0)
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        # Established p99 and the flood served per second, both measured.
        assert float(cells[2].split()[0]) > 0
        assert float(cells[5].split()[0]) > 0


def test_overload_cell_metrics() -> None:
    from benchmarks.report import Cell, Workload

    workload = Workload("overload", "x", 10)
    out = {
        "pings": 100,
        "unanswered": 10,
        "ping_p50_ms": 2.0,
        "ping_p99_ms": 40.0,
        "ping_max_ms": 200.0,
        "burns": 190,
        "burns_per_s": 47.5,
        "flood_errors": 0,
        "elapsed": 4.0,
    }
    cell = Cell.from_overload("ours-lag", workload, out)
    assert cell.ok
    assert cell.metrics["pings_per_s"] == 25.0
    assert cell.metrics["ping_p99_ms"] == 40.0
    assert not Cell.from_overload("ours", workload, {**out, "burns": 0}).ok
    assert not Cell.from_overload("ours", workload, {**out, "pings": 0}).ok
