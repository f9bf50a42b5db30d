"""Slow-client attacks on a listener, measured: what they cost the server
and what they do to honest clients' latency.

::

    python -m benchmarks.attack proxy-dribble     # ~20 s, loopback only
    python -m benchmarks.attack all               # every mode, one after another
    python -m benchmarks.attack silent tls-silent --connections 500

Each mode starts a fresh echo server (``open_listener`` on 127.0.0.1:0) in a
subprocess pinned to CPU 0, then an attacker subprocess that holds
``--connections`` connections open (one process, non-blocking sockets, one
timer loop; a connection the server closes is opened again at once, as a
real attacker would), then runs honest clients from this process for
``--duration`` seconds at ``--rate`` per second, open-loop. It prints one
table row per mode: the honest clients' latency (p50, p99; a client that
failed or took over ``--timeout`` counts as infinitely slow), and the
server's CPU over the measurement window from ``/proc/PID/stat``.

Modes:

``baseline``
    The PROXY server, no attack: honest latency alone.
``proxy-dribble``
    ``proxy_protocol=True``; each attacking connection sends
    ``PROXY TCP4 ...`` one byte per second and never completes it (it is
    dropped at ``proxy_timeout``, 5 s, and comes back). An honest client
    sends a valid header and 64 bytes and waits for their echo.
``silent``
    The same server; the attacking connections send nothing.
``tls-baseline``
    ``ssl_context=`` and ``max_connections=100``, no attack: an honest
    client's latency is to the end of its TLS handshake (then it checks
    the echo of 64 bytes).
``tls-silent``
    The TLS server; the attacking connections never send a ClientHello.

Targets (printed as met/missed; the exit status does not depend on them):
server CPU <= 10 % of a core and honest p99 <= 100 ms for the PROXY
attacks, honest p99 <= 500 ms for ``tls-silent``.

Error handling: a server that does not start or dies, or an attacker that
does not get ready, fails its mode (exit status 1, the others still run);
the reason and the process's last output are printed.

Resource handling: every subprocess is stopped and reaped in a ``finally``
before the next mode starts; the certificate lives in a temporary directory
removed at exit; the file-descriptor limit is raised (soft to hard) in each
process that needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

ROOT: Final = Path(__file__).resolve().parent.parent

#: What an honest PROXY client sends before its payload.
HONEST_HEADER: Final = b"PROXY TCP4 192.0.2.1 127.0.0.1 56324 443\r\n"
#: What a dribbling attacker sends, a byte a second, never its last byte.
ATTACK_HEADER: Final = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n"
PAYLOAD: Final = bytes(range(64))
#: The attacker's timer: each tick serves 1/TICKS_PER_SECOND of the
#: connections, so the bytes are spread over the second, not sent in bursts.
TICKS_PER_SECOND: Final = 100
TLS_MAX_CONNECTIONS: Final = 100


@attrs.frozen
class Mode:
    """One scenario: the server's options, the attack, and the targets."""

    name: str
    proxy: bool
    tls: bool
    attack: str | None  # None, "dribble" or "silent"
    cpu_target: float | None  # percent of one core
    p99_target: float | None  # seconds


MODES: Final = {
    m.name: m
    for m in [
        Mode("baseline", True, False, None, None, None),
        Mode("proxy-dribble", True, False, "dribble", 10.0, 0.100),
        Mode("silent", True, False, "silent", 10.0, 0.100),
        Mode("tls-baseline", False, True, None, None, None),
        Mode("tls-silent", False, True, "silent", None, 0.500),
    ]
}


# ----------------------------------------------------------------------
# Shared helpers


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def pin(cpu: int) -> None:
    """Run this process on ``cpu`` only, where the machine has it."""
    with contextlib.suppress(AttributeError, OSError):
        if cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after it do not.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------
# The server (a subprocess): ``python -m benchmarks.attack _server ...``


