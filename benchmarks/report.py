"""Results of the benchmark cells: medians, tables, the chart, the profile.

Error handling: a cell whose load generator saw an error or a wrong byte is
kept with ``ok=False`` and its reason; tables show ``FAILED`` where no round
of a server succeeded and count the failed rounds otherwise.

Resource handling: :func:`write_chart` closes its matplotlib figure.
"""

from __future__ import annotations

import re
import statistics
import textwrap
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

BASELINE: Final = "trio"
OURS: Final = "ours"
#: ``ours`` in worker processes sharing the port (SO_REUSEPORT).
OURS_WORKERS: Final = "ours-2w"


@attrs.frozen
class Workload:
    name: str
    what: str
    conns: int


@attrs.frozen
class Machine:
    nproc: int
    cpu: str
    kernel: str
    python: str
    libevent: str


@attrs.frozen
class Cell:
    """One server under one workload in one round."""

    server: str
    workload: Workload
    ok: bool
    error: str
    metrics: dict[str, float]

    @classmethod
    def failed(cls, server: str, workload: Workload, error: str) -> Cell:
        return cls(server, workload, False, error, {})

    @classmethod
    def from_loadgen(cls, server: str, workload: Workload, out: dict[str, Any]) -> Cell:
        """Metrics from the load generator's JSON line; failed if it saw errors."""
        errors, mism = int(out["errors"]), int(out["mismatches"])
        ops, elapsed, cpu = int(out["ops"]), float(out["elapsed"]), float(out["cpu_s"])
        m: dict[str, float] = {}
        problem = ""
        if mism:
            problem = f"{mism} wrong echoes"
        elif errors:
            problem = f"{errors} connection errors"
        if workload.name in ("rate", "rt"):
            if ops == 0:
                problem = problem or "no round trip completed"
            else:
                m = {
                    "per_s": ops / elapsed,
                    "p50_us": float(out["p50_us"]),
                    "p99_us": float(out["p99_us"]),
                    "cpu_us": cpu / ops * 1e6,
                }
        elif workload.name == "bulk":
            mb = int(out["bytes"]) / 1e6
            if mb == 0:
                problem = problem or "nothing echoed"
            else:
                m = {"mb_s": mb / elapsed, "cpu_ms_mb": cpu / mb * 1e3}
        else:
            held = int(out["held"])
            if held != workload.conns:
                problem = problem or f"only {held} of {workload.conns} connections held"
            else:
                delta_kib = int(out["rss_after_kb"]) - int(out["rss_before_kb"])
                m = {"kib_conn": delta_kib / held}
        if m and "server_procs" in out:
            # The size of the server's process tree the CPU/RSS sum covered.
            m["procs"] = float(out["server_procs"])
        return cls(server, workload, not problem, problem, m if not problem else {})

    @classmethod
    def from_wrk(cls, server: str, workload: Workload, out: dict[str, Any]) -> Cell:
        """Metrics from wrk's summary (benchmarks/wrk.py); failed if wrk saw
        a socket error or a status of 400 or more (wrk counts those)."""
        requests, status = int(out["requests"]), int(out["status"])
        socket_errors = {
            k: int(out[k]) for k in ("connect", "read", "write", "timeout")
        }
        problem = ""
        if status:
            problem = f"{status} non-2xx responses"
        elif any(socket_errors.values()):
            problem = "socket errors " + ", ".join(
                f"{k} {v}" for k, v in socket_errors.items()
            )
        elif requests == 0:
            problem = "no request completed"
        if problem:
            return cls.failed(server, workload, problem)
        cpu = float(out["cpu_s"])
        return cls(
            server,
            workload,
            True,
            "",
            {
                "per_s": requests / (int(out["duration_us"]) / 1e6),
                "p50_us": float(out["p50_us"]),
                "p99_us": float(out["p99_us"]),
                "cpu_us": cpu / requests * 1e6,
                "procs": float(out["server_procs"]),
            },
        )

    @classmethod
    def from_overload(
        cls, server: str, workload: Workload, out: dict[str, Any]
    ) -> Cell:
        """Metrics from benchmarks/overload.py's client; failed if no burn or
        no ping completed (the server served nothing under the flood)."""
        if int(out["burns"]) == 0:
            return cls.failed(server, workload, "no burn request completed")
        if int(out["pings"]) == 0:
            return cls.failed(server, workload, "no ping answered")
        return cls(
            server,
            workload,
            True,
            "",
            {
                "ping_p50_ms": float(out["ping_p50_ms"]),
                "ping_p99_ms": float(out["ping_p99_ms"]),
                "ping_max_ms": float(out["ping_max_ms"]),
                "pings_per_s": int(out["pings"]) / float(out["elapsed"]),
                "burns_per_s": float(out["burns_per_s"]),
            },
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "workload": self.workload.name,
            "ok": self.ok,
            "error": self.error,
            "metrics": self.metrics,
        }

    def one_line(self) -> str:
        if not self.ok:
            return f"{self.workload.name:5} {self.server:17} FAILED: {self.error}"
        vals = "  ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
        return f"{self.workload.name:5} {self.server:17} {vals}"


