"""Micro-benchmark of the stream a handler gets: trio's, ours, and two floors.

Run from the repository's root (about 15 s on the defaults, 35 s more with
``--loadgen``)::

    python -m benchmarks.stream_micro
    python -m benchmarks.stream_micro --rounds 3 --round-trips 3000   # quick
    python -m benchmarks.stream_micro --loadgen     # + the C load generator
    python -m benchmarks.stream_micro --profile ours                 # cProfile
    python -m benchmarks.stream_micro --pieces      # unit costs, ns per call

Four echo servers, each one task per connected loopback TCP socket:

* ``trio``: :class:`trio.SocketStream`, handler ``async for data in stream:
  await stream.send_all(data)`` (the one ``benchmarks/pyservers.py`` runs);
* ``ours``: :class:`trio_evlisten._stream.SocketStream`, the same handler;
* ``floor``: the stdlib socket's ``recv``/``send`` with trio's checkpoint
  sandwich around each (:func:`trio.lowlevel.checkpoint_if_cancelled`
  before, :func:`~trio.lowlevel.cancel_shielded_checkpoint` after, a wait
  only on EAGAIN) and nothing else: a lower bound for any stream with
  trio's semantics built on trio's public API;
* ``bare``: ``recv``/``send`` and trio's waits only on EAGAIN: no schedule
  point when nothing waits (not a valid trio stream; the absolute floor).

What it measures, each as the median (min-max) of ``--rounds`` rounds, the
servers interleaved (shuffled) within a round:

* **round trip, one trio.run**: a client task (a bare loop, the same for
  every server) and the server task in one ``trio.run`` ping-pong 64-byte
  messages; CPU (:func:`time.process_time`: the whole process, client,
  server and trio's scheduler) per round trip.
* **round trip, server only**: the same with the client in a separate Python
  process, so the figure is the server's CPU alone. On one connection the
  server sleeps in ``epoll_wait`` and is woken for every message, and the
  kernel's cost of that (tens of microseconds on a VM) hides the stream's;
  so also over ``--many`` connections at once, where the server is busy and
  trio's scheduler passes are shared by the tasks ready together.
* **bulk, server only**: a client process streams ``--bulk-mib`` MiB in
  64 KiB writes through one connection and reads it back; server CPU per
  MiB, and MiB/s.
* **memory per idle connection**: ``--conns`` connections accepted and each
  parked in its server's receive; :mod:`tracemalloc`'s traced bytes, after
  minus before, per connection: the accepted socket object, the stream, the
  task and its coroutine frames, trio's per-fd epoll bookkeeping.
* with ``--loadgen``: each server in a process of its own, pinned to CPU 0,
  driven from CPU 1 by the project's C load generator
  (``benchmarks/c/loadgen.c``, built with gcc): rt (64 B round trips on 100
  connections) and bulk (8 connections), server CPU read from /proc as the
  project's benchmark does.

The machine's other load moves these figures by tens of percent from run to
run; compare servers within one run.

Error handling: a server that echoes wrong bytes, or a client that fails,
stops the run with an AssertionError. Resource handling: every socket, the
client processes and the server processes are closed, killed or reaped
before the measurement that made them returns; the load generator is built
in a temporary directory removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import trio
import trio.testing

from trio_evlisten._stream import SocketStream

HOST: Final = "127.0.0.1"
MESSAGE: Final = b"m" * 64
READ_SIZE: Final = 65536
KINDS: Final = ("trio", "ours", "floor", "bare")

Server = Callable[[socket.socket], Awaitable[None]]


# ----------------------------------------------------------------------
# The three servers: each owns ``conn`` and echoes until EOF.


async def serve_trio(conn: socket.socket) -> None:
    """Echo through :class:`trio.SocketStream`."""
    async with trio.SocketStream(trio.socket.from_stdlib_socket(conn)) as stream:
        async for data in stream:
            await stream.send_all(data)


async def serve_ours(conn: socket.socket) -> None:
    """Echo through our :class:`SocketStream`."""
    async with SocketStream(conn) as stream:
        async for data in stream:
            await stream.send_all(data)


def like_the_streams(conn: socket.socket) -> None:
    """Set ``conn`` up as both streams do: non-blocking, TCP_NODELAY, and
    TCP_NOTSENT_LOWAT 16 KiB (which matters for bulk)."""
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)


async def serve_bare(conn: socket.socket) -> None:
    """Echo with the stdlib socket and trio's waits, only on EAGAIN."""
    like_the_streams(conn)
    with conn:
        while True:
            try:
                data = conn.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            if not data:
                return
            try:
                sent = conn.send(data)
            except BlockingIOError:
                sent = 0
            if sent != len(data):
                await bare_send_rest(conn, data, sent)


