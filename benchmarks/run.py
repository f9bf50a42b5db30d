"""Run servers side by side under the same load and compare them.

One command builds the C programs (the load generator and two C servers),
then runs every (workload, server) cell once per round, servers interleaved
within a round, each cell in a fresh server process::

    python -m benchmarks --smoke             # ~1 s per cell, what CI runs
    python -m benchmarks                     # full: 5 rounds, writes docs/
    python -m benchmarks --servers ours,trio --workloads rate,rt
    python -m benchmarks --servers ours,trio --workloads http

The echo workloads (rate, rt, bulk, idle) run every server. The http
workload runs only the servers that speak HTTP/1.1 (``HTTP_SERVERS``):
``ours`` is then ``examples/http_server.py`` (h11 on trio_evlisten) and
``trio`` the same ``serve_http`` on ``trio.serve_tcp``; the load is ``wrk``
(keep-alive ``GET /``), pinned like the load generator, and the server's CPU
is read from /proc around wrk's run (see benchmarks/wrk.py).

The server runs pinned to one CPU and the load generator (C, epoll, one
thread per CPU it is given) to the others, with ``taskset``. Servers run
under ``prlimit --nofile=HARD:HARD`` so 5,000 idle connections fit. The
load generator reads the server's CPU time and VmRSS from /proc at the
edges of its measurement window, so "server CPU per connection" stays
honest even when the load generator is the bottleneck. Both are summed over
the server's whole process tree (a supervisor and its workers too), so a
multi-process server is measured the same way as a single-process one.

Error handling: a server that does not start, dies, or echoes a wrong or
missing byte marks its cell FAILED; the run goes on, prints the table and
exits 1. A missing tool (gcc, libevent-dev, uvloop) stops the run before
any cell, exit 2.

Resource handling: every process started here (servers, load generators,
py-spy) is killed and reaped in a ``finally`` before the next cell starts,
and again at exit; compiled programs live in a temporary directory removed
at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import attrs

if __package__ in (None, ""):  # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report, wrk
from benchmarks.report import Cell, Machine, Workload

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
PYSERVERS: Final = HERE / "pyservers.py"

#: name -> (description, how to start it: a function of port and build dir).
SERVERS: Final[dict[str, str]] = {
    "ours": "trio_evlisten: examples/echo.py",
    "ours-2w": "trio_evlisten.workers --workers 2: SO_REUSEPORT",
    "ours-protocol": "trio_evlisten protocol mode: examples/echo_protocol.py",
    "ours-lag": "trio_evlisten with max_loop_lag=0.05 (overload workload only)",
    "trio": "trio.serve_tcp",
    "asyncio-streams": "asyncio.start_server (streams)",
    "asyncio-protocol": "asyncio Protocol",
    "uvloop-protocol": "uvloop Protocol",
    "libevent-c": "C: libevent evconnlistener + bufferevent",
    "epoll-c": "C: minimal epoll loop (floor)",
}
#: The servers of the http workload (the others do not speak HTTP), as they
#: are there: name -> description.
HTTP_SERVERS: Final[dict[str, str]] = {
    "ours": "trio_evlisten: examples/http_server.py, h11",
    "trio": "trio.serve_tcp, the same serve_http",
    "asyncio-streams": "asyncio.start_server + h11, the example ported",
    "ours-protocol": "trio_evlisten protocol mode: examples/http_protocol.py, h11",
    "asyncio-protocol": "asyncio create_server + http_protocol.py's HTTPProtocol",
    "uvloop-protocol": "uvloop create_server + http_protocol.py's HTTPProtocol",
}
#: The servers of the overload workload (benchmarks/overload.py: the same
#: handler, echoing and burning 20 ms of CPU per ``b``), as they are there.
OVERLOAD_SERVERS: Final[dict[str, str]] = {
    "ours": "trio_evlisten, no bound",
    "ours-lag": "trio_evlisten, max_loop_lag=0.05",
    "trio": "trio.serve_tcp",
    "asyncio-streams": "asyncio.start_server (streams)",
}
OVERLOAD: Final = HERE / "overload.py"
#: Listening sockets a server opens on its port (default 1): the harness
#: waits for all of them, so every worker is accepting when the load starts.
LISTENERS: Final[dict[str, int]] = {"ours-2w": 2}
#: Selectable with --servers but never run by default: the harness's
#: self-check, a server that corrupts the echo and must be reported FAILED.
HIDDEN_SERVERS: Final = {"corrupt": "asyncio Protocol flipping a bit (self-check)"}
HIDDEN_HTTP_SERVERS: Final = {
    "corrupt": "asyncio + h11, every 10th a 500 (self-check)",
    # The example's application on the listener, a feature left out: what
    # each costs per request (benchmarks/pyservers.py).
    "ours-bare": "the example's app without idle timeout or drain",
    "ours-no-timeout": "the example's app without its idle timeout",
    "ours-no-drain": "the example's app without drain handling",
    "ours-split-writes": "the example's app, head/body/end in three writes",
    "ours-protocol-bare": "http_protocol.py's app without its sweep task",
}

WORKLOADS: Final[dict[str, Workload]] = {
    w.name: w
    for w in (
        Workload("rate", "connect, 64 B round trip, close", 50),
        Workload("rt", "64 B round trips, persistent", 100),
        Workload("bulk", "bulk streaming", 8),
        Workload("idle", "idle connections held", 5000),
        Workload("http", "HTTP/1.1 keep-alive GET / (h11), wrk", 50),
        Workload(
            "overload",
            "established connections pinging while new ones flood in, each "
            "asking for 20 ms of CPU",
            10,
        ),
    )
}

SMOKE: Final = {"rounds": 1, "duration": 1.0, "warmup": 0.2}
FULL: Final = {"rounds": 5, "duration": 3.0, "warmup": 0.5}
READY_TIMEOUT: Final = 15.0
START_ATTEMPTS: Final = 3
#: Slack on top of warm-up + duration before a load generator is killed.
LOADGEN_SLACK: Final = 45.0


class SetupError(Exception):
    """A tool or package the run needs is missing."""


def serves(server: str, workload: Workload) -> bool:
    """Whether ``server`` takes part in ``workload`` (http: only HTTP servers)."""
    if workload.name == "http":
        return server in HTTP_SERVERS or server in HIDDEN_HTTP_SERVERS
    if workload.name == "overload":
        return server in OVERLOAD_SERVERS
    # ours-lag runs the overload workload only, the example's feature
    # variants (HIDDEN_HTTP_SERVERS) the http one only.
    return server != "ours-lag" and (server in SERVERS or server in HIDDEN_SERVERS)


def server_argv(name: str, port: int, bindir: Path, workload: Workload) -> list[str]:
    """The command line that starts server ``name`` on ``port`` for ``workload``."""
    py = sys.executable
    if workload.name == "overload":
        return [py, str(OVERLOAD), "serve", name, str(port)]
    if workload.name == "http":
        if name == "ours":
            return [py, str(ROOT / "examples" / "http_server.py"), str(port)]
        if name == "ours-protocol":
            return [py, str(ROOT / "examples" / "http_protocol.py"), str(port)]
        kind = {"trio": "trio", "asyncio-streams": "asyncio", "corrupt": "corrupt"}
        return [py, str(PYSERVERS), f"{kind.get(name, name)}-http", str(port)]
    if name == "ours":
        return [py, str(ROOT / "examples" / "echo.py"), str(port)]
    if name == "ours-protocol":
        return [py, str(ROOT / "examples" / "echo_protocol.py"), str(port)]
    if name == "ours-2w":
        # The default handler is the same echo as examples/echo.py's.
        return [
            *(py, "-m", "trio_evlisten.workers", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
    if name in ("libevent-c", "epoll-c"):
        return [str(bindir / name), str(port)]
    return [py, str(PYSERVERS), name, str(port)]


def build(bindir: Path, servers: Sequence[str], workloads: Sequence[Workload]) -> None:
    """Compile the load generator and the C servers that will run.

    Raises:
        SetupError: gcc or libevent's pkg-config file is missing, a compile
            failed (its output is in the message), or the http workload is
            to run and wrk is missing.
    """
    if any(w.name == "http" for w in workloads) and not wrk.available():
        raise SetupError(
            "wrk not found (the http workload's load): apt-get install -y wrk"
        )
    if shutil.which("gcc") is None:
        raise SetupError("gcc not found: apt-get install -y gcc")
    jobs: list[tuple[str, list[str]]] = [("loadgen", ["-pthread"])]
    if "epoll-c" in servers:
        jobs.append(("epoll-c", []))
    if "libevent-c" in servers:
        pc = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "libevent"],
            capture_output=True,
            text=True,
            check=False,
        )
        if pc.returncode != 0:
            raise SetupError(
                "libevent not found by pkg-config: apt-get install -y libevent-dev"
                f" ({pc.stderr.strip()})"
            )
        jobs.append(("libevent-c", shlex.split(pc.stdout)))
    sources = {
        "loadgen": "loadgen.c",
        "epoll-c": "epoll_echo.c",
        "libevent-c": "libevent_echo.c",
    }
    for name, extra in jobs:
        src = HERE / "c" / sources[name]
        cmd = ["gcc", "-O2", "-Wall", "-o", str(bindir / name), str(src), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SetupError(f"{shlex.join(cmd)} failed:\n{done.stderr}")


def check_python_servers(servers: Sequence[str], workloads: Sequence[Workload]) -> None:
    if "uvloop-protocol" in servers:
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            raise SetupError("uvloop not installed: pip install uvloop") from exc
    if any(w.name == "http" for w in workloads):
        try:
            import h11  # noqa: F401
        except ImportError as exc:
            raise SetupError("h11 not installed: pip install -e '.[bench]'") from exc


def free_port() -> int:
    """A port below the ephemeral range that 0.0.0.0 can bind right now.

    Below the range, so no client socket (the load generator's, or anyone
    else's) can be holding it; probed on 0.0.0.0 with SO_REUSEADDR because
    that is how ``examples/echo.py`` binds.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low - 1, 20000)
    for _ in range(200):
        port = random.randint(10000, top)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in 10000..{top}")


