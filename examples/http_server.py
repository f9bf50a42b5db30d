"""An HTTP/1.1 server: h11 for the protocol, trio_evlisten for the connections.

Run it, then poke at it from another terminal::

    python examples/http_server.py                 # listens on 127.0.0.1:8080
    python examples/http_server.py 0               # or on a free port (printed)
    python examples/http_server.py 8081 --host ::1
    curl -i http://127.0.0.1:8080/                 # 200 "Hello, world!"
    curl -i http://127.0.0.1:8080/nope             # 404
    curl -i -X DELETE http://127.0.0.1:8080/       # 405, with Allow: GET, HEAD
    wrk -t1 -c50 -d5s http://127.0.0.1:8080/       # load over keep-alive

``GET /`` (and ``HEAD /``) answers a small fixed body; other paths are 404,
other methods on ``/`` are 405. Connections are kept alive between requests
(h11 also copes with pipelined ones) and end when the client closes, when a
request says ``Connection: close``, when the client stays idle for
``IDLE_TIMEOUT`` seconds (a request begun but not finished by then gets a
408), or when the request is malformed (a 400, or the status h11 suggests,
then close). Ctrl-C or SIGTERM drains: the listener stops accepting, each
connection finishes the request it is in, answers it with ``Connection:
close`` and stops; idle ones are closed at once; after ``DRAIN_TIMEOUT``
seconds whatever is left is cancelled. A second Ctrl-C stops at once.

:func:`serve_http` is the whole per-connection protocol and knows nothing of
the listener: give it any :class:`trio.abc.HalfCloseableStream`. The
listener's callback only passes the listener along, so that draining can
end keep-alive connections; ``trio.serve_tcp(serve_http, 8080)`` serves the
same application (the benchmark runs both).

A real server would add what this example leaves out: routing and request
bodies worth reading, streaming responses, logging, a cap on connections
(``max_connections=``), TLS (``ssl_context=``; h11 does not care), and
finer timeouts than one deadline per request (see h11's own
``examples/trio-server.py`` for the trade-offs).
"""

from __future__ import annotations

import argparse
import email.utils
import signal
import sys
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol

import h11
import trio

import trio_evlisten
from trio_evlisten import Flag

if TYPE_CHECKING:
    from trio_evlisten import ConnListener

HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
BODY: Final = b"Hello, world!\n"
#: Seconds a client has, from the end of one response, to send the next
#: request and read our answer to it; an idle keep-alive connection is
#: closed after it.
IDLE_TIMEOUT: Final = 10.0
#: Seconds the listener gives connections to finish when draining.
DRAIN_TIMEOUT: Final = 5.0
#: Seconds we read (and drop) what a client still sends after our FIN, so
#: that closing does not reset a connection whose last response is unread.
LINGER: Final = 2.0
#: Largest request body we read and drop; a larger one gets a 413.
MAX_BODY: Final = 64 * 1024
MAX_RECV: Final = 64 * 1024
SERVER: Final = f"trio_evlisten-example {h11.PRODUCT_ID}".encode()


class Drain(Protocol):
    """What :func:`serve_http` needs to hear of a drain; a ConnListener has it."""

    @property
    def draining(self) -> bool: ...

    async def wait_draining(self) -> None: ...


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date[1]


class _Drained(Exception):
    """A drain ended the wait for a request whose bytes came too late."""