#: Per workload: (metric key, column header, show a ratio vs trio).
COLUMNS: Final[dict[str, list[tuple[str, str, bool]]]] = {
    "rate": [
        ("per_s", "conn/s", True),
        ("p50_us", "p50 µs", False),
        ("p99_us", "p99 µs", False),
        ("cpu_us", "server CPU µs/conn", True),
    ],
    "rt": [
        ("per_s", "round trips/s", True),
        ("p50_us", "p50 µs", False),
        ("p99_us", "p99 µs", False),
        ("cpu_us", "server CPU µs/rt", True),
    ],
    "bulk": [("mb_s", "MB/s echoed", True), ("cpu_ms_mb", "server CPU ms/MB", True)],
    "idle": [("kib_conn", "server KiB/conn (VmRSS)", True)],
    "http": [
        ("per_s", "requests/s", True),
        ("p50_us", "p50 µs", False),
        ("p99_us", "p99 µs", False),
        ("cpu_us", "server CPU µs/req", True),
    ],
    "overload": [
        ("ping_p50_ms", "established p50 ms", False),
        ("ping_p99_ms", "established p99 ms", False),
        ("ping_max_ms", "established max ms", False),
        ("pings_per_s", "pings/s", False),
        ("burns_per_s", "flood served/s", False),
    ],
}

#: (workload, metric, label) of the headline ratios ours / trio.serve_tcp.
HEADLINE: Final = [
    ("rate", "cpu_us", "server CPU per accepted connection"),
    ("rate", "per_s", "connections/s"),
    ("rt", "per_s", "round trips/s"),
    ("rt", "cpu_us", "server CPU per round trip"),
    ("bulk", "mb_s", "bulk MB/s"),
    ("idle", "kib_conn", "memory per idle connection"),
    ("http", "per_s", "HTTP requests/s (h11, wrk)"),
    ("http", "cpu_us", "server CPU per HTTP request"),
]


