"""An echo server that restarts itself on SIGHUP without dropping a connection.

Run it, then poke at it from another terminal::

    python examples/restart_server.py          # listens on 127.0.0.1:9877
    python examples/restart_server.py 0        # or on a free port (printed)
    nc 127.0.0.1 9877                          # each line comes back as "PID: line"
    kill -HUP PID                              # restart: a new PID takes over
    kill -TERM PID                             # stop (Ctrl-C works too)

On SIGHUP the server starts a fresh copy of itself (the same Python, the
same script and arguments: after a deploy, the new code) with
:func:`trio_evlisten.hand_off`, which passes the listening socket as fd 3 in
systemd's ``LISTEN_FDS`` form. At start, a copy finds the socket with
:func:`trio_evlisten.activation_sockets` (so it also runs under systemd
socket activation, with ``FileDescriptorName=echo``) and only binds when it
was given none; once it accepts it says so with
:func:`trio_evlisten.notify_ready`. The old process keeps accepting until
then, and only then stops accepting, lets its connections finish (at most
``DRAIN_TIMEOUT`` seconds, then cancels them) and exits with status 0. The
socket is never closed in between, so no client is refused; connections that
queue while the old process stops are accepted by the new one. If the new
copy fails to start (it crashes, or is not ready within 10 s), the old one
says so and serves on.

Each process prints ``pid N listening on HOST:PORT`` when it accepts,
``pid N handed off to pid M; draining`` and ``pid N exited``.

A real server would add: a lock against two hand-offs at once (a second
SIGHUP here waits for the first), a check that the new code at least
imports before handing off, logging instead of prints, and, under a process
manager, telling it the new main pid (systemd: ``Type=notify``,
``NotifyAccess=all`` and ``MAINPID=``; see docs/deploying.md).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

import trio

from trio_evlisten import (
    ConnListener,
    Flag,
    SocketStream,
    activation_sockets,
    hand_off,
    notify_ready,
    open_listener,
)

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

DEFAULT_PORT = 9877
HOST = "127.0.0.1"
#: Seconds the old process gives its connections after a hand-off.
DRAIN_TIMEOUT = 5.0
#: The name of the socket, in LISTEN_FDNAMES (systemd's FileDescriptorName=).
NAME = "echo"


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    """Send each line back, prefixed with this process's pid."""
    prefix = f"{os.getpid()}: ".encode()
    pending = b""
    async for data in conn:
        *lines, pending = (pending + data).split(b"\n")
        if lines:
            await conn.send_all(b"".join(prefix + line + b"\n" for line in lines))


def parse_port(argv: list[str]) -> int | None:
    """The port from the command line (9877 without one, 0 for any), or None."""
    if len(argv) < 2:
        return DEFAULT_PORT
    try:
        port = int(argv[1])
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def successor_command() -> list[str]:
    """This program again: the same interpreter, script and arguments."""
    return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def open_echo_listener(port: int) -> AbstractAsyncContextManager[ConnListener]:
    """The inherited socket if we were handed one, else a new one on ``port``."""
    flags = Flag.CLOSE_ON_FREE | Flag.REUSEABLE
    inherited = activation_sockets().get(NAME, [])
    if inherited:
        # From our predecessor (or systemd): bound and listening already.
        return open_listener(
            echo, sock=inherited[0], backlog=0, flags=flags, drain_timeout=DRAIN_TIMEOUT
        )
    return open_listener(
        echo, address=(HOST, port), flags=flags, drain_timeout=DRAIN_TIMEOUT
    )


async def main(port: int) -> None:
    pid = os.getpid()
    with trio.open_signal_receiver(
        signal.SIGHUP, signal.SIGTERM, signal.SIGINT
    ) as signals:
        async with open_echo_listener(port) as listener:
            print(f"pid {pid} listening on {HOST}:{listener.port}", flush=True)
            notify_ready()  # to our predecessor (or systemd), if one waits
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
                try:
                    successor = await hand_off({NAME: listener}, successor_command())
                except (OSError, RuntimeError, trio.TooSlowError) as exc:
                    print(
                        f"pid {pid}: hand-off failed, still serving: {exc}", flush=True
                    )
                    continue
                print(
                    f"pid {pid} handed off to pid {successor.pid}; draining", flush=True
                )
                break
        # Leaving the block closed the listener (our fd only: the successor
        # holds the socket) and waited for our connections.
    print(f"pid {pid} exited", flush=True)


def run(argv: list[str]) -> int:
    port = parse_port(argv)
    if port is None:
        print("Invalid port", file=sys.stderr)
        return 1
    trio.run(main, port)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