async def serve(proxy: bool, cert: str | None, max_connections: int | None) -> None:
    """An echo listener on 127.0.0.1:0; prints ``PORT n`` once accepting."""
    from trio_evlisten import ConnListener, Flag, open_listener

    ctx = None
    if cert is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert)

    async def echo(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        async for data in conn:
            await conn.send_all(data)

    async with open_listener(
        echo,
        address=("127.0.0.1", 0),
        flags=Flag.CLOSE_ON_FREE,
        proxy_protocol=proxy,
        ssl_context=ctx,
        max_connections=max_connections,
    ) as listener:
        print(f"PORT {listener.port}", flush=True)
        await trio.sleep_forever()


# ----------------------------------------------------------------------
# The attacker (a subprocess): ``python -m benchmarks.attack _attack ...``


@attrs.define
class Slot:
    """One attacking connection, reopened whenever the server drops it."""

    sock: socket.socket
    connected: bool = False
    sent: int = 0


def attack(port: int, n: int, how: str, ramp: float, limit: float) -> dict[str, Any]:
    """Hold ``n`` connections to 127.0.0.1:``port`` until SIGTERM (or ``limit`` s).

    ``how`` is ``"dribble"`` (one byte of :data:`ATTACK_HEADER` per second
    per connection, never the last) or ``"silent"``. Prints ``READY k`` once
    all ``n`` are connected (or ``ramp`` seconds have passed, with k < n).

    Returns:
        Counts over the attacker's life: connects, reconnects, bytes sent,
        errors, and its duration.
    """
    sel = selectors.DefaultSelector()
    stats = {"connects": 0, "reconnects": 0, "bytes": 0, "errors": 0}
    slots: list[Slot | None] = [None] * n
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)

    def open_slot(i: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            stats["errors"] += 1
            sock.close()
            slots[i] = None  # tried again on the next tick
            return
        slots[i] = Slot(sock)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)

    def drop(i: int) -> None:
        slot = slots[i]
        if slot is not None:
            sel.unregister(slot.sock)
            slot.sock.close()
            slots[i] = None

    started = time.monotonic()
    # Every slot opens on its own tick, so the connections (and so their
    # timeouts and reconnections) are spread over the second, not opened
    # and dropped all at once: the steady cost of an attack, not a burst.
    ready = False
    tick = 0
    next_tick = started
    while not stop and time.monotonic() - started < limit:
        timeout = max(0.0, next_tick - time.monotonic())
        for key, events in sel.select(timeout):
            i = key.data
            slot = slots[i]
            assert slot is not None
            if not slot.connected and events & selectors.EVENT_WRITE:
                if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    stats["errors"] += 1
                    drop(i)
                    continue
                slot.connected = True
                stats["connects"] += 1
                sel.modify(slot.sock, selectors.EVENT_READ, i)
            if events & selectors.EVENT_READ:
                # The server closed (or reset) it: it comes back at once.
                try:
                    if slot.sock.recv(4096):
                        continue  # the server never answers; ignore it if it does
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # a reset: closed all the same
                drop(i)
                stats["reconnects"] += 1
                open_slot(i)
        if time.monotonic() < next_tick:
            continue
        next_tick += 1 / TICKS_PER_SECOND
        for i in range(tick % TICKS_PER_SECOND, n, TICKS_PER_SECOND):
            slot = slots[i]
            if slot is None:
                open_slot(i)
            elif (
                how == "dribble"
                and slot.connected
                and slot.sent < len(ATTACK_HEADER) - 1
            ):
                try:
                    slot.sent += slot.sock.send(
                        ATTACK_HEADER[slot.sent : slot.sent + 1]
                    )
                    stats["bytes"] += 1
                except BlockingIOError:  # 1 byte a second: never, in practice
                    pass
                except OSError:
                    drop(i)
                    stats["reconnects"] += 1
                    open_slot(i)
        tick += 1
        if not ready:
            connected = sum(1 for s in slots if s is not None and s.connected)
            if connected == n or time.monotonic() - started > ramp:
                print(f"READY {connected}", flush=True)
                ready = True
    for i in range(n):
        drop(i)
    sel.close()
    return {**stats, "seconds": time.monotonic() - started}


# ----------------------------------------------------------------------
# Honest clients (this process)


async def honest_proxy(port: int) -> float:
    """Connect, send a header and 64 bytes, get them back: the seconds taken."""
    start = time.perf_counter()
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(HONEST_HEADER + PAYLOAD)
        back = b""
        while len(back) < len(PAYLOAD):
            chunk = await sock.recv(len(PAYLOAD) - len(back))
            if not chunk:
                raise OSError("the server closed before echoing")
            back += chunk
        if back != PAYLOAD:
            raise OSError("wrong echo")
        return time.perf_counter() - start


async def honest_tls(port: int, ctx: ssl.SSLContext) -> float:
    """Connect and finish a TLS handshake (the seconds taken); check an echo."""
    start = time.perf_counter()
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    tls = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname="127.0.0.1")
    try:
        await tls.do_handshake()
        took = time.perf_counter() - start
        await tls.send_all(PAYLOAD)
        back = b""
        while len(back) < len(PAYLOAD):
            chunk = await tls.receive_some(len(PAYLOAD) - len(back))
            if not chunk:
                raise OSError("the server closed before echoing")
            back += chunk
        if back != PAYLOAD:
            raise OSError("wrong echo")
        return took
    finally:
        await trio.aclose_forcefully(tls)