def fmt(v: float) -> str:
    """3 significant digits, k/M suffixes for large numbers."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def values(cells: Sequence[Cell], server: str, workload: str, key: str) -> list[float]:
    return [
        c.metrics[key]
        for c in cells
        if c.ok and c.server == server and c.workload.name == workload
    ]


def median(cells: Sequence[Cell], server: str, workload: str, key: str) -> float | None:
    vs = values(cells, server, workload, key)
    return statistics.median(vs) if vs else None


def tables(
    cells: Sequence[Cell],
    servers: Sequence[str],
    workloads: Sequence[Workload],
    names: Mapping[str, str],
    workload_names: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """Markdown tables, one per workload: median (min-max) over rounds.

    A workload's table has a row for each server that ran in it (the http
    workload runs only some); ``workload_names`` describes a server where
    it is a different program in one workload (``ours`` is the echo example
    in the echo workloads, the HTTP example in http).
    """
    out: list[str] = []
    head = [
        (wname, k, label)
        for wname, k, label in HEADLINE
        if OURS in servers
        and BASELINE in servers
        and wname in {x.name for x in workloads}
    ]
    if head:
        out.append("**ours / trio.serve_tcp** (ratio of medians; >1 means more):\n")
        for wname, k, label in head:
            a, b = median(cells, OURS, wname, k), median(cells, BASELINE, wname, k)
            ratio_s = f"{a / b:.2f}x" if a is not None and b else "n/a"
            out.append(f"- {label}: {ratio_s}")
        out.append("")
    for w in workloads:
        cols = COLUMNS[w.name]
        out.append(f"## {w.name}: {w.what} ({w.conns} connections)\n")
        header = ["server"]
        for _key, label, ratio in cols:
            header.append(label)
            if ratio and BASELINE in servers:
                header.append("x trio")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|")
        described = {**names, **(workload_names or {}).get(w.name, {})}
        for s in servers:
            mine = [c for c in cells if c.server == s and c.workload.name == w.name]
            if not mine:
                continue  # not a server of this workload
            bad = sum(not c.ok for c in mine)
            label_s = f"{s} ({described.get(s, s)})"
            if bad:
                label_s += f" **{bad}/{len(mine)} rounds FAILED**"
            row = [label_s]
            for key, _label, ratio in cols:
                vs = values(cells, s, w.name, key)
                if vs:
                    med = statistics.median(vs)
                    spread = f" ({fmt(min(vs))}..{fmt(max(vs))})" if len(vs) > 1 else ""
                    row.append(fmt(med) + spread)
                else:
                    row.append("FAILED" if mine else "-")
                if ratio and BASELINE in servers:
                    base = median(cells, BASELINE, w.name, key)
                    row.append(
                        f"{statistics.median(vs) / base:.2f}" if vs and base else "-"
                    )
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def markdown(
    table: str,
    *,
    command: str,
    date: str,
    machine: Machine,
    rounds: int,
    duration: float,
    cpus: tuple[list[int], list[int]],
    elapsed: float,
    load: tuple[float, float],
) -> str:
    pinning = (
        f"server on CPU {cpus[0]}, load generator on CPUs {cpus[1]}"
        if cpus[0]
        else "no pinning (one CPU)"
    )
    if len(cpus[0]) == 1:
        workers_note = (
            "Here the server is pinned to one CPU, so with 2 workers the"
            " supervisor and both workers **share that one CPU**: the row shows"
            " what distributing connections over processes with SO_REUSEPORT"
            " costs, not a speed-up. On a machine with more cores the workers"
            " should get a CPU each (pin the server to 2+ CPUs) to show scaling."
        )
    else:
        workers_note = (
            f"Here the server may use CPUs {cpus[0] or 'any'}; with fewer CPUs"
            " than workers they share them, and the row shows the cost of the"
            " SO_REUSEPORT distribution rather than a speed-up."
        )
    workers_note = textwrap.fill(
        workers_note, width=76, initial_indent="  ", subsequent_indent="  "
    )
    busy = (
        ": above the benchmark's own ~2, so other jobs shared the CPUs, which"
        " spreads the rates (see min..max); CPU time per operation is steadier."
        if max(load) > 2.5
        else " (the benchmark's own is ~2: no other significant load)."
    )
    return f"""# Benchmarks: echo and HTTP servers side by side

Produced by `{command}` on {date} in {elapsed:.0f} s. Regenerate with
`python -m benchmarks` (about 10-15 minutes); `python -m benchmarks --smoke`
is the quick check CI runs.