async def bare_send_rest(sock: socket.socket, data: bytes, sent: int) -> None:
    """Send ``data`` from byte ``sent`` on, after a partial send (buffer full)."""
    with memoryview(data) as view:
        while sent < len(view):
            await trio.lowlevel.wait_writable(sock)
            with contextlib.suppress(BlockingIOError), view[sent:] as rest:
                sent += sock.send(rest)


async def serve_floor(conn: socket.socket) -> None:
    """The bare loop plus trio's checkpoints: what trio's semantics cost.

    Each receive and each send is a checkpoint even when it need not wait
    (:func:`trio.lowlevel.checkpoint_if_cancelled` before,
    :func:`~trio.lowlevel.cancel_shielded_checkpoint` after), as any trio
    stream must be; nothing else (no busy or closed checks, no errors
    translated).
    """
    like_the_streams(conn)
    with conn:
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = conn.recv(READ_SIZE)
            except BlockingIOError:
                data = await bare_wait_recv(conn)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            if not data:
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = conn.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                await bare_send_rest(conn, data, sent)


async def bare_wait_recv(sock: socket.socket) -> bytes:
    """Wait until ``sock`` is readable and receive."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(READ_SIZE)
        except BlockingIOError:
            pass


SERVERS: Final[dict[str, Server]] = {
    "trio": serve_trio,
    "ours": serve_ours,
    "floor": serve_floor,
    "bare": serve_bare,
}


# ----------------------------------------------------------------------
# Connections


def listening_socket(backlog: int = 128) -> socket.socket:
    """A non-blocking listening socket on 127.0.0.1, on a free port."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(backlog)
    lsock.setblocking(False)
    return lsock


async def accept(lsock: socket.socket) -> socket.socket:
    """The next connection, as the listener accepts it (blocking, as Python
    hands it; each server makes it non-blocking)."""
    while True:
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(lsock)
        else:
            return conn


async def connect(address: tuple[str, int]) -> socket.socket:
    """A non-blocking client socket connected to ``address``."""
    client = socket.socket()
    client.setblocking(False)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(address)
    except BlockingIOError:
        await trio.lowlevel.wait_writable(client)
    return client


async def pair() -> tuple[socket.socket, socket.socket]:
    """(accepted server-side socket, connected client socket)."""
    with listening_socket() as lsock:
        client = await connect(lsock.getsockname())
        return await accept(lsock), client


async def client_round_trips(client: socket.socket, n: int) -> None:
    """``n`` 64-byte ping-pongs from a bare client loop."""
    for _ in range(n):
        client.send(MESSAGE)  # 64 bytes always fit: the buffer is empty
        got = 0
        while got < len(MESSAGE):
            try:
                data = client.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(client)
                continue
            assert data == MESSAGE[: len(data)], data
            got += len(data)


# ----------------------------------------------------------------------
# Measurements


async def round_trip_cpu(kind: str, n: int) -> float:
    """Process CPU seconds per round trip, client and server in this trio.run."""
    conn, client = await pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(SERVERS[kind], conn)
        with client:
            await client_round_trips(client, min(n, 500))  # warm up
            start = time.process_time()
            await client_round_trips(client, n)
            cpu = time.process_time() - start
            client.shutdown(socket.SHUT_WR)
            await trio.lowlevel.wait_readable(client)  # the server closed
    return cpu / n


CLIENT_PROCESS: Final = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
msg = b"m" * 64
with socket.create_connection(("127.0.0.1", port)) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        s.sendall(msg)
        got = 0
        while got < 64:
            data = s.recv(65536)
            assert data, "the server closed early"
            got += len(data)
"""


CLIENTS_PROCESS: Final = """
import selectors, socket, sys
port, n, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
msg = b"m" * 64
sel = selectors.DefaultSelector()
pending = {}
for _ in range(k):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    pending[s] = 0
sent = done = 0
for s in pending:
    s.send(msg)
    sent += 1
while done < n:
    for key, _ in sel.select():
        s = key.fileobj
        data = s.recv(65536)
        assert data, "the server closed early"
        pending[s] += len(data)
        while pending[s] >= 64:
            pending[s] -= 64
            done += 1
            if sent < n:
                s.send(msg)
                sent += 1
for s in pending:
    s.close()