async def honest_phase(
    port: int,
    ctx: ssl.SSLContext | None,
    rate: float,
    duration: float,
    limit: float,
    window_end: Callable[[], object],
) -> list[float]:
    """Start a client every 1/``rate`` s for ``duration`` s; their latencies.

    A client that fails or takes over ``limit`` s counts as ``math.inf``.
    ``window_end`` is called one interval after the last client started
    (the end of the measurement window; stragglers are waited for after).
    """
    results: list[float] = []

    async def one() -> None:
        took = math.inf
        with trio.move_on_after(limit):
            try:
                if ctx is None:
                    took = await honest_proxy(port)
                else:
                    took = await honest_tls(port, ctx)
            except (OSError, trio.BrokenResourceError):
                pass
        results.append(took)

    count = max(1, round(rate * duration))
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for i in range(count):
            await trio.sleep_until(start + i / rate)
            nursery.start_soon(one)
        await trio.sleep_until(start + count / rate)
        window_end()
    return results


# ----------------------------------------------------------------------
# Orchestration


@attrs.frozen
class Row:
    """One mode's figures."""

    mode: Mode
    attackers: int
    reconnects_per_s: float
    ok: int
    total: int
    p50: float
    p99: float
    cpu: float
    failed: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; inf counts."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Processes:
    """Subprocesses started here, stopped and reaped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], stderr: IO[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> str:
        """Stop ``proc`` with ``sig`` (then SIGKILL); its remaining stdout."""
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return out or ""

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


class ModeFailed(Exception):
    """A mode could not be measured; the message says why."""


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stdout line of ``proc`` starting with ``prefix``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            line = proc.stdout.readline()
            if not line:
                raise ModeFailed(f"exited with {proc.wait()} before {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    raise ModeFailed(f"no {prefix!r} line within {timeout} s")


def taskset(cpu: int) -> list[str]:
    """A ``taskset`` prefix pinning to ``cpu``, if the tool and the CPU exist.

    Call it before :func:`pin` narrows this process's own CPUs.
    """
    if shutil.which("taskset") is None or cpu not in os.sched_getaffinity(0):
        return []
    return ["taskset", "-c", str(cpu)]


def run_mode(
    mode: Mode, args: argparse.Namespace, cert: Path, client_ctx: ssl.SSLContext
) -> Row:
    """Measure one mode; raises :exc:`ModeFailed`."""
    procs = Processes()
    me = [sys.executable, "-m", "benchmarks.attack"]
    server_argv = [*args.server_prefix, *me, "_server"]
    if mode.proxy:
        server_argv.append("--proxy")
    if mode.tls:
        server_argv += ["--cert", str(cert), "--max-connections"]
        server_argv.append(str(TLS_MAX_CONNECTIONS))
    with tempfile.TemporaryFile("w+") as server_err:
        try:
            server = procs.start(server_argv, server_err)
            try:
                port = int(read_line(server, "PORT ", 20))
            except ModeFailed as exc:
                server_err.seek(0)
                raise ModeFailed(f"server {exc}: {server_err.read()[-2000:]}") from None
            attacker = None
            attackers = 0
            if mode.attack is not None and args.connections > 0:
                attacker = procs.start(
                    [
                        *me,
                        "_attack",
                        str(port),
                        str(args.connections),
                        mode.attack,
                        "--ramp",
                        str(args.ramp),
                        "--limit",
                        str(
                            args.ramp + args.warmup + args.duration + args.timeout + 60
                        ),
                    ],
                    sys.stderr,
                )
                try:
                    attackers = int(read_line(attacker, "READY ", args.ramp + 30))
                except ModeFailed as exc:
                    raise ModeFailed(f"attacker {exc}") from None
            time.sleep(args.warmup)
            if server.poll() is not None:
                raise ModeFailed(f"the server died (exit {server.returncode})")
            window = [cpu_seconds(server.pid), time.monotonic()]

            def window_end() -> None:
                window.extend([cpu_seconds(server.pid), time.monotonic()])

            latencies = trio.run(
                honest_phase,
                port,
                client_ctx if mode.tls else None,
                args.rate,
                args.duration,
                args.timeout,
                window_end,
            )
            cpu0, wall0, cpu1, wall1 = window
            if server.poll() is not None:
                raise ModeFailed(f"the server died (exit {server.returncode})")
            reconnects = 0.0
            if attacker is not None:
                out = procs.stop(attacker, signal.SIGTERM)
                stats = json.loads(out.rsplit("STATS ", 1)[1])
                reconnects = stats["reconnects"] / stats["seconds"]
        finally:
            procs.stop_all()
    ok = sum(1 for x in latencies if math.isfinite(x))
    return Row(
        mode=mode,
        attackers=attackers,
        reconnects_per_s=reconnects,
        ok=ok,
        total=len(latencies),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        cpu=100 * (cpu1 - cpu0) / (wall1 - wall0),
    )


def fmt_ms(seconds: float, timeout: float) -> str:
    if not math.isfinite(seconds):
        return f">{timeout * 1000:.0f}"
    return f"{seconds * 1000:.1f}"


def verdict(row: Row) -> str:
    if row.failed is not None:
        return f"FAILED: {row.failed}"
    misses = []
    if row.mode.cpu_target is not None and row.cpu > row.mode.cpu_target:
        misses.append(f"CPU > {row.mode.cpu_target:.0f} %")
    if row.mode.p99_target is not None and row.p99 > row.mode.p99_target:
        misses.append(f"p99 > {row.mode.p99_target * 1000:.0f} ms")
    if misses:
        return "missed: " + ", ".join(misses)
    if row.mode.cpu_target is None and row.mode.p99_target is None:
        return "-"
    return "met"


def table(rows: Sequence[Row], timeout: float) -> str:
    lines = [
        "| mode | attackers | reconnects/s | honest ok | p50 ms | p99 ms "
        "| server CPU % | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r.failed is not None:
            lines.append(f"| {r.mode.name} | | | | | | | {verdict(r)} |")
            continue
        lines.append(
            f"| {r.mode.name} | {r.attackers} | {r.reconnects_per_s:.0f} "
            f"| {r.ok}/{r.total} | {fmt_ms(r.p50, timeout)} "
            f"| {fmt_ms(r.p99, timeout)} | {r.cpu:.1f} | {verdict(r)} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def certificate() -> Iterator[tuple[Path, ssl.SSLContext]]:
    """A server certificate file for 127.0.0.1 and a client context trusting it."""
    import trustme

    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "server.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(pem)
        )
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        yield pem, ctx


def main(argv: Sequence[str]) -> int:
    """The command line; see the module's docstring."""
    if argv[:1] == ["_server"]:
        p = argparse.ArgumentParser(prog="attack _server")
        p.add_argument("--proxy", action="store_true")
        p.add_argument("--cert")
        p.add_argument("--max-connections", type=int)
        a = p.parse_args(argv[1:])
        raise_nofile()
        trio.run(serve, a.proxy, a.cert, a.max_connections)
        return 0  # pragma: no cover - serves until killed
    if argv[:1] == ["_attack"]:
        p = argparse.ArgumentParser(prog="attack _attack")
        p.add_argument("port", type=int)
        p.add_argument("connections", type=int)
        p.add_argument("how", choices=["dribble", "silent"])
        p.add_argument("--ramp", type=float, default=10.0)
        p.add_argument("--limit", type=float, default=120.0)
        a = p.parse_args(argv[1:])
        raise_nofile()
        pin(1)
        stats = attack(a.port, a.connections, a.how, a.ramp, a.limit)
        print("STATS " + json.dumps(stats), flush=True)
        return 0

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attack",
        description="Slow-client attacks on a listener, measured (loopback only).",
    )
    parser.add_argument(
        "modes", nargs="+", choices=[*MODES, "all"], help="what to run, in order"
    )
    parser.add_argument(
        "--connections", type=int, default=2000, help="attacking connections"
    )
    parser.add_argument(
        "--duration", type=float, default=15.0, help="measurement window, s"
    )
    parser.add_argument(
        "--rate", type=float, default=40.0, help="honest clients started per second"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="an honest client's time limit, s"
    )
    parser.add_argument(
        "--ramp", type=float, default=10.0, help="longest wait for the attack, s"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="attack alone before measuring, s"
    )
    args = parser.parse_args(argv)
    names = list(MODES) if "all" in args.modes else list(args.modes)
    limit = raise_nofile()
    if args.connections + 100 > limit:
        parser.error(f"--connections {args.connections} needs more than {limit} fds")
    args.server_prefix = taskset(0)
    pin(1)
    print(
        f"attack: {args.connections} connections, honest clients {args.rate:g}/s "
        f"for {args.duration:g} s (timeout {args.timeout:g} s); server "
        + ("pinned to CPU 0" if args.server_prefix else "not pinned (no taskset)"),
        flush=True,
    )
    rows = []
    with certificate() as (cert, client_ctx):
        for name in names:
            mode = MODES[name]
            try:
                row = run_mode(mode, args, cert, client_ctx)
            except ModeFailed as exc:
                row = Row(mode, 0, 0, 0, 0, math.inf, math.inf, math.nan, str(exc))
            print(f"{name}: {verdict(row)}", flush=True)
            rows.append(row)
    print()
    print(table(rows, args.timeout))
    return 1 if any(r.failed is not None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