Machine: {machine.nproc} CPUs ({machine.cpu}), Linux {machine.kernel},
Python {machine.python}, libevent {machine.libevent}. {pinning}.
The 1-minute load average was {load[0]:.1f} at the start and {load[1]:.1f} at
the end{busy}
{rounds} rounds of {duration} s per cell; in each round every server runs
once per workload, each cell in a fresh server process. Figures are the
median over rounds, with (min-max).

How it is measured (benchmarks/run.py, benchmarks/c/loadgen.c,
benchmarks/wrk.py):

- The load generator is C (epoll, one thread per CPU it is pinned to) and
  checks every echoed byte; the server's CPU time (utime+stime from
  /proc/PID/stat) and VmRSS are read by it at the edges of the measurement
  window, summed over the server's whole process tree (for `ours-2w` the
  supervisor and its two workers; a single-process server is a tree of one).
- **Server CPU per connection / round trip / MB** is the figure to compare
  when the load generator, not the server, is the limit: on a 2-CPU machine
  the C servers (and possibly uvloop) outrun one load-generator CPU, so their
  rates are a lower bound, while their CPU per operation is not.
- rate: 50 clients each connect, send 64 B, read the echo, close, repeat
  (latency = connect to echo). rt: 100 persistent connections doing 64 B
  round trips. bulk: 8 connections streaming with 256 KiB in flight each.
  idle: 5,000 connections, each after one round trip, held; memory is the
  server's VmRSS growth divided by 5,000.
- Echo servers: `ours` is `examples/echo.py` (trio_evlisten, CLOSE_ON_FREE |
  REUSEABLE); `trio` is `trio.serve_tcp` with the same handler; the asyncio,
  uvloop, libevent and epoll servers are in benchmarks/pyservers.py and
  benchmarks/c/.
- `ours-2w` is `python -m trio_evlisten.workers --workers 2` (same echo
  handler): a supervisor and 2 worker processes, each with its own listening
  socket on the port (SO_REUSEPORT), the kernel spreading connections over
  them; the harness waits until both workers listen before the load starts.
{workers_note}
- http: `wrk` (keep-alive, 50 connections, one thread per load-generator
  CPU, pinned there) sends `GET /` and gets a 14-byte body. `ours` is
  `examples/http_server.py` (h11 on trio_evlisten), `trio` is the same
  `serve_http` function on `trio.serve_listeners` (what `trio.serve_tcp`
  runs), `asyncio-streams` is `asyncio.start_server` with h11, the example's
  connection class ported step by step (benchmarks/pyservers.py). All three
  behave alike, so the row compares listeners, not applications: an idle
  timeout (one deadline per connection, moved before each request), a drain
  on SIGINT/SIGTERM (idle keep-alive connections closed, the request under
  way answered with `Connection: close`), one write per response. The
  hidden servers `ours-bare`, `ours-no-timeout`, `ours-no-drain` and
  `ours-split-writes` (selectable with `--servers`) leave one feature out,
  to measure what it costs per request. In protocol mode, `ours-protocol`
  is `examples/http_protocol.py` (an h11 `HTTPProtocol`, its idle timeout
  and drain done by one sweep task), and `asyncio-protocol` and
  `uvloop-protocol` serve that very `HTTPProtocol` on their loops with the
  same sweep and drain: the same application on three loops. The hidden
  `ours-protocol-bare` leaves the sweep task out. The server's CPU
  time is read from /proc right before wrk starts and right after it exits
  (benchmarks/wrk.py), so CPU per request also carries the 50 connects and
  closes; requests/s and latencies are wrk's own. A socket error or a status
  of 400 or more fails the cell.
