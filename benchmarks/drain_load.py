"""Stop a server under continuous load and count the connections it lost.

    python -m benchmarks.drain_load [--clients 200] [--runs 3]
                                    [--server workers|echo-cli]

A server (``python -m trio_evlisten.workers --workers 2``, or the echo CLI)
listens on 127.0.0.1; ``--clients`` client tasks connect, send 64 bytes, wait
for the echo and close, over and over. After a second of that the server
gets SIGTERM, and the clients go on until it has exited. Each attempt ends in
one of:

* ``ok``: echoed;
* ``refused``: ``connect()`` refused (nothing listening any more: a clean
  refusal the client can retry elsewhere, not a loss);
* ``reset_at_connect``: reset before ``connect()`` returned: the server
  closed while the connection was mid-handshake (or, in a race, just
  queued);
* ``lost``: connected (the TCP handshake completed) but reset or closed
  before the echo: what draining must prevent, except for the few that race
  the final close.

Loopback only; each run is bounded (the server must exit within 15 s of the
signal). Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import statistics
import subprocess
import sys
from typing import Final

import attrs
import trio

PAYLOAD: Final = b"x" * 64
LOAD_BEFORE: Final = 1.0
SERVER_EXIT_TIMEOUT: Final = 15.0


@attrs.define
class Counts:
    ok: int = 0
    refused: int = 0
    reset_at_connect: int = 0
    lost: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_argv(kind: str, port: int) -> list[str]:
    if kind == "workers":
        return [
            *(sys.executable, "-m", "trio_evlisten.workers", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "5"),
        ]
    return [
        *(sys.executable, "-m", "trio_evlisten", "echo", "--host", "127.0.0.1"),
        *("--port", str(port), "--drain-timeout", "5"),
    ]


async def attempt(port: int) -> str:
    """One connection: ``ok``, ``refused`` or ``lost`` (see the module docs)."""
    sock = trio.socket.socket()
    with sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return "refused"
            if exc.errno == errno.ECONNRESET:
                # Reset before connect() returned: the server closed while
                # this one was mid-handshake, or just queued. Counted apart.
                return "reset_at_connect"
            raise
        stream = trio.SocketStream(sock)
        try:
            await stream.send_all(PAYLOAD)
            got = b""
            while len(got) < len(PAYLOAD):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                got += chunk
        except trio.BrokenResourceError:
            got = b""
    return "ok" if got == PAYLOAD else "lost"


async def client(
    port: int, before: Counts, after: Counts, signalled: trio.Event, done: trio.Event
) -> None:
    while not done.is_set():
        counts = after if signalled.is_set() else before
        outcome = await attempt(port)
        setattr(counts, outcome, getattr(counts, outcome) + 1)
        if outcome in ("refused", "reset_at_connect"):
            await trio.sleep(0.001)


async def wait_listening(port: int, proc: trio.Process) -> None:
    with trio.fail_after(15):
        while True:
            try:
                if await attempt(port) == "ok":
                    return
            except OSError:
                pass
            if proc.returncode is not None:
                raise RuntimeError("the server exited before it listened")
            await trio.sleep(0.05)


async def one_run(kind: str, clients: int) -> tuple[Counts, Counts]:
    port = free_port()
    before, after = Counts(), Counts()
    proc = await trio.lowlevel.open_process(
        server_argv(kind, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_listening(port, proc)
        signalled, done = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, port, before, after, signalled, done)
            await trio.sleep(LOAD_BEFORE)
            signalled.set()
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(SERVER_EXIT_TIMEOUT):
                await proc.wait()
            await trio.sleep(0.2)  # a little past the end: all refused now
            done.set()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return before, after


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drain_load")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server", choices=("workers", "echo-cli"), default="workers")
    ns = p.parse_args(argv)
    runs = []
    for i in range(max(1, min(ns.runs, 20))):
        before, counts = trio.run(one_run, ns.server, max(1, min(ns.clients, 1000)))
        runs.append(counts)
        print(
            f"run {i + 1}: before SIGTERM ok={before.ok} lost={before.lost}; "
            f"after it ok={counts.ok} refused={counts.refused} "
            f"reset_at_connect={counts.reset_at_connect} lost={counts.lost}",
            flush=True,
        )
    lost = [c.lost + c.reset_at_connect for c in runs]
    print(
        f"{ns.server}, {ns.clients} clients: lost or reset after SIGTERM median "
        f"{statistics.median(lost)} (min {min(lost)}, max {max(lost)}); "
        f"served after SIGTERM median {statistics.median(c.ok for c in runs)}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
