"""Stop a server under continuous load and count the connections it lost.

::

    python -m benchmarks.drain_load [--server single,workers] [--runs 5]
        [--clients 200] [--client-procs 2] [--load 1.0] [--sources 4096] [--pin]

The workload of issue 15 (defect 4): ``--clients`` clients, each in a tight
loop: a fresh socket bound to the next of ``--sources`` loopback addresses
(127.1.0.1, 127.1.0.2, ...: the whole of 127/8 is loopback on Linux, and so
many sources keep the clients clear of ephemeral-port exhaustion and spread
them over ``SO_REUSEPORT`` workers), ``connect()``, send one 64-byte line,
read its echo, close, and at once the next connection. After ``--load``
seconds of that, the server gets SIGTERM and the clients go on, unchanged,
until it has exited (and a little past that, when every connect is refused).

The clients are non-blocking ``epoll`` loops with no event library on top,
spread over ``--client-procs`` processes (this one and forked children), so
that they outrun the server: its accept queue must hold connections when the
signal comes, or there is nothing for a drain to lose. Each run says how
deep the queue was (``ss`` during the load and as the signal goes out, and
the single server's own ``statistics().queue_depth`` when it handled the
signal) and how busy the server and each client process were (CPU seconds
per second over the load), so that a run where the queue was empty, or the
clients were the limit, can be told apart from a server that drains well.

Servers (``--server``, comma-separated; each run starts a fresh one):

``single``
    One process: ``open_listener`` on 127.0.0.1 with ``drain_timeout=5``,
    the echo handler of :mod:`trio_evlisten.workers`, and a SIGTERM handler
    that leaves the ``async with`` block, which drains. It prints the accept
    queue's depth when it handled the signal and how many connections it
    accepted from then on.
``workers``
    ``python -m trio_evlisten.workers --workers 2 --drain-timeout 5``: the
    supervisor forwards SIGTERM to both workers, which drain.
``echo-cli``
    ``python -m trio_evlisten echo --drain-timeout 5`` (``listener.drain()``).
``reference``
    Not trio_evlisten: a plain epoll echo server whose drain accepts until
    the queue is empty and closes the socket in the same breath (see
    :func:`_serve_reference`); what an exact drain scores on this workload.

Each connection attempt ends in one of:

* ``ok``: echoed in full;
* ``refused``: ``connect()`` failed with ``ECONNREFUSED`` (nothing listens
  any more: the client can retry elsewhere; not a loss, counted apart);
* ``lost``: the TCP handshake had completed and then the connection was
  reset (``ECONNRESET``) or closed (EOF) before the echo came back. A reset
  reported as ``connect()``'s own result is a loss too (``at_connect``): the
  kernel reports a reset that ends the handshake as ``ECONNREFUSED``, so an
  ``ECONNRESET`` there means the handshake had completed and the client had
  not yet looked. Draining exists to make this zero, bar the few that race
  the final close;
* ``unresolved``: still open when the run ended (see the bounds below);
* ``other``: any other error (named on the run's line).

Outcomes are counted as before or after the signal by when they happened.

Bounds: the load lasts ``--load`` seconds; the server must exit within
:data:`SERVER_EXIT_TIMEOUT` seconds of the signal (else it is killed and
the run fails); the clients go on for :data:`AFTER_EXIT` seconds after
that, then start nothing new and give what is in flight
:data:`SETTLE` seconds. Loopback only.

Output: one line per run, one summary line per server (median, min and max
of the connections lost after the signal), and one JSON line with it all.
The exit status is 1 if a run failed (the server did not start, did not
exit, or lost a connection before the signal), else 0; the losses after the
signal do not change it (they are the measurement).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from typing import IO, TYPE_CHECKING, Any, Final

import attrs

from benchmarks.wrk import tree_cpu

if TYPE_CHECKING:
    from collections.abc import Iterator

PAYLOAD: Final = b"x" * 63 + b"\n"
HOST: Final = "127.0.0.1"
DRAIN_TIMEOUT: Final = 5.0
SERVER_START_TIMEOUT: Final = 15.0
SERVER_EXIT_TIMEOUT: Final = 15.0
#: Load goes on this long after the server exited (every connect refused).
AFTER_EXIT: Final = 0.2
#: What is still in flight then gets this long to end.
SETTLE: Final = 3.0
#: A client whose connect was refused waits this long before the next one,
#: so that the time after the server exited is not a busy loop.
REFUSED_PAUSE: Final = 0.001
#: How often ``ss`` samples the accept queue during the load.
SAMPLE_EVERY: Final = 0.25
#: The CPU time the reference server spends on each connection: about what
#: the trio_evlisten echo server spends (docs/benchmarks.md, "rate").
REFERENCE_COST: Final = 50e-6
REFERENCE_BATCH: Final = 64
KINDS: Final = ("single", "workers", "echo-cli", "reference")
# IP_BIND_ADDRESS_NO_PORT (Linux 4.2): bind() picks no port, connect() picks
# one unique for the whole 4-tuple, so binding a source address costs no
# port of its own (python < 3.12 has no name for it).
IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@attrs.define
class Counts:
    ok: int = 0
    refused: int = 0
    lost_reset: int = 0
    lost_eof: int = 0
    #: Of ``lost_reset``: reported as ``connect()``'s result.
    at_connect: int = 0
    unresolved: int = 0
    other: int = 0

    @property
    def lost(self) -> int:
        return self.lost_reset + self.lost_eof


@attrs.define
class Run:
    kind: str
    before: Counts
    after: Counts
    #: ``ss``'s accept-queue depth (summed over listeners) at each sample
    #: during the load; the last is taken as the signal is sent.
    queue_samples: list[int]
    #: What the single server said: queue depth at SIGTERM, accepted by the
    #: drain (empty for the others).
    server_report: dict[str, int]
    exit_after: float
    status: int | None
    other_errors: dict[str, int]
    rate: float
    #: CPUs busy during the load (CPU seconds per second), the server's
    #: process tree and each client process.
    server_cpu: float
    clients_cpu: list[float]
    error: str = ""


# ----------------------------------------------------------------------
# The servers of this module (each run in its own process:
# ``python -m benchmarks.drain_load _serve single|reference``)


async def _serve_single() -> None:
    import trio

    from trio_evlisten import Flag, open_listener
    from trio_evlisten.workers import echo

    flags = Flag.REUSEABLE | Flag.CLOSE_ON_FREE
    # The receiver exists before the listener, so no SIGTERM goes unhandled.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with open_listener(
            echo, address=(HOST, 0), flags=flags, drain_timeout=DRAIN_TIMEOUT
        ) as listener:
            print(f"listening on {listener.port}", flush=True)
            async for _ in signals:
                break
            at_signal = listener.statistics()
            # Leaving the block drains (drain_timeout).
        after = listener.statistics()
    print(
        f"at SIGTERM queued={at_signal.queue_depth} "
        f"accepted_since={after.accepted - at_signal.accepted}",
        flush=True,
    )


def _serve_reference() -> None:
    """A plain epoll echo server whose drain loses nothing it could keep.

    On SIGTERM it accepts until ``accept()`` finds the queue empty and closes
    the listening socket right after that ``accept()``, with no wait between
    the two (connections whose handshake completes in that gap of one system
    call are the only ones reset), then serves what it holds and exits. It
    shows what this workload can measure: the harness's floor.

    Each connection it serves costs :data:`REFERENCE_COST` seconds of CPU,
    and it accepts at most :data:`REFERENCE_BATCH` per wake-up (as
    trio_evlisten does), so that, like the servers measured, it is slower
    than the clients and its queue holds connections when the signal comes
    (an empty queue would make any drain look exact).
    """
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(4096)
    lsock.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    ep.register(wake_r.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    print(f"listening on {lsock.getsockname()[1]}", flush=True)

    def take(limit: float) -> int:
        taken = 0
        while taken < limit:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                return taken
            conn.setblocking(False)
            conns[conn.fileno()] = conn
            ep.register(conn.fileno(), select.EPOLLIN)
            taken += 1
        return taken

    queued = accepted_since = -1
    deadline = float("inf")
    while conns or accepted_since < 0:
        if time.monotonic() > deadline:
            break
        for fd, _ in ep.poll(0.1):
            if fd == lsock.fileno() and accepted_since < 0:
                take(REFERENCE_BATCH)
            elif fd == wake_r.fileno():
                if accepted_since < 0:
                    queued = accept_queue_depth(lsock)
                    accepted_since = take(float("inf"))
                    # At once: no system call between the accept() that found
                    # the queue empty and this close (closing the only fd on
                    # the socket also takes it out of the epoll set).
                    lsock.close()
                    deadline = time.monotonic() + DRAIN_TIMEOUT
                wake_r.recv(64)
            elif fd in conns:
                conn = conns[fd]
                try:
                    data = conn.recv(65536)
                    if data:
                        spin_until = time.perf_counter() + REFERENCE_COST
                        while time.perf_counter() < spin_until:
                            pass
                        conn.sendall(data)  # 64 bytes: the buffer takes them
                        continue
                except OSError:
                    pass
                del conns[fd]
                conn.close()
    for conn in conns.values():
        conn.close()
    print(f"at SIGTERM queued={queued} accepted_since={accepted_since}", flush=True)


def accept_queue_depth(lsock: socket.socket) -> int:
    """The accept queue's depth, as Linux gives it in ``tcpi_unacked``."""
    raw = lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    depth: int = struct.unpack_from("=24xI", raw)[0]
    return depth