"""


BULK_PROCESS: Final = """
import socket, sys, threading
port, mib = int(sys.argv[1]), int(sys.argv[2])
chunk = bytes(range(256)) * 256
total = mib * 1024 * 1024
with socket.create_connection(("127.0.0.1", port)) as s:
    def write():
        for _ in range(total // len(chunk)):
            s.sendall(chunk)
    writer = threading.Thread(target=write)
    writer.start()
    got = 0
    while got < total:
        data = s.recv(1 << 20)
        assert data, "the server closed early"
        got += len(data)
    writer.join()
"""


async def server_cpu(
    kind: str, client: list[str], conns: int = 1
) -> tuple[float, float]:
    """(CPU, wall) seconds of ``conns`` ``kind`` servers driven by a client process.

    ``client`` is the client's Python code and arguments (after the port).
    Measured from just after the first accept until every server saw EOF:
    the servers' whole life but the first accept.
    """
    with listening_socket() as lsock:
        port = lsock.getsockname()[1]
        cmd = [sys.executable, "-c", client[0], str(port), *client[1:]]
        proc = await trio.lowlevel.open_process(cmd)
        try:
            conn = await accept(lsock)
            cpu, wall = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(SERVERS[kind], conn)
                for _ in range(conns - 1):
                    nursery.start_soon(SERVERS[kind], await accept(lsock))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            await proc.wait()
            assert proc.returncode == 0, f"the client failed: {proc.returncode}"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return cpu, wall


async def round_trip_cpu_server_only(kind: str, n: int, conns: int = 1) -> float:
    """The server's CPU seconds per round trip, the client in another process.

    With ``conns`` > 1 the client keeps one round trip in flight on each of
    ``conns`` connections, so trio's scheduler passes are shared by the tasks
    that are ready together, as in a busy server.
    """
    if conns == 1:
        client = [CLIENT_PROCESS, str(n)]
    else:
        client = [CLIENTS_PROCESS, str(n), str(conns)]
    cpu, _ = await server_cpu(kind, client, conns)
    return cpu / n


async def bulk_server_only(kind: str, mib: int) -> tuple[float, float]:
    """(server CPU seconds per MiB, MiB/s) echoing ``mib`` MiB in 64 KiB writes."""
    cpu, wall = await server_cpu(kind, [BULK_PROCESS, str(mib)])
    return cpu / mib, mib / wall


async def idle_bytes_per_conn(kind: str, conns: int) -> float:
    """tracemalloc bytes per accepted connection parked in its server."""
    with listening_socket(backlog=conns) as lsock:
        clients = []
        try:
            for _ in range(conns):
                clients.append(await connect(lsock.getsockname()))
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                async with trio.open_nursery() as nursery:
                    for _ in range(conns):
                        nursery.start_soon(SERVERS[kind], await accept(lsock))
                    await trio.testing.wait_all_tasks_blocked()
                    gc.collect()
                    after = tracemalloc.get_traced_memory()[0]
                    nursery.cancel_scope.cancel()
            finally:
                tracemalloc.stop()
        finally:
            for client in clients:
                client.close()
    return (after - before) / conns


# ----------------------------------------------------------------------
# Unit costs and the profile


async def pieces(n: int, repeats: int = 5) -> dict[str, float]:
    """Nanoseconds per call (the best of ``repeats``) of each stream operation.

    Each operation runs on the same connected socket through: the system
    calls alone; the "floor" (the same plus trio's checkpoint sandwich); our
    stream; trio's stream. The peer's half of each step (draining what was
    sent, or sending what is received) is in every figure alike.
    """
    conn, client = await pair()
    conn.setblocking(False)
    ours = SocketStream(conn)
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    ci = trio.lowlevel.checkpoint_if_cancelled
    csc = trio.lowlevel.cancel_shielded_checkpoint

    async def send_raw() -> None:
        conn.send(MESSAGE)
        client.recv(READ_SIZE)

    async def send_floor() -> None:
        await ci()
        conn.send(MESSAGE)
        await csc()
        client.recv(READ_SIZE)

    async def send_ours() -> None:
        await ours.send_all(MESSAGE)
        client.recv(READ_SIZE)

    async def send_trio() -> None:
        await theirs.send_all(MESSAGE)
        client.recv(READ_SIZE)

    async def recv_raw() -> None:
        client.send(MESSAGE)
        conn.recv(READ_SIZE)

    async def recv_floor() -> None:
        client.send(MESSAGE)
        await ci()
        conn.recv(READ_SIZE)
        await csc()

    async def recv_ours() -> None:
        client.send(MESSAGE)
        await ours.receive_some()

    async def recv_ours_iter() -> None:
        client.send(MESSAGE)
        await ours.__anext__()

    async def recv_trio() -> None:
        client.send(MESSAGE)
        await theirs.receive_some()

    async def eagain() -> None:
        with contextlib.suppress(BlockingIOError):
            conn.recv(READ_SIZE)

    cases: dict[str, Callable[[], Awaitable[object]]] = {
        "checkpoint_if_cancelled()": ci,
        "cancel_shielded_checkpoint() (a scheduler pass)": csc,
        "recv() raising BlockingIOError": eagain,
        "send 64 B: system calls alone": send_raw,
        "send 64 B: floor (+ checkpoints)": send_floor,
        "send 64 B: ours, send_all": send_ours,
        "send 64 B: trio, send_all": send_trio,
        "receive 64 B ready: system calls alone": recv_raw,
        "receive 64 B ready: floor (+ checkpoints)": recv_floor,
        "receive 64 B ready: ours, receive_some": recv_ours,
        "receive 64 B ready: ours, async for": recv_ours_iter,
        "receive 64 B ready: trio, receive_some": recv_trio,
    }
    best = dict.fromkeys(cases, float("inf"))
    with conn, client:
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.process_time()
                for _ in range(n):
                    await fn()
                best[name] = min(best[name], (time.process_time() - start) / n * 1e9)
    return best


def profile(kind: str, n: int) -> str:
    """cProfile of the ``kind`` server over ``n`` round trips (client apart)."""
    profiler = cProfile.Profile()
    profiler.enable()
    trio.run(round_trip_cpu_server_only, kind, n)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(18)
    return out.getvalue()


# ----------------------------------------------------------------------
# The run


# ----------------------------------------------------------------------
# The C load generator (--loadgen): the project benchmark's own client


async def serve_forever(kind: str) -> None:
    """Print the port, then serve every connection with ``kind`` (--serve)."""
    with listening_socket(backlog=4096) as lsock:
        print(lsock.getsockname()[1], flush=True)

        async def guarded(conn: socket.socket) -> None:
            # The load generator resets its connections when it is done.
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await SERVERS[kind](conn)

        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(guarded, await accept(lsock))


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """``argv`` pinned to ``cpu`` with taskset, when there are 2+ CPUs to pin to."""
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def loadgen_cell(
    loadgen: Path, kind: str, mode: str, conns: int, seconds: float
) -> tuple[float, float]:
    """One run of ``loadgen MODE`` against a fresh ``kind`` server process.

    Returns the server's CPU per round trip (rt, seconds) or per MiB (bulk),
    as /proc says (the load generator reads it at its window's edges), and
    the round trips or MiB per second.
    """
    argv = [sys.executable, "-m", "benchmarks.stream_micro", "--serve", kind]
    with subprocess.Popen(pinned(0, argv), stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            port = server.stdout.readline().strip()
            cmd = [str(loadgen), mode, port, "-c", str(conns), "-d", str(seconds)]
            cmd += ["-w", "0.3", "-p", str(server.pid)]
            done = subprocess.run(
                pinned(1, cmd),
                capture_output=True,
                text=True,
                timeout=seconds + 30,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"loadgen failed: {done.stderr.strip()}")
            cell = json.loads(done.stdout)
            assert cell["errors"] == cell["mismatches"] == 0, cell
        finally:
            server.kill()
    elapsed = float(cell["elapsed"])
    if mode == "rt":
        return float(cell["cpu_s"]) / int(cell["ops"]), int(cell["ops"]) / elapsed
    mib = int(cell["bytes"]) / 2**20
    return float(cell["cpu_s"]) / mib, mib / elapsed


def loadgen_runs(rounds: int, seconds: float) -> dict[str, dict[str, list[float]]]:
    """rt (100 connections) and bulk (8), ``rounds`` times, servers interleaved."""
    if shutil.which("gcc") is None:
        raise SystemExit("--loadgen needs gcc to build benchmarks/c/loadgen.c")
    results: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in KINDS}
        for name in ("lg_rt", "lg_rt_rate", "lg_bulk", "lg_bulk_rate")
    }
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = Path(tmp) / "loadgen"
        source = Path(__file__).resolve().parent / "c" / "loadgen.c"
        build = ["gcc", "-O2", "-pthread", "-o", str(loadgen), str(source)]
        subprocess.run(build, check=True)
        order = list(KINDS)
        for _ in range(rounds):
            random.shuffle(order)
            for kind in order:
                for key, mode, conns in (("lg_rt", "rt", 100), ("lg_bulk", "bulk", 8)):
                    cpu, rate = loadgen_cell(loadgen, kind, mode, conns, seconds)
                    results[key][kind].append(cpu)
                    results[f"{key}_rate"][kind].append(rate)
    return results


def summary(values: list[float], scale: float, fmt: str) -> str:
    """``median (min-max)`` of ``values`` times ``scale``."""
    med = statistics.median(values) * scale
    return f"{med:{fmt}} ({min(values) * scale:{fmt}}-{max(values) * scale:{fmt}})"


async def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Every measurement, ``args.rounds`` times, servers interleaved."""
    names = ("rt", "rt_server", "rt_server_many", "bulk_cpu", "bulk")
    results: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in KINDS} for name in (*names, "memory")
    }
    order = list(KINDS)
    for _ in range(args.rounds):
        random.shuffle(order)
        for kind in order:
            results["rt"][kind].append(await round_trip_cpu(kind, args.round_trips))
            results["rt_server"][kind].append(
                await round_trip_cpu_server_only(kind, args.round_trips)
            )
            results["rt_server_many"][kind].append(
                await round_trip_cpu_server_only(kind, args.round_trips, args.many)
            )
            cpu, rate = await bulk_server_only(kind, args.bulk_mib)
            results["bulk_cpu"][kind].append(cpu)
            results["bulk"][kind].append(rate)
    for kind in KINDS:  # deterministic: once is enough
        results["memory"][kind].append(await idle_bytes_per_conn(kind, args.conns))
    return results


def report(results: dict[str, dict[str, list[float]]], many: int) -> str:
    """The table, with ratios to trio.SocketStream."""
    rows = [
        ("round trip, one trio.run (CPU us)", "rt", 1e6, ".2f"),
        ("round trip, server only (CPU us)", "rt_server", 1e6, ".2f"),
        (f"  same, {many} connections (CPU us)", "rt_server_many", 1e6, ".2f"),
        ("bulk, server only (CPU ms/MiB)", "bulk_cpu", 1e3, ".2f"),
        ("bulk, server only (MiB/s)", "bulk", 1.0, ".0f"),
        ("memory per idle connection (B)", "memory", 1.0, ".0f"),
    ]
    lines = [
        f"{'':36s}" + "".join(f"{kind:>22s}" for kind in KINDS) + f"{'ours/trio':>11s}"
    ]
    rows += [
        ("C loadgen rt, 100 conns (CPU us)", "lg_rt", 1e6, ".2f"),
        ("C loadgen rt, 100 conns (k rt/s)", "lg_rt_rate", 1e-3, ".1f"),
        ("C loadgen bulk, 8 conns (CPU ms/MiB)", "lg_bulk", 1e3, ".2f"),
        ("C loadgen bulk, 8 conns (MiB/s)", "lg_bulk_rate", 1.0, ".0f"),
    ]
    for title, key, scale, fmt in rows:
        if key not in results:
            continue
        cells = [summary(results[key][k], scale, fmt) for k in KINDS]
        ratio = statistics.median(results[key]["ours"]) / statistics.median(
            results[key]["trio"]
        )
        lines.append(
            f"{title:36s}" + "".join(f"{c:>22s}" for c in cells) + f"{ratio:>10.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stream_micro", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--bulk-mib", type=int, default=64)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--many", type=int, default=50, help="connections at once")
    parser.add_argument("--profile", choices=KINDS, help="cProfile one server instead")
    parser.add_argument("--pieces", action="store_true", help="time the pieces instead")
    parser.add_argument(
        "--loadgen",
        action="store_true",
        help="also drive each server, in a process of its own, with the C load "
        "generator (needs gcc; about 40 s more)",
    )
    parser.add_argument("--loadgen-rounds", type=int, default=3)
    parser.add_argument("--loadgen-seconds", type=float, default=1.0)
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    # 2 fds per connection (client and server), plus a margin.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * args.conns + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve_forever, args.serve)
        return 0
    if args.profile:
        print(profile(args.profile, args.round_trips))
        return 0
    if args.pieces:
        for name, ns in trio.run(pieces, args.round_trips).items():
            print(f"{ns:8.0f} ns  {name}")
        return 0
    started = time.perf_counter()
    results = trio.run(measure, args)
    if args.loadgen:
        results.update(loadgen_runs(args.loadgen_rounds, args.loadgen_seconds))
    print(
        f"Python {sys.version.split()[0]}, trio {trio.__version__}; "
        f"{args.rounds} rounds of {args.round_trips} round trips, "
        f"{args.bulk_mib} MiB bulk, {args.conns} idle connections; "
        f"median (min-max); {time.perf_counter() - started:.0f} s"
    )
    print(report(results, args.many))
    return 0


if __name__ == "__main__":
    sys.exit(main())