def cpu_split() -> tuple[list[int], list[int]]:
    """CPUs for the server (the first one) and the load generator (the rest)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], []
    return cpus[:1], cpus[1:]


def pinned(argv: list[str], cpus: list[int]) -> list[str]:
    if not cpus or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", ",".join(map(str, cpus)), *argv]


def nofile_prefix() -> list[str]:
    """``prlimit`` raising the soft RLIMIT_NOFILE to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if shutil.which("prlimit") is None or hard == resource.RLIM_INFINITY:
        return []
    return ["prlimit", f"--nofile={hard}:{hard}"]


class Procs:
    """Every child process of the run, so each one is killed however we exit."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], *, stderr: int | IO[bytes] = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group, so its children die with it."""
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        self.live.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal ``proc``'s process group (it and e.g. its workers); reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc in self.live:
            self.live.remove(proc)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self.kill(proc)


def listening_sockets(port: int) -> int:
    """How many TCP sockets (IPv4 and IPv6) are in LISTEN state on ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                # local_address is HEXADDR:HEXPORT; state 0A is LISTEN.
                if (
                    len(fields) > 3
                    and fields[3] == "0A"
                    and int(fields[1].rsplit(":", 1)[1], 16) == port
                ):
                    count += 1
    return count


def wait_ready(
    proc: subprocess.Popen[bytes], port: int, listeners: int = 1, *, http: bool = False
) -> None:
    """Wait until ``listeners`` sockets listen on ``port`` and one echoes a byte
    (with ``http``: answers ``GET /`` with a 200).

    A multi-process server (``listeners`` > 1, one socket per worker with
    SO_REUSEPORT) is ready when every worker listens: otherwise the load's
    first connections would all go to the first worker up.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        if listening_sockets(port) < listeners:
            time.sleep(0.05)
            continue
        try:
            if http:
                wrk.probe(port)
                return
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"!")
                if s.recv(1) == b"!":
                    return
                raise RuntimeError("server did not echo the readiness probe")
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"server not accepting on port {port} with {listeners} listening"
        f" socket(s) after {READY_TIMEOUT}s"
    )