class HTTPConnection:
    """One client's connection: the stream, h11's state and our deadline.

    One cancel scope, :attr:`timer`, lives as long as the connection: the
    idle timeout moves its deadline before each request, and a drain that
    finds the connection waiting for a request not yet begun cancels it.
    Entering a scope per request (``move_on_after``) and another per wait
    would cost more per request than moving one deadline.

    Resource handling:
        The stream belongs to the caller of :func:`serve_http`, who closes it
        (the listener, or ``trio.serve_tcp``, does so when the handler
        returns); this class only half-closes it to end the conversation.
    """

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, idle_timeout: float | None
    ):
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        self.idle_timeout = idle_timeout
        #: Requests answered so far.
        self.served = 0
        #: The connection's one scope: its deadline is the idle timeout's.
        self.timer = trio.CancelScope()
        #: True while waiting for a further request of which no byte has
        #: come: the only wait a drain may cut short.
        self.idle = False

    async def serve(self, drain: Drain | None) -> None:
        """Answer requests until the client leaves or we decide to close."""
        try:
            await self._serve(drain)
        except trio.BrokenResourceError:
            # The client reset the connection: nobody is left to answer.
            return

    async def _serve(self, drain: Drain | None) -> None:
        with self.timer:
            while True:
                # A drain that began during the last response ends it here;
                # the first request is always served (the listener hands us
                # only connections it accepted before or while draining began).
                if self.served and drain is not None and drain.draining:
                    break
                if self.idle_timeout is not None:
                    self.timer.deadline = trio.current_time() + self.idle_timeout
                try:
                    request = await self._next_request()
                    if request is None:
                        return  # the client closed between requests
                    await self._respond(request, drain)
                except h11.RemoteProtocolError as exc:
                    await self._send_error(exc.error_status_hint)
                    break
                except _Drained:
                    break
                if self.h11.our_state is h11.MUST_CLOSE:
                    break
                self.h11.start_next_cycle()
                self.served += 1
        if self.timer.cancelled_caught and self._request_begun():
            # Timed out half-way through a request: say why, as far as the
            # client still listens. (Idle, or cut short by a drain: just
            # close.)
            with trio.move_on_after(LINGER):
                await self._send_error(HTTPStatus.REQUEST_TIMEOUT)
        await self._close()

    async def close_idle_on_drain(self, drain: Drain) -> None:
        """Wait for a drain, then end the wait for a request not yet begun."""
        await drain.wait_draining()
        if self.idle:
            self.timer.cancel()

    def _request_begun(self) -> bool:
        return self.h11.their_state is not h11.IDLE or bool(self.h11.trailing_data[0])

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA | h11.PAUSED]:
        # (never NEED_DATA: it loops until h11 has more than that)
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.h11.receive_data(bytes(await self._receive()))

    async def _receive(self) -> bytes | bytearray:
        """Some bytes from the client (b"" at EOF).

        Raises:
            trio.Cancelled: (of :attr:`timer`) the idle timeout passed, or a
                drain began while no byte of a further request had come (the
                first request is always waited for).
            _Drained: the drain began just as the bytes came.
        """
        if self.served == 0 or self._request_begun():
            return await self.stream.receive_some(MAX_RECV)
        # Between requests: the only wait a drain may cut short.
        self.idle = True
        try:
            data = await self.stream.receive_some(MAX_RECV)
        finally:
            self.idle = False
        if self.timer.cancel_called:
            # The drain (or the deadline) came as the bytes did: the
            # receive had finished, so no Cancelled told us, but the next
            # step would be cancelled half-way through the answer. Close as
            # if it had come first, as closing an idle keep-alive
            # connection always may (the client retries elsewhere).
            raise _Drained
        return data

    async def _next_request(self) -> h11.Request | None:
        """The next request's head, or None if the client closed instead."""
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        # At the start of a cycle h11 yields only these two (or raises).
        assert isinstance(event, h11.Request), event
        return event

    async def _read_body(self) -> bool:
        """Read the request's body and drop it; False if it is over MAX_BODY."""
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            assert isinstance(event, h11.Data), event
            size += len(event.data)
            if size > MAX_BODY:
                return False

    async def _respond(self, request: h11.Request, drain: Drain | None) -> None:
        extra: list[tuple[bytes, bytes]] = []
        body_read = await self._read_body()
        # Draining: this is the last response, and it says so.
        closing = drain is not None and drain.draining
        if not body_read:
            status, closing = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, True
        elif request.target.split(b"?", 1)[0] != b"/":
            status = HTTPStatus.NOT_FOUND
        elif request.method not in (b"GET", b"HEAD"):
            status = HTTPStatus.METHOD_NOT_ALLOWED
            extra.append((b"Allow", b"GET, HEAD"))
        else:
            status = HTTPStatus.OK
        body = BODY if status is HTTPStatus.OK else f"{status.phrase}\n".encode()
        await self._send_response(
            status, body, head=request.method == b"HEAD", closing=closing, extra=extra
        )

    async def _send_error(self, status: int) -> None:
        """An error response and ``Connection: close``, if one can still go."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already on its way: only closing is left
        phrase = HTTPStatus(status).phrase
        await self._send_response(
            status, f"{phrase}\n".encode(), head=False, closing=True
        )

    async def _send_response(
        self,
        status: int,
        body: bytes,
        *,
        head: bool,
        closing: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"Date", http_date()),
            (b"Server", SERVER),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            *(extra or ()),
        ]
        if closing:
            headers.append((b"Connection", b"close"))
        reason = HTTPStatus(status).phrase.encode()
        # One write per response: head, body and end together.
        data = self._bytes(
            h11.Response(status_code=status, headers=headers, reason=reason)
        )
        if not head:
            data += self._bytes(h11.Data(data=body))
        data += self._bytes(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _send(self, event: h11.Event) -> None:
        await self.stream.send_all(self._bytes(event))

    def _bytes(self, event: h11.Event) -> bytes:
        data = self.h11.send(event)
        assert data is not None  # None only for ConnectionClosed
        return data

    async def _close(self) -> None:
        """Our side ends the connection: FIN, then read until the client's."""
        await self.stream.send_eof()
        if self.h11.trailing_data[1]:
            return  # the client has closed its side already
        with trio.move_on_after(LINGER):
            while await self.stream.receive_some(MAX_RECV):
                pass


