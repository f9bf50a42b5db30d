"""A WebSocket echo server: trio-websocket over trio_evlisten's connections.

Run it, then poke at it from another terminal::

    python examples/websocket_server.py           # listens on 127.0.0.1:8765
    python examples/websocket_server.py 0         # or on a free port (printed)
    python -m websockets ws://127.0.0.1:8765/     # type messages, get them back

Every message a client sends, text or binary, comes back to it unchanged,
until the client closes (the close handshake answers with the client's
code). Each connection is handed to :func:`trio_websocket.wrap_server_stream`,
which reads the opening handshake; the request is accepted whatever its path
and subprotocols. Ctrl-C or SIGTERM drains: the listener stops accepting and
each open WebSocket is closed with 1001 (going away); after
``DRAIN_TIMEOUT`` seconds whatever is left is cancelled. A second Ctrl-C
stops at once.

A real server would add: a check of the request's path, ``Origin`` and
subprotocols (``request.reject(403)``), pings to find dead peers, a cap on
connections (``max_connections=``), TLS (``ssl_context=``; then it is
``wss://``), and logging.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Final

import trio
import trio_websocket

import trio_evlisten
from trio_evlisten import Flag

if TYPE_CHECKING:
    from trio_evlisten import ConnListener

HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765
#: Largest message accepted (trio-websocket's default is 1 MiB); a larger
#: one closes the connection with 1009 (message too big).
MAX_MESSAGE_SIZE: Final = 4 * 2**20
#: Seconds a client has to send its opening handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds the closing handshake may take before the stream is closed anyway.
CLOSE_TIMEOUT: Final = 2.0
#: Seconds the listener gives connections to finish when draining.
DRAIN_TIMEOUT: Final = 5.0
GOING_AWAY: Final = 1001


async def echo(ws: trio_websocket.WebSocketConnection) -> None:
    """Send every message back until the client closes."""
    while True:
        try:
            message = await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return
        await ws.send_message(message)


async def handle(
    listener: ConnListener, stream: trio.abc.HalfCloseableStream, addr: object
) -> None:
    """The listener's callback: one WebSocket over the accepted stream.

    Error handling:
        A client that goes away (a reset, or no closing handshake) ends its
        connection quietly; so does one that sends no opening handshake in
        ``HANDSHAKE_TIMEOUT`` seconds (trio-websocket answers a bad one with
        400 itself).

    Resource handling:
        trio-websocket's reader task runs in a nursery of this handler's, so
        it ends with the handler; the WebSocket is closed (closing handshake,
        bounded by ``CLOSE_TIMEOUT``) before the listener closes the stream.
    """
    async with trio.open_nursery() as nursery:
        ws = await accept(nursery, stream)
        if ws is None:
            nursery.cancel_scope.cancel()  # the reader task, if still waiting
            return
        nursery.start_soon(close_on_drain, listener, ws)
        try:
            await echo(ws)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose()  # the reader task ends with the connection
            nursery.cancel_scope.cancel()


async def accept(
    nursery: trio.Nursery, stream: trio.abc.Stream
) -> trio_websocket.WebSocketConnection | None:
    """The WebSocket, once its opening handshake is done; None if it was not.

    trio-websocket's reader task, started in ``nursery``, reads the handshake.
    A client that closes before sending one is only noticed at the timeout:
    trio-websocket never hands over a request then.
    """
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        request = await trio_websocket.wrap_server_stream(
            nursery, stream, max_message_size=MAX_MESSAGE_SIZE
        )
        try:
            return await request.accept()
        except trio_websocket.ConnectionClosed:
            return None
    return None


async def close_on_drain(
    listener: ConnListener, ws: trio_websocket.WebSocketConnection
) -> None:
    """On a drain, say goodbye: the echo loop then sees the connection close."""
    await listener.wait_draining()
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(GOING_AWAY, "server shutting down")


async def main(host: str, port: int) -> None:
    async with trio_evlisten.open_listener(
        handle,
        address=(host, port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        drain_timeout=DRAIN_TIMEOUT,
    ) as listener:
        where = f"[{host}]" if ":" in host else host
        print(f"WebSocket server listening on {where}:{listener.port}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        # Leaving the block drains. The receiver is closed, so a second
        # Ctrl-C is a KeyboardInterrupt again: it cuts the drain short.


def parse_args(argv: list[str]) -> tuple[str, int] | None:
    """(host, port) from the command line, or None if the port is invalid."""
    p = argparse.ArgumentParser(prog="websocket_server.py", description=__doc__)
    p.add_argument("port", nargs="?", default=str(DEFAULT_PORT))
    p.add_argument("--host", default=HOST)
    ns = p.parse_args(argv[1:])
    try:
        port = int(ns.port)
    except ValueError:
        return None
    return (ns.host, port) if 0 <= port <= 65535 else None


def run(argv: list[str]) -> int:
    where = parse_args(argv)
    if where is None:
        print("Invalid port", file=sys.stderr)
        return 1
    try:
        trio.run(main, *where)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"Couldn't create listener: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