def server_argv(kind: str) -> list[str]:
    if kind in ("single", "reference"):
        return [sys.executable, "-m", "benchmarks.drain_load", "_serve", kind]
    if kind == "workers":
        return [
            *(sys.executable, "-m", "trio_evlisten.workers", "--workers", "2"),
            *("--host", HOST, "--port", "0", "--drain-timeout", str(DRAIN_TIMEOUT)),
        ]
    return [
        *(sys.executable, "-m", "trio_evlisten", "echo", "--host", HOST),
        *("--port", "0", "--drain-timeout", str(DRAIN_TIMEOUT)),
    ]


# What says a server is accepting, and on which port (stdout and stderr
# together): the single server's line, each worker's, the echo CLI's.
READY: Final = {
    "single": (re.compile(r"^listening on (\d+)$", re.M), 1),
    "reference": (re.compile(r"^listening on (\d+)$", re.M), 1),
    "workers": (re.compile(r"worker pid \d+ serving on [\d.]+:(\d+)$", re.M), 2),
    "echo-cli": (re.compile(r"^Echo server listening on [\d.]+:(\d+)$", re.M), 1),
}


def wait_ready(kind: str, proc: subprocess.Popen[bytes], out: IO[bytes]) -> int:
    """Wait until ``proc`` (writing to ``out``) accepts; return its port."""
    pattern, count = READY[kind]
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        out.seek(0)
        found = pattern.findall(out.read().decode(errors="replace"))
        if len(found) >= count:
            return int(found[0])
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    out.seek(0)
    tail = out.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"the {kind} server did not start listening:\n{tail}")