async def serve_http(
    stream: trio.abc.HalfCloseableStream,
    drain: Drain | None = None,
    *,
    idle_timeout: float | None = IDLE_TIMEOUT,
) -> None:
    """Serve HTTP/1.1 on one connection until it ends.

    Args:
        stream: the connection; any half-closeable stream.
        drain: where to hear of a drain (a :class:`~trio_evlisten.ConnListener`);
            on one, the request under way is answered with ``Connection:
            close`` and a connection waiting for its next request is closed.
        idle_timeout: seconds from the end of a response to the end of the
            next one; a client idle that long is closed (a 408 if it had
            begun a request). None: no limit (the benchmark measures what
            the limit costs).

    Error handling:
        A malformed request gets h11's suggested status (400, 431, ...) and
        the connection is closed; a client that resets the connection ends
        it quietly (no exception escapes, so ``trio.serve_tcp``, which lets
        a handler's exception end the server, can serve this too).

    Resource handling:
        The caller owns ``stream`` and closes it after this returns; this
        function half-closes it (``send_eof``) when it ends the connection.
    """
    conn = HTTPConnection(stream, idle_timeout)
    if drain is None:
        await conn.serve(None)
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.close_idle_on_drain, drain)
        await conn.serve(drain)
        nursery.cancel_scope.cancel()


async def handle(
    listener: ConnListener, stream: trio.abc.HalfCloseableStream, addr: object
) -> None:
    """The listener's callback: :func:`serve_http`, told of the listener's drain."""
    await serve_http(stream, listener)


async def main(host: str, port: int) -> None:
    async with trio_evlisten.open_listener(
        handle,
        address=(host, port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        drain_timeout=DRAIN_TIMEOUT,
    ) as listener:
        where = f"[{host}]" if ":" in host else host
        print(f"HTTP server listening on {where}:{listener.port}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        # Leaving the block drains. The receiver is closed, so a second
        # Ctrl-C is a KeyboardInterrupt again: it cuts the drain short.


def parse_args(argv: list[str]) -> tuple[str, int] | None:
    """(host, port) from the command line, or None if the port is invalid."""
    p = argparse.ArgumentParser(prog="http_server.py", description=__doc__)
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
