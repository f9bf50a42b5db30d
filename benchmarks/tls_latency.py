"""TLS first-response latency: connect, handshake, first 64 B echoed.

Run it::

    python -m benchmarks.tls_latency                      # 50 connections each
    python -m benchmarks.tls_latency -n 200 --clients python,openssl
    python -m benchmarks.tls_latency --servers ours,ours-noquickack

Every server runs in a process of its own, all at once, on 127.0.0.1; for
each client the connections are interleaved over the servers (one to each in
turn), so a noisy moment of a shared machine hits them all alike. Each
connection is fresh: TCP connect, TLS handshake (TLS 1.3, a trustme
certificate), then the first request and its answer; the table gives the
median, min and max in milliseconds.

The servers (``KIND`` below):

* ``ours``: :func:`trio_evlisten.open_listener` with ``ssl_context=``, as
  released (``TCP_QUICKACK`` around the handshake, see docs/choices.md);
* ``ours-noquickack``: the same with that step made a no-op;
* ``ours-protocol``: protocol mode (an asyncio ``Protocol`` over the TLS
  transport), which needs no ``TCP_QUICKACK``: its handshake sends TLS
  1.3's session tickets at once, and they carry the ACK;
* ``trio``: :func:`trio.serve_tcp` and :class:`trio.SSLStream`;
* ``trio-quickack``, ``trio-quickack-before``, ``trio-quickack-after``: the
  same, the handler setting ``TCP_QUICKACK`` before and after the handshake,
  or only before it, or only after it (which of the two does the work).

Each echoes what it receives; a first chunk that starts with ``GET `` is
answered with a small HTTP/1.1 response instead (for curl), then closed.

The clients:

* ``python``: the stdlib's blocking ``ssl`` over ``socket.create_connection``
  (Nagle left on, as most clients do), timed in this process;
* ``openssl``: ``openssl s_client -quiet`` with 63 bytes and a newline on
  its stdin, timed from starting the process to the echo on its stdout (so
  the figure includes the program's start-up, the same for every server);
* ``curl``, ``curl-nagle``: ``curl https://127.0.0.1:PORT/``, its own
  ``time_starttransfer`` (connect to first response byte; no process
  start-up); curl sets ``TCP_NODELAY`` by default, ``curl-nagle`` turns it
  off (``--no-tcp-nodelay``).

Error handling: a server that does not start, or a client that fails or
gets a wrong answer, raises (a latency of a broken exchange means nothing).

Resource handling: the server processes are terminated and reaped, and the
certificate directory removed, however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

HOST: Final = "127.0.0.1"
PAYLOAD: Final = b"x" * 63 + b"\n"
HTTP_RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
)
#: Seconds a server has to print its port, and a client to finish.
TIMEOUT: Final = 10.0

SERVERS: Final = {
    "ours": "trio_evlisten, ssl_context= (TCP_QUICKACK around the handshake)",
    "ours-noquickack": "trio_evlisten, the TCP_QUICKACK step made a no-op",
    "ours-protocol": "trio_evlisten protocol mode, ssl_context=",
    "trio": "trio.serve_tcp + trio.SSLStream",
    "trio-quickack": "trio.serve_tcp + SSLStream, TCP_QUICKACK before and after",
    "trio-quickack-before": "trio.serve_tcp + SSLStream, TCP_QUICKACK before only",
    "trio-quickack-after": "trio.serve_tcp + SSLStream, TCP_QUICKACK after only",
}
DEFAULT_SERVERS: Final = (
    "ours",
    "ours-noquickack",
    "ours-protocol",
    "trio",
    "trio-quickack",
)
CLIENTS: Final = {
    "python": "stdlib ssl over socket.create_connection (Nagle on)",
    "openssl": "openssl s_client -quiet, process start to first echo",
    "curl": "curl, time_starttransfer (TCP_NODELAY, curl's default)",
    "curl-nagle": "curl --no-tcp-nodelay, time_starttransfer",
}


# ----------------------------------------------------------------------
# The servers (run as ``python -m benchmarks.tls_latency serve KIND ...``)


async def answer(stream: trio.abc.Stream) -> None:
    """Echo, or answer a ``GET`` with :data:`HTTP_RESPONSE` and return."""
    data = await stream.receive_some(65536)
    if data.startswith(b"GET "):
        while b"\r\n\r\n" not in data:
            more = await stream.receive_some(65536)
            if not more:
                return
            data += more
        await stream.send_all(HTTP_RESPONSE)
        return
    while data:
        await stream.send_all(data)
        data = await stream.receive_some(65536)


def set_quickack(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


async def serve_ours(
    context: ssl.SSLContext,
    quickack: bool,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    import trio_evlisten
    from trio_evlisten import _connection

    if not quickack:
        # The one step the fix adds, undone: the comparison's "before".
        _connection.quickack = lambda conn: None

    async def handler(listener: object, stream: trio.abc.Stream, addr: object) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await answer(stream)

    async with trio_evlisten.open_listener(
        handler,
        address=(HOST, 0),
        flags=trio_evlisten.Flag.CLOSE_ON_FREE,
        ssl_context=context,
    ) as listener:
        task_status.started(listener.port)
        await trio.sleep_forever()


class AnswerProtocol(asyncio.Protocol):
    """:func:`answer` as a protocol: echo, or answer a ``GET`` and close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.request = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.request or data.startswith(b"GET "):
            self.request += data
            if b"\r\n\r\n" in self.request:
                self.transport.write(HTTP_RESPONSE)
                self.transport.close()
            return
        self.transport.write(data)