# ----------------------------------------------------------------------
# The clients


def source_addresses(n: int) -> list[str]:
    """``n`` distinct loopback addresses from 127.1.0.1 on (no .0 or .255)."""
    out = []
    for i in range(n):
        high, low = divmod(i, 254)
        b, c = divmod(high, 256)
        out.append(f"127.{1 + b}.{c}.{1 + low}")
    return out


class Conn:
    __slots__ = ("connected", "got", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connected = False
        self.got = b""


@attrs.define
class Share:
    """What one client process saw."""

    before: Counts = attrs.field(factory=Counts)
    after: Counts = attrs.field(factory=Counts)
    other_errors: dict[str, int] = attrs.field(factory=dict)
    #: Connections echoed per second before the signal.
    rate: float = 0.0
    #: This process's CPU time before the signal, as a share of one CPU.
    cpu: float = 0.0


class Load:
    """The clients of one process: an epoll loop driving ``clients`` connections.

    Every process of a run is given the same ``signal_at`` (``time.monotonic``
    is one clock for all processes): outcomes from then on count as after
    the signal. Only the process that holds the server's ``Popen`` sends it.
    """

    def __init__(
        self, port: int, clients: int, sources: list[str], server_pid: int
    ) -> None:
        self.dest = (HOST, port)
        self.port = port
        self.clients = clients
        self.sources = sources
        self.next_source = 0
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        # When each client whose attempt ended starts its next one.
        self.retry: collections.deque[float] = collections.deque()
        self.share = Share()
        self.counts = self.share.before
        self.other_errors: collections.Counter[str] = collections.Counter()
        # Readable once the server has exited (it need not be our child).
        self.pidfd = os.pidfd_open(server_pid)
        self.ep.register(self.pidfd, select.EPOLLIN)
        self.samples: list[subprocess.Popen[bytes]] = []
        #: When this process saw the server exit (``inf``: not yet).
        self.exited_at = float("inf")
        #: The server tree's CPU seconds when it was signalled, and when.
        self.server_cpu = (0.0, 0.0)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.sock.close()
        self.conns.clear()
        self.ep.close()
        os.close(self.pidfd)
        for proc in self.samples:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def start(self) -> None:
        """Start one connection attempt."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[self.next_source], 0))
            self.next_source = (self.next_source + 1) % len(self.sources)
            err = sock.connect_ex(self.dest)
        except OSError as exc:
            sock.close()
            self.failed(exc.errno, connected=False)
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed(err, connected=False)
            return
        conn = Conn(sock)
        # On loopback the handshake is done by the time connect() returns
        # (the kernel answers the SYN within the call) unless the listener
        # is gone or its queues are full: send at once, and wait for
        # writability only when the send says the connect is still going.
        try:
            sock.send(PAYLOAD)
        except BlockingIOError:
            events = select.EPOLLOUT
        except OSError as exc:
            sock.close()
            self.failed(exc.errno, connected=False)
            return
        else:
            conn.connected = True
            events = select.EPOLLIN
        fd = sock.fileno()
        self.conns[fd] = conn
        self.ep.register(fd, events)

    def failed(self, err: int | None, *, connected: bool) -> None:
        """Count an attempt that ended in error ``err``; ``connected``: seen so."""
        counts = self.counts
        if err == errno.ECONNREFUSED:
            # A reset that ends the handshake (SYN_SENT) is reported as
            # ECONNREFUSED, and only that: nothing was lost.
            counts.refused += 1
            self.retry.append(time.monotonic() + REFUSED_PAUSE)
            return
        if err in (errno.ECONNRESET, errno.EPIPE):
            # Past SYN_SENT, so the handshake had completed, even if this
            # is connect()'s (or the first send's) own result.
            counts.lost_reset += 1
            if not connected:
                counts.at_connect += 1
        else:
            counts.other += 1
            self.other_errors[errno.errorcode.get(err or 0, str(err))] += 1
        self.retry.append(0.0)

    def event(self, fd: int) -> None:
        conn = self.conns[fd]
        sock = conn.sock
        if not conn.connected:
            err: int | None = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err:
                conn.connected = True
                try:
                    sock.send(PAYLOAD)
                except OSError as exc:
                    err = exc.errno
                else:
                    self.ep.modify(fd, select.EPOLLIN)
                    return
            del self.conns[fd]
            sock.close()
            self.failed(err, connected=conn.connected)
            return
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            del self.conns[fd]
            sock.close()
            self.failed(exc.errno, connected=True)
            return
        if data:
            conn.got += data
            if len(conn.got) < len(PAYLOAD):
                return
        del self.conns[fd]
        sock.close()
        if conn.got == PAYLOAD:
            self.counts.ok += 1
        elif not data:
            self.counts.lost_eof += 1
        else:
            self.counts.other += 1
            self.other_errors["wrong echo"] += 1
        self.retry.append(0.0)

    def run(self, signal_at: float, proc: subprocess.Popen[bytes] | None) -> str:
        """Load until the server has exited (and :data:`AFTER_EXIT` more).

        With ``proc`` (the server): sample its accept queue during the load,
        send it SIGTERM at ``signal_at``, and kill it if it has not exited
        :data:`SERVER_EXIT_TIMEOUT` seconds later. Returns an error ("" if
        none).
        """
        inf = float("inf")
        start = time.monotonic()
        cpu_start = time.process_time()
        next_sample = start + SAMPLE_EVERY if proc is not None else inf
        signalled = False
        give_up_at = signal_at + SERVER_EXIT_TIMEOUT
        stop_at = end_at = inf
        error = ""
        for _ in range(self.clients):
            self.start()
        poll, conns, retry, pidfd = self.ep.poll, self.conns, self.retry, self.pidfd
        while True:
            now = time.monotonic()
            if now >= end_at or (now >= stop_at and not conns):
                break
            if now >= next_sample and now < signal_at:
                self.take_sample()
                next_sample += SAMPLE_EVERY
            if not signalled and now >= signal_at:
                signalled = True
                if proc is not None:
                    # The last sample: the queue as the signal goes out.
                    self.take_sample()
                    proc.send_signal(signal.SIGTERM)
                    self.server_cpu = (tree_cpu(proc.pid)[0], time.monotonic())
                self.counts = self.share.after
                took = max(now - start, 1e-9)
                self.share.rate = self.share.before.ok / took
                self.share.cpu = (time.process_time() - cpu_start) / took
            if self.exited_at == inf and now >= give_up_at:
                error = f"the server did not exit {SERVER_EXIT_TIMEOUT} s after SIGTERM"
                if proc is not None:
                    proc.kill()
                stop_at, end_at = now, now + SETTLE
            while retry and retry[0] <= now and now < stop_at:
                retry.popleft()
                self.start()
            if now >= stop_at:
                retry.clear()
            timeout = min(0.05, max(0.0, signal_at - now)) if not signalled else 0.05
            if retry and now < stop_at:
                timeout = min(timeout, max(0.0, retry[0] - now))
            for fd, _ in poll(timeout):
                if fd == pidfd:
                    self.exited_at = time.monotonic()
                    stop_at = self.exited_at + AFTER_EXIT
                    end_at = stop_at + SETTLE
                    self.ep.unregister(fd)
                else:
                    self.event(fd)
        self.counts.unresolved += len(conns)
        self.share.other_errors = dict(self.other_errors)
        return error

    def take_sample(self) -> None:
        proc = ss_queue(self.port)
        if proc is not None:
            self.samples.append(proc)

    def queue_samples(self) -> list[int]:
        out = []
        for proc in self.samples:
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                out.append(ss_depth(proc))
        return out


def ss_queue(port: int) -> subprocess.Popen[bytes] | None:
    """Start ``ss`` on the listeners of ``port`` (read it with :func:`ss_depth`)."""
    try:
        return subprocess.Popen(
            ["ss", "-Hltn", f"sport = :{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError:  # no ss here: no samples
        return None


def ss_depth(proc: subprocess.Popen[bytes]) -> int:
    out, _ = proc.communicate(timeout=5)
    # "State Recv-Q Send-Q Local Peer": on a listener Recv-Q is the accept queue.
    return sum(int(line.split()[1]) for line in out.decode().splitlines() if line)


def fork_clients(
    procs: int,
    port: int,
    clients: int,
    sources: list[str],
    server_pid: int,
    signal_at: float,
) -> list[tuple[int, int]]:
    """Start ``procs - 1`` client processes; return their (pid, result pipe).

    Process ``k`` takes every ``procs``-th client and source address from
    ``k``; this process is number 0 and keeps the rest.
    """
    children = []
    for k in range(1, procs):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(read)
                load = Load(
                    port, len(range(k, clients, procs)), sources[k::procs], server_pid
                )
                try:
                    load.run(signal_at, None)
                finally:
                    load.close()
                with os.fdopen(write, "wb") as f:
                    f.write(json.dumps(attrs.asdict(load.share)).encode())
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write)
        children.append((pid, read))
    return children


def child_share(pid: int, read: int, deadline: float) -> Share | None:
    """Read what client process ``pid`` saw (None if it failed), and reap it."""
    data = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(read, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    return Share(
        Counts(**raw["before"]),
        Counts(**raw["after"]),
        raw["other_errors"],
        raw["rate"],
        raw["cpu"],
    )


def add(a: Counts, b: Counts) -> Counts:
    return Counts(**{k: v + getattr(b, k) for k, v in attrs.asdict(a).items()})


@contextlib.contextmanager
def server(kind: str, pin: bool) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    argv = server_argv(kind)
    if pin:
        argv = ["taskset", "-c", "0", *argv]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            yield proc, out
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def one_run(
    kind: str, clients: int, procs: int, load: float, sources: list[str], pin: bool
) -> Run:
    with server(kind, pin) as (proc, out):
        port = wait_ready(kind, proc, out)
        cpu_start = (tree_cpu(proc.pid)[0], time.monotonic())
        signal_at = time.monotonic() + load
        children = fork_clients(procs, port, clients, sources, proc.pid, signal_at)
        ours = Load(port, len(range(0, clients, procs)), sources[::procs], proc.pid)
        try:
            error = ours.run(signal_at, proc)
            samples = ours.queue_samples()
        finally:
            ours.close()
            deadline = time.monotonic() + SETTLE + 2 * AFTER_EXIT + 5
            shares = [child_share(pid, read, deadline) for pid, read in children]
        status = proc.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    share = ours.share
    clients_cpu = [share.cpu] + [c.cpu for c in shares if c is not None]
    for i, child in enumerate(shares, 1):
        if child is None:
            error = error or f"client process {i} failed"
            continue
        share.before = add(share.before, child.before)
        share.after = add(share.after, child.after)
        share.rate += child.rate
        for k, v in child.other_errors.items():
            share.other_errors[k] = share.other_errors.get(k, 0) + v
    report: dict[str, int] = {}
    found = re.search(r"at SIGTERM queued=(\d+) accepted_since=(\d+)", text)
    if found:
        report = {"queued": int(found[1]), "accepted_since": int(found[2])}
    if not error and share.before.ok == 0:
        error = "no connection was served before the signal"
    if not error and share.before.lost:
        error = f"{share.before.lost} connections lost before the signal"
    if error:
        error += "; server output:\n" + text[-2000:]
    return Run(
        kind,
        share.before,
        share.after,
        samples,
        report,
        ours.exited_at - signal_at,
        status,
        share.other_errors,
        share.rate,
        (ours.server_cpu[0] - cpu_start[0]) / (ours.server_cpu[1] - cpu_start[1]),
        clients_cpu,
        error,
    )


def describe(i: int, run: Run) -> str:
    b, a = run.before, run.after
    queue = "/".join(map(str, run.queue_samples)) or "n/a"
    line = (
        f"{run.kind} run {i}: before SIGTERM ok={b.ok} lost={b.lost} "
        f"({run.rate:.0f}/s); after it ok={a.ok} refused={a.refused} "
        f"lost={a.lost} (reset={a.lost_reset}, at_connect={a.at_connect}, "
        f"eof={a.lost_eof}) unresolved={a.unresolved} other={a.other}; "
        f"accept queue (ss) {queue}"
    )
    if run.server_report:
        line += (
            f"; server: queued at SIGTERM {run.server_report['queued']}, "
            f"accepted since {run.server_report['accepted_since']}"
        )
    cpus = "+".join(f"{c:.2f}" for c in run.clients_cpu)
    line += (
        f"; CPUs busy: server {run.server_cpu:.2f}, clients {cpus}; "
        f"exited {run.exit_after:.2f} s after SIGTERM, status {run.status}"
    )
    if run.other_errors:
        line += f"; other errors {run.other_errors}"
    return line


def summary(kind: str, runs: list[Run], clients: int) -> tuple[str, dict[str, Any]]:
    lost = [r.after.lost for r in runs]
    refused = [r.after.refused for r in runs]
    served = [r.after.ok for r in runs]
    line = (
        f"{kind}, {clients} clients, {len(runs)} runs: lost after SIGTERM median "
        f"{statistics.median(lost):g} (min {min(lost)}, max {max(lost)}); "
        f"served after SIGTERM median {statistics.median(served):g}; "
        f"refused median {statistics.median(refused):g}"
    )
    empty = [r for r in runs if r.server_report.get("queued") == 0]
    if empty:
        # Such a run drained nothing: it says nothing of the drain's sweep.
        line += (
            f"; the server found its queue empty at SIGTERM in {len(empty)} "
            f"of {len(runs)} runs"
        )
    data = {
        "lost_median": statistics.median(lost),
        "lost_min": min(lost),
        "lost_max": max(lost),
        "runs": [
            {
                "before": attrs.asdict(r.before),
                "after": attrs.asdict(r.after),
                "lost": r.after.lost,
                "queue_samples": r.queue_samples,
                "server": r.server_report,
                "exit_after": round(r.exit_after, 3),
                "rate": round(r.rate),
                "server_cpu": round(r.server_cpu, 2),
                "clients_cpu": [round(c, 2) for c in r.clients_cpu],
            }
            for r in runs
        ],
    }
    return line, data


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["_serve", "reference"]:
        _serve_reference()
        return 0
    if args == ["_serve", "single"]:
        import trio

        trio.run(_serve_single)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.drain_load")
    p.add_argument(
        "--server",
        default="single,workers",
        help=f"comma-separated, of {', '.join(KINDS)} (default: single,workers)",
    )
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--load", type=float, default=1.0, help="seconds before SIGTERM")
    p.add_argument("--sources", type=int, default=4096, help="source addresses")
    p.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="client processes the clients are spread over (default: 2)",
    )
    p.add_argument(
        "--pin", action="store_true", help="server on CPU 0, clients on CPU 1"
    )
    ns = p.parse_args(args)
    kinds = [k for k in ns.server.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            p.error(f"--server takes {', '.join(KINDS)}, not {kind!r}")
    if not 1 <= ns.clients <= 2000:
        p.error(f"--clients must be 1..2000, not {ns.clients}")
    if not 1 <= ns.runs <= 50:
        p.error(f"--runs must be 1..50, not {ns.runs}")
    if not 1 <= ns.client_procs <= min(8, ns.clients):
        p.error(
            f"--client-procs must be 1..{min(8, ns.clients)} (at most one per "
            f"client), not {ns.client_procs}"
        )
    if not 0.1 <= ns.load <= 30:
        p.error(f"--load must be 0.1..30 seconds, not {ns.load}")
    if not ns.client_procs <= ns.sources <= 254 * 256 * 200:
        p.error(
            f"--sources must be {ns.client_procs}..{254 * 256 * 200} (at least one "
            f"per client process), not {ns.sources}"
        )
    if ns.pin:
        os.sched_setaffinity(0, {1})
    sources = source_addresses(ns.sources)
    print(f"load average at start: {loadavg()}", flush=True)
    results: dict[str, list[Run]] = {k: [] for k in kinds}
    failed = False
    for i in range(1, ns.runs + 1):
        for kind in kinds:
            try:
                run = one_run(
                    kind, ns.clients, ns.client_procs, ns.load, sources, ns.pin
                )
            except RuntimeError as exc:
                print(f"{kind} run {i}: FAILED: {exc}", file=sys.stderr, flush=True)
                failed = True
                continue
            print(describe(i, run), flush=True)
            if run.error:
                print(f"{kind} run {i}: FAILED: {run.error}", file=sys.stderr)
                failed = True
                continue
            results[kind].append(run)
    print(f"load average at end: {loadavg()}", flush=True)
    out: dict[str, Any] = {
        "benchmark": "drain_load",
        "clients": ns.clients,
        "load_s": ns.load,
        "sources": ns.sources,
        "pin": ns.pin,
        "servers": {},
    }
    for kind, runs in results.items():
        if runs:
            line, data = summary(kind, runs, ns.clients)
            print(line)
            out["servers"][kind] = data
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
