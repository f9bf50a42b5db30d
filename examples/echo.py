"""An echo server: the evconnlistener chapter's example, the Trio way.

Run it, then poke at it from another terminal::

    python examples/echo.py          # listens on 0.0.0.0:9876
    python examples/echo.py 9999     # or on another port
    nc 127.0.0.1 9876                # type lines, get them back

Every byte a client sends comes back to it. As in the C example, the
listener is opened with CLOSE_ON_FREE | REUSEABLE and backlog -1, and an
accept error is printed with its errno and stops the server, the way
``event_base_loopexit`` does. Ctrl-C stops it quietly.

A real server would add what the chapter leaves out: a cap on connections
(``max_connections=``), a ``drain_timeout=`` for shutting down, an idle
timeout per connection, and logging configured for production.
"""

from __future__ import annotations

import os
import sys

import trio

import trio_evlisten
from trio_evlisten import ConnListener, Flag, SocketStream

DEFAULT_PORT = 9876


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    """The bufferevent's read callback: copy all input to the output."""
    async for data in conn:
        await conn.send_all(data)
    # EOF: the listener closes the stream when this returns, as
    # bufferevent_free(bev) does in echo_event_cb.


def accept_error(listener: ConnListener, error: OSError) -> None:
    """Print the error and stop the server, as the chapter's accept_error_cb."""
    err = error.errno or 0
    print(
        f"Got an error {err} ({os.strerror(err)}) on the listener. Shutting down.",
        file=sys.stderr,
    )
    listener.nursery.cancel_scope.cancel()  # event_base_loopexit(base, NULL)


def parse_port(argv: list[str]) -> int | None:
    """The port from the command line (9876 without one), or None if invalid."""
    if len(argv) < 2:
        return DEFAULT_PORT
    try:
        port = int(argv[1])
    except ValueError:
        return None
    return port if 0 < port <= 65535 else None


async def main(port: int) -> None:
    async with trio_evlisten.open_listener(
        echo,
        address=("0.0.0.0", port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=-1,
        error_cb=accept_error,
    ) as listener:
        print(f"Echo server listening on 0.0.0.0:{listener.port}", flush=True)
        await trio.sleep_forever()


def run(argv: list[str]) -> int:
    port = parse_port(argv)
    if port is None:
        print("Invalid port")
        return 1
    try:
        trio.run(main, port)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"Couldn't create listener: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