async def serve_ours_protocol(
    context: ssl.SSLContext,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    import trio_evlisten

    async with trio_evlisten.open_listener(
        address=(HOST, 0),
        flags=trio_evlisten.Flag.CLOSE_ON_FREE,
        ssl_context=context,
        protocol=AnswerProtocol,
    ) as listener:
        task_status.started(listener.port)
        await trio.sleep_forever()


async def serve_trio(
    context: ssl.SSLContext,
    before: bool,
    after: bool,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if before:
            set_quickack(stream.socket)
        tls = trio.SSLStream(stream, context, server_side=True)
        try:
            await tls.do_handshake()
            if after:
                set_quickack(stream.socket)
            await answer(tls)
            await tls.aclose()
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host=HOST)
        )
        task_status.started(listeners[0].socket.getsockname()[1])


async def run_server(kind: str, context: ssl.SSLContext) -> None:
    """Serve; print the port once listening; stop on SIGINT (see :func:`servers`)."""
    if kind in ("ours", "ours-noquickack"):
        server = functools.partial(serve_ours, context, kind == "ours")
    elif kind == "ours-protocol":
        server = functools.partial(serve_ours_protocol, context)
    else:
        before = kind in ("trio-quickack", "trio-quickack-before")
        after = kind in ("trio-quickack", "trio-quickack-after")
        server = functools.partial(serve_trio, context, before, after)
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            print(await nursery.start(server), flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def serve(kind: str, certfile: str, keyfile: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    trio.run(run_server, kind, context)


# ----------------------------------------------------------------------
# The clients: each makes one fresh connection and returns its seconds.


def python_client(port: int, ca: Path) -> float:
    context = ssl.create_default_context(cafile=str(ca))
    start = time.perf_counter()
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        elapsed = time.perf_counter() - start
    if got != PAYLOAD:
        raise RuntimeError(f"python client got {got!r}, not the echo")
    return elapsed


def openssl_client(port: int, ca: Path) -> float:
    argv = ["openssl", "s_client", "-connect", f"{HOST}:{port}"]
    argv += ["-CAfile", str(ca), "-verify_return_error", "-quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(PAYLOAD)
        proc.stdin.flush()
        got = b""
        deadline = start + TIMEOUT
        fd = proc.stdout.fileno()
        while len(got) < len(PAYLOAD):
            ready, _, _ = select.select([fd], [], [], deadline - time.perf_counter())
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                break
            got += chunk
        elapsed = time.perf_counter() - start
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    if got != PAYLOAD:
        raise RuntimeError(f"openssl s_client got {got!r}, not the echo")
    return elapsed


def curl_client(port: int, ca: Path, *, nagle: bool = False) -> float:
    argv = ["curl", "-sS", "--max-time", str(TIMEOUT), "--cacert", str(ca)]
    argv += ["-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer}"]
    if nagle:
        argv.append("--no-tcp-nodelay")
    argv.append(f"https://{HOST}:{port}/")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT * 2, check=False
    )
    code, _, starttransfer = done.stdout.partition(" ")
    if done.returncode != 0 or code != "200":
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    return float(starttransfer)


def client(name: str) -> Callable[[int, Path], float]:
    if name == "python":
        return python_client
    if name == "openssl":
        return openssl_client
    if name == "curl":
        return curl_client
    return lambda port, ca: curl_client(port, ca, nagle=True)


# ----------------------------------------------------------------------
# The run


@contextlib.contextmanager
def certificates() -> Iterator[tuple[Path, Path, Path]]:
    """(CA file, server certificate chain, server key) in a temporary directory."""
    import trustme

    with tempfile.TemporaryDirectory(prefix="tls-latency-") as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert(HOST, "localhost")
        paths = Path(tmp) / "ca.pem", Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        ca.cert_pem.write_to_path(str(paths[0]))
        cert.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
        cert.private_key_pem.write_to_path(str(paths[2]))
        yield paths


@contextlib.contextmanager
def servers(kinds: list[str], cert: Path, key: Path) -> Iterator[dict[str, int]]:
    """Start each server; yield kind -> port; terminate and reap them all."""
    procs: list[subprocess.Popen[str]] = []
    ports: dict[str, int] = {}
    try:
        for kind in kinds:
            argv = [sys.executable, "-m", "benchmarks.tls_latency", "serve", kind]
            proc = subprocess.Popen(
                [*argv, str(cert), str(key)],
                cwd=Path(__file__).resolve().parent.parent,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
            line = proc.stdout.readline() if ready else ""
            if not line.strip().isdigit():
                raise RuntimeError(f"server {kind} did not start: {line!r}")
            ports[kind] = int(line)
        yield ports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def measure(
    kinds: list[str], clients: list[str], connections: int
) -> dict[tuple[str, str], list[float]]:
    """(client, server) -> the seconds of each of ``connections`` connections."""
    results: dict[tuple[str, str], list[float]] = {}
    with certificates() as (ca, cert, key), servers(kinds, cert, key) as ports:
        for name in clients:
            connect = client(name)
            for _ in range(connections):
                for kind in kinds:
                    seconds = connect(ports[kind], ca)
                    results.setdefault((name, kind), []).append(seconds)
    return results


def table(results: dict[tuple[str, str], list[float]]) -> str:
    lines = [
        "| client | server | median ms | min ms | max ms | n |",
        "| --- | --- | --: | --: | --: | --: |",
    ]
    for (name, kind), times in results.items():
        ms = [t * 1000 for t in times]
        lines.append(
            f"| {name} | {kind} | {statistics.median(ms):.1f} | {min(ms):.1f} "
            f"| {max(ms):.1f} | {len(ms)} |"
        )
    return "\n".join(lines)


def names(text: str, known: dict[str, str], what: str) -> list[str]:
    chosen = [n for n in text.split(",") if n]
    for name in chosen:
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r}; known: {', '.join(known)}"
            )
    return chosen


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        if len(argv) != 4 or argv[1] not in SERVERS:
            print(f"usage: serve {{{','.join(SERVERS)}}} CERT KEY", file=sys.stderr)
            return 2
        serve(*argv[1:])
        return 0
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tls_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--connections", type=int, default=50)
    p.add_argument(
        "--servers",
        type=lambda s: names(s, SERVERS, "server"),
        default=list(DEFAULT_SERVERS),
    )
    p.add_argument(
        "--clients", type=lambda s: names(s, CLIENTS, "client"), default=None
    )
    ns = p.parse_args(argv)
    if ns.connections < 1:
        p.error(f"--connections must be at least 1, not {ns.connections}")
    clients: list[str] = ns.clients or [
        c
        for c in CLIENTS
        if shutil.which("openssl" if c == "openssl" else "curl") or c == "python"
    ]
    results = measure(ns.servers, clients, ns.connections)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