def run_cell(
    procs: Procs,
    server: str,
    workload: Workload,
    *,
    bindir: Path,
    duration: float,
    warmup: float,
    cpus: tuple[list[int], list[int]],
    profile_dir: Path | None,
    round_no: int,
) -> Cell:
    """One fresh server process, one load-generator run against it."""
    with tempfile.TemporaryFile() as errlog:
        spy: subprocess.Popen[bytes] | None = None
        proc: subprocess.Popen[bytes] | None = None
        try:
            for attempt in range(START_ATTEMPTS):
                # Another process may take the port between our probe and
                # the server's bind: then try another one.
                port = free_port()
                argv = nofile_prefix() + pinned(
                    server_argv(server, port, bindir, workload), cpus[0]
                )
                errlog.seek(0)
                errlog.truncate()
                proc = procs.start(argv, stderr=errlog)
                try:
                    wait_ready(
                        proc,
                        port,
                        LISTENERS.get(server, 1),
                        http=workload.name == "http",
                    )
                    break
                except RuntimeError:
                    procs.kill(proc)
                    if attempt == START_ATTEMPTS - 1:
                        raise
            assert proc is not None
            if profile_dir is not None and server not in ("libevent-c", "epoll-c"):
                out = profile_dir / f"{server}-{workload.name}-r{round_no}.txt"
                spy = procs.start(
                    pinned(
                        [
                            str(Path(sys.executable).parent / "py-spy"),
                            "record",
                            "--subprocesses",
                            "--pid",
                            str(proc.pid),
                            "--format",
                            "raw",
                            "--rate",
                            "200",
                            "--nonblocking",
                            "-o",
                            str(out),
                        ],
                        cpus[1],
                    )
                )
            if workload.name == "http":
                summary = wrk.measure(
                    port,
                    proc.pid,
                    conns=workload.conns,
                    duration=duration,
                    warmup=warmup,
                    threads=len(cpus[1]) or 1,
                    pin=lambda argv: pinned(argv, cpus[1]),
                    timeout=warmup + duration + LOADGEN_SLACK,
                )
                if proc.poll() is not None:
                    raise RuntimeError(f"server died (status {proc.returncode})")
                return Cell.from_wrk(server, workload, summary)
            if workload.name == "overload":
                # The flood client, in its own process on the other CPUs,
                # so its CPU is not the server's.
                client = [
                    *(sys.executable, str(OVERLOAD), "client", str(port)),
                    *("--duration", str(duration)),
                ]
                done = subprocess.run(
                    pinned(client, cpus[1]),
                    capture_output=True,
                    text=True,
                    timeout=duration + LOADGEN_SLACK,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"overload client failed: {done.stderr}")
                if proc.poll() is not None:
                    raise RuntimeError(f"server died (status {proc.returncode})")
                return Cell.from_overload(server, workload, json.loads(done.stdout))
            lg = [
                str(bindir / "loadgen"),
                workload.name,
                str(port),
                "-c",
                str(workload.conns),
                "-d",
                str(duration),
                "-w",
                str(warmup),
                "-p",
                str(proc.pid),
            ]
            done = subprocess.run(
                pinned(lg, cpus[1]),
                capture_output=True,
                text=True,
                timeout=warmup + duration + LOADGEN_SLACK,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"loadgen failed: {done.stderr.strip()}")
            if proc.poll() is not None:
                raise RuntimeError(f"server died (status {proc.returncode})")
            return Cell.from_loadgen(server, workload, json.loads(done.stdout))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            errlog.seek(0)
            tail = errlog.read()[-400:].decode(errors="replace").strip()
            return Cell.failed(server, workload, f"{exc} {tail}".strip())
        finally:
            if spy is not None:
                procs.kill(spy, signal.SIGINT)
            if proc is not None:
                procs.kill(proc)