- overload (benchmarks/overload.py): one server process whose handler
  echoes, burning 20 ms of CPU first for each `b`. The client (Python, in
  its own process on the load generator's CPUs) opens 10 connections and
  does one round trip on each, then for the cell's duration those 10 ping
  in a loop while 64 tasks each open a new connection, ask for a burn,
  wait, close and start over. Established p50/p99/max is the pings' round
  trip (a ping unanswered at the end counts with the time it waited);
  flood served/s is the burns completed per second (at most 50 on one
  CPU). `ours` is trio_evlisten with no bound, `ours-lag` the same with
  `max_loop_lag=0.05`; `trio` and `asyncio-streams` run the same handler.

![chart](bench.png)

{table}
"""


def write_chart(
    cells: Sequence[Cell],
    servers: Sequence[str],
    workloads: Sequence[Workload],
    path: Path,
) -> None:
    """Horizontal bar panels, two per workload (one for idle): median with a
    min-max whisker per server that ran in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (w, k, label)
        for w, k, label in [
            ("rate", "per_s", "connections/s (higher is better)"),
            ("rate", "cpu_us", "server CPU µs per connection (lower)"),
            ("rt", "per_s", "round trips/s, 100 conns (higher)"),
            ("rt", "cpu_us", "server CPU µs per round trip (lower)"),
            ("bulk", "mb_s", "bulk MB/s echoed, 8 conns (higher)"),
            ("idle", "kib_conn", "server KiB per idle connection (lower)"),
            ("http", "per_s", "HTTP requests/s, h11, 50 conns (higher)"),
            ("http", "cpu_us", "server CPU µs per HTTP request (lower)"),
            ("overload", "ping_p99_ms", "overload: established p99 ms (lower)"),
            ("overload", "burns_per_s", "overload: flood served/s (higher)"),
        ]
        if w in {x.name for x in workloads}
    ]
    if not panels:
        return
    ncols = 2
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 3.2 * nrows), squeeze=False)
    colors = {OURS: "#e66101", OURS_WORKERS: "#fdb863", BASELINE: "#5e3c99"}
    for ax, (w, k, label) in zip(axes.flat, panels, strict=False):
        ran = {c.server for c in cells if c.workload.name == w}
        order = [s for s in reversed(servers) if s in ran]
        meds, lo, hi = [], [], []
        for s in order:
            vs = values(cells, s, w, k)
            m = statistics.median(vs) if vs else 0.0
            meds.append(m)
            lo.append(m - min(vs) if vs else 0.0)
            hi.append(max(vs) - m if vs else 0.0)
        ax.barh(
            order,
            meds,
            xerr=[lo, hi],
            color=[colors.get(s, "#999999") for s in order],
            capsize=3,
        )
        right = max([m + h for m, h in zip(meds, hi, strict=True)] + [1e-9])
        for y, (m, h) in enumerate(zip(meds, hi, strict=True)):
            # The label goes past the whisker so the two never overlap.
            ax.text(m + h + right * 0.01, y, fmt(m), va="center", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, right * 1.18)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "Echo and HTTP servers on loopback: median over rounds, whiskers min-max"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def profile_summary(directory: Path, top: int = 20) -> str:
    """Top functions by self and inclusive samples from py-spy raw output.

    Files are grouped by server and workload (``ours-rate-r1.txt`` ->
    ``ours-rate``); line numbers are dropped so a function is one row.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(directory.glob("*.txt")):
        groups[f.stem.rsplit("-r", 1)[0]].append(f)
    out: list[str] = []
    for name, files in groups.items():
        self_c: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for f in files:
            for line in f.read_text(errors="replace").splitlines():
                m = _LINE.match(line)
                if not m:
                    continue
                n = int(m.group(2))
                frames = [_FRAME_LINE.sub(")", fr) for fr in m.group(1).split(";")]
                total += n
                self_c[frames[-1]] += n
                for fr in set(frames):
                    incl[fr] += n
        if not total:
            continue
        out.append(f"## py-spy: {name} ({total} samples)\n\ntop self:")
        out += [f"  {100 * n / total:5.1f}%  {fr}" for fr, n in self_c.most_common(top)]
        out.append("top inclusive:")
        out += [f"  {100 * n / total:5.1f}%  {fr}" for fr, n in incl.most_common(top)]
        out.append("")
    return "\n".join(out)
