"""An echo server in protocol mode: the chapter's bufferevent read callback.

Run it, then poke at it from another terminal::

    python examples/echo_protocol.py          # listens on 0.0.0.0:9876
    python examples/echo_protocol.py 9999     # or on another port
    nc 127.0.0.1 9876                         # type lines, get them back

The same server as ``examples/echo.py`` (same command line, messages, exit
statuses and Ctrl-C), written as the C example is: not a task per
connection but callbacks. ``echo_read_cb`` is the bufferevent's read
callback (copy the input to the output), ``echo_event_cb`` its event
callback (EOF or an error frees the connection). They are an
:class:`asyncio.Protocol`'s ``data_received``, ``eof_received`` and
``connection_lost``, called by one task of the listener for every ready
connection: no task, and a fraction of the memory, per connection.

A real server would add what the chapter leaves out: a cap on connections
(``max_connections=``), a ``drain_timeout=`` for shutting down (the protocol
then closes once ``transport.listener.draining`` is set), an idle timeout
per connection, and logging configured for production.
"""

from __future__ import annotations

import asyncio
import os
import sys

import trio

import trio_evlisten
from trio_evlisten import ConnListener, Flag

DEFAULT_PORT = 9876


class Echo(asyncio.Protocol):
    """One connection: the bufferevent and its callbacks."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """echo_read_cb: copy all the data from the input to the output."""
        self.transport.write(data)

    def eof_received(self) -> bool:
        """echo_event_cb's BEV_EVENT_EOF: a false value closes the connection
        (after what was written is sent), as bufferevent_free(bev) does."""
        return False

    def pause_writing(self) -> None:
        # The peer does not read what we echo: stop reading from it until it
        # does, as a bufferevent's watermarks would.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


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
        address=("0.0.0.0", port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=-1,
        error_cb=accept_error,
        protocol=Echo,
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