def machine() -> Machine:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    libevent = subprocess.run(
        ["pkg-config", "--modversion", "libevent"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu=model,
        kernel=platform.release(),
        python=platform.python_version(),
        libevent=libevent or "n/a",
    )


def parse_list(value: str | None, known: dict[str, object], what: str) -> list[str]:
    if value is None:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    allowed = (
        {**known, **HIDDEN_SERVERS, **HIDDEN_HTTP_SERVERS}
        if what == "server"
        else known
    )
    for n in names:
        if n not in allowed:
            raise SystemExit(f"unknown {what} {n!r}; choose from {', '.join(allowed)}")
    return names


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the ``finally`` clauses kill children."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(args: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="1 round, ~1 s per cell")
    p.add_argument("--servers", help=f"comma list of {', '.join(SERVERS)}")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--duration", type=float, help="override seconds per cell")
    p.add_argument(
        "--docs",
        type=Path,
        help="write benchmarks.md and bench.png here (default: docs/ for a full "
        "run of everything, nowhere for --smoke or a filtered run)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record each Python server with py-spy (raw stacks into DIR) and "
        "print its top functions; perturbs the numbers, use for profiling only",
    )
    ns = p.parse_args(args)
    servers = parse_list(ns.servers, dict(SERVERS), "server")
    workloads = [
        WORKLOADS[w] for w in parse_list(ns.workloads, dict(WORKLOADS), "workload")
    ]
    if not any(serves(s, w) for s in servers for w in workloads):
        raise SystemExit(
            f"none of {', '.join(servers)} runs {', '.join(w.name for w in workloads)}"
            f"; the http workload runs {', '.join(HTTP_SERVERS)}, the overload "
            f"workload {', '.join(OVERLOAD_SERVERS)}"
        )
    settings = dict(SMOKE if ns.smoke else FULL)
    if ns.rounds is not None:
        settings["rounds"] = max(1, min(ns.rounds, 50))
    if ns.duration is not None:
        settings["duration"] = max(0.1, min(ns.duration, 60.0))
    rounds = int(settings["rounds"])
    docs: Path | None = ns.docs
    if docs is None and not ns.smoke and ns.servers is None and ns.workloads is None:
        docs = ROOT / "docs"
    if ns.py_spy is not None:
        ns.py_spy.mkdir(parents=True, exist_ok=True)

    procs = Procs()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    cells: list[Cell] = []
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="evl-bench-") as tmp:
        try:
            check_python_servers(servers, workloads)
            build(Path(tmp), servers, workloads)
        except SetupError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2
        cpus = cpu_split()
        ncells = sum(serves(s, w) for s in servers for w in workloads)
        print(
            f"# {ncells} cells ({len(servers)} servers x {len(workloads)} workloads"
            f", http only for HTTP servers) x {rounds} "
            f"rounds, {settings['duration']} s per cell; server CPUs "
            f"{cpus[0] or 'any'}, load generator CPUs {cpus[1] or 'any'}",
            flush=True,
        )
        try:
            for r in range(1, rounds + 1):
                for w in workloads:
                    for s in servers:
                        if not serves(s, w):
                            continue
                        cell = run_cell(
                            procs,
                            s,
                            w,
                            bindir=Path(tmp),
                            duration=settings["duration"],
                            warmup=settings["warmup"],
                            cpus=cpus,
                            profile_dir=ns.py_spy,
                            round_no=r,
                        )
                        cells.append(cell)
                        print(f"round {r} {cell.one_line()}", flush=True)
        finally:
            procs.kill_all()
    elapsed = time.monotonic() - started
    command = "python -m benchmarks" + ("" if not args else " " + shlex.join(args))
    text = report.tables(
        cells,
        servers,
        workloads,
        {**SERVERS, **HIDDEN_SERVERS},
        {
            "http": {**HTTP_SERVERS, **HIDDEN_HTTP_SERVERS},
            "overload": OVERLOAD_SERVERS,
        },
    )
    print()
    print(text)
    print(f"({elapsed:.0f} s)")
    if ns.py_spy is not None:
        print(report.profile_summary(ns.py_spy))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        report.write_chart(cells, servers, workloads, docs / "bench.png")
        stamp = datetime.datetime.now(datetime.timezone.utc)
        (docs / "benchmarks.md").write_text(
            report.markdown(
                text,
                command=command,
                date=stamp.strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(),
                rounds=rounds,
                duration=settings["duration"],
                cpus=cpus,
                elapsed=elapsed,
                load=(load_before, os.getloadavg()[0]),
            )
        )
        # Every cell of every round, for comparing runs (e.g. before/after).
        (docs / "benchmarks.json").write_text(
            json.dumps(
                {
                    "command": command,
                    "date": stamp.isoformat(timespec="seconds"),
                    "machine": attrs.asdict(machine()),
                    "cells": [c.as_json() for c in cells],
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote benchmarks.md, bench.png and benchmarks.json in {docs}")
    failed = [c for c in cells if not c.ok]
    for c in failed:
        print(f"FAILED: {c.server} {c.workload.name}: {c.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
