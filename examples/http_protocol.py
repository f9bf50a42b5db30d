"""examples/http_server.py in protocol mode: h11 driven by asyncio-style callbacks.

Run it, then poke at it from another terminal::

    python examples/http_protocol.py               # listens on 127.0.0.1:8080
    python examples/http_protocol.py 0             # or on a free port (printed)
    python examples/http_protocol.py 8081 --host ::1
    curl -i http://127.0.0.1:8080/                 # 200 "Hello, world!"
    wrk -t1 -c50 -d5s http://127.0.0.1:8080/       # load over keep-alive

The same server as ``examples/http_server.py``: the same routes, statuses,
headers and body, keep-alive and pipelining, ``Connection: close``, the idle
timeout (a 408 for a request begun but not finished), 400 (or h11's status)
then close for a malformed request, 413 over ``MAX_BODY``, ``100
Continue``, the same drain on Ctrl-C or SIGTERM (stop accepting, answer the
request under way with ``Connection: close``, close idle connections at
once, abort the rest after ``DRAIN_TIMEOUT``; a second Ctrl-C stops at
once), the same command line, messages and exit statuses.

What differs is how it runs: no task per connection, but an
:class:`HTTPProtocol` per connection whose ``data_received`` feeds h11 and
answers every complete request at once, in one ``transport.write`` each.
h11 is sans-IO, so nothing in it waits; the only waits are the client's
bytes, which the listener's one task delivers.

A protocol has no event loop to ask for a timer, and a timer per connection,
moved on every request, would cost more per request than the request's own
bookkeeping. So time is kept coarsely, in one place: :class:`HTTPServer`
counts ticks, one per ``SWEEP`` seconds, in a single task started in the
listener's nursery (``listener.nursery``), and each sweep visits every
connection. A connection only copies the tick number when it starts waiting
for a request (an attribute read and write per request); the sweep closes
those that have waited for more than ``IDLE_TIMEOUT`` (so a client gets
between ``IDLE_TIMEOUT`` and ``IDLE_TIMEOUT + SWEEP`` seconds) and aborts
those still lingering after ``LINGER``. Sweeping costs a visit per
connection per ``SWEEP`` seconds, whatever the request rate.

The same task hears of a drain: a protocol is not woken by
``listener.draining`` (nothing is called while a client is silent), so the
task waits in ``listener.wait_draining()``, then closes the connections
idle between two requests. Responses read :attr:`HTTPServer.draining`,
which asks the listener itself, so a request answered after the drain began
says ``Connection: close`` even if the listener's task served it before the
sweep task woke. It ends once the drained
listener has no connection left, which lets the listener's block finish.

:class:`HTTPProtocol` and :class:`HTTPServer` use nothing of Trio's: the
benchmark serves them on asyncio's and uvloop's loops too, so that its http
row compares listeners, not applications.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import math
import signal
import sys
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import h11
import trio

import trio_evlisten
from trio_evlisten import Flag

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_evlisten import ConnListener

HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
BODY: Final = b"Hello, world!\n"
#: Seconds a client has, from the end of one response, to send the next
#: request and read our answer to it; an idle keep-alive connection is
#: closed after it (give or take a ``SWEEP``, see the module's docstring).
IDLE_TIMEOUT: Final = 10.0
#: Seconds the listener gives connections to finish when draining.
DRAIN_TIMEOUT: Final = 5.0
#: Seconds we read (and drop) what a client still sends after our FIN, so
#: that closing does not reset a connection whose last response is unread.
LINGER: Final = 2.0
#: Seconds between two visits of the sweep: the resolution of the idle
#: timeout and of the linger.
SWEEP: Final = 1.0
#: Largest request body we read and drop; a larger one gets a 413.
MAX_BODY: Final = 64 * 1024
SERVER: Final = f"trio_evlisten-example {h11.PRODUCT_ID}".encode()

_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date[1]


class HTTPServer:
    """What the connections of one server share: the clock, the drain flag, the set.

    Loop-agnostic: something calls :meth:`sweep` every ``sweep`` seconds and
    :meth:`drain` when a drain begins (:meth:`run` does both on a
    :class:`~trio_evlisten.ConnListener`; the benchmark has an asyncio
    version).

    Args:
        idle_timeout: seconds a connection may wait for a request and its
            answer; None: no limit (the benchmark measures what it costs).
        linger: seconds we read after our FIN before aborting.
        sweep: seconds between two calls of :meth:`sweep`.

    Error handling:
        Nothing here raises; a connection whose client does not even read
        our last answer when its time is up is aborted, not answered.

    Resource handling:
        Holds a reference to every live connection (its protocol) until the
        transport calls ``connection_lost``; it closes none of them itself
        but through their transports.
    """

    def __init__(
        self,
        idle_timeout: float | None = IDLE_TIMEOUT,
        *,
        linger: float = LINGER,
        sweep: float = SWEEP,
    ) -> None:
        #: Sweeps so far: the coarse clock the connections stamp.
        self.tick = 0
        self._draining = False
        # The listener whose drain we follow (set by run()).
        self._listener: ConnListener | None = None
        self.connections: set[HTTPProtocol] = set()
        self.sweep_seconds = sweep
        # In sweeps: a wait stamped at tick t is over at tick t + n + 1,
        # which is at least n whole sweeps later.
        self._idle_ticks = (
            None if idle_timeout is None else math.ceil(idle_timeout / sweep)
        )
        self._linger_ticks = math.ceil(linger / sweep)
        #: Called when the last connection is lost during a drain.
        self.on_drained: Callable[[], None] | None = None

    @property
    def draining(self) -> bool:
        """Whether a drain began: each response from now on says
        ``Connection: close``."""
        listener = self._listener
        return self._draining or (listener is not None and listener.draining)

    def protocol(self) -> HTTPProtocol:
        """The protocol factory: a connection of this server."""
        return HTTPProtocol(self)

    def sweep(self) -> None:
        """One tick: close the connections idle too long, abort stale lingerers."""
        self.tick = tick = self.tick + 1
        idle, linger = self._idle_ticks, self._linger_ticks
        for conn in list(self.connections):
            waited = tick - conn.since
            if conn.lingering:
                if waited > linger:
                    conn.transport.abort()
            elif idle is not None and waited > idle:
                conn.timed_out()

    def drain(self) -> None:
        """A drain began: answer with ``Connection: close`` from now on, and
        close the connections waiting for a further request."""
        self._draining = True
        for conn in list(self.connections):
            conn.drained()
        self._maybe_drained()

    def lost(self, conn: HTTPProtocol) -> None:
        """``conn``'s connection is over (its ``connection_lost``)."""
        self.connections.discard(conn)
        if self._draining:
            self._maybe_drained()

    def _maybe_drained(self) -> None:
        if not self.connections and self.on_drained is not None:
            self.on_drained()

    async def run(self, listener: ConnListener) -> None:
        """Sweep, and drain with ``listener``, until it is drained and empty.

        Start it in ``listener.nursery``: the listener's block waits for it
        after the drain, and the drain's own end (its grace over, every
        transport aborted) empties the set, so it returns in time.
        """
        drained = trio.Event()
        self.on_drained = drained.set
        self._listener = listener
        while not listener.draining:
            with trio.move_on_after(self.sweep_seconds):
                await listener.wait_draining()
            if not listener.draining:
                self.sweep()
        self.drain()
        while not drained.is_set():
            with trio.move_on_after(self.sweep_seconds):
                await drained.wait()
            self.sweep()


class HTTPProtocol(asyncio.Protocol):
    """One client's connection: h11's state, fed by ``data_received``.

    Error handling:
        A malformed request gets h11's suggested status (400, 431, ...) and
        the connection is closed; a reset ends it quietly (the transport
        calls :meth:`connection_lost` with the error; there is nothing to
        answer).

    Resource handling:
        The transport owns the socket; this class only half-closes it
        (``write_eof``) to end the conversation, then closes or aborts it.
    """

    __slots__ = (
        "h11",
        "lingering",
        "request",
        "served",
        "server",
        "since",
        "size",
        "transport",
    )

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.h11 = h11.Connection(h11.SERVER)
        #: Requests answered so far.
        self.served = 0
        #: The tick at which the current wait began (for a request, or for
        #: the client's FIN while lingering).
        self.since = server.tick
        #: The current request's head, and the bytes of its body so far.
        self.request: h11.Request | None = None
        self.size = 0
        #: Our FIN is sent: we only read (and drop) until the client's.
        self.lingering = False
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.lost(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        self.h11.receive_data(data)
        self._serve()

    def eof_received(self) -> bool:
        if self.lingering:
            return False  # the client's FIN: we are done
        self.h11.receive_data(b"")
        self._serve()
        # Half-open until _serve decides (it has, unless a request is
        # still being answered).
        return True

    def pause_writing(self) -> None:
        # The client does not read our answers: stop reading its requests,
        # as the task-mode example stops in send_all.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # Called by HTTPServer

    def timed_out(self) -> None:
        """The idle timeout passed: a 408 if a request was begun, then close."""
        if self.transport.get_write_buffer_size():
            # The client does not even read our last answer: nothing more
            # can reach it.
            self.transport.abort()
            return
        if self._request_begun():
            self._send_error(HTTPStatus.REQUEST_TIMEOUT)
        self._end()

    def drained(self) -> None:
        """A drain began: close if waiting for a further request not yet begun.

        The first request is always served (the listener hands us only
        connections it accepted before or while draining began).
        """
        if self.served and not self.lingering and not self._request_begun():
            self._end()

    # The conversation

    def _serve(self) -> None:
        """Answer every request h11 has whole; end the connection if due."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error(exc.error_status_hint)
                self._end()
                return
            event_type = type(event)
            if event_type is h11.Request:
                self.request = event  # type: ignore[assignment]
                self.size = 0
            elif event_type is h11.Data:
                self.size += len(event.data)  # type: ignore[union-attr]
                if self.size > MAX_BODY:
                    self._respond(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, closing=True)
                    self._end()
                    return
            elif event_type is h11.EndOfMessage:
                self._respond(None, closing=self.server.draining)
                if conn.our_state is h11.MUST_CLOSE:
                    self._end()
                    return
                conn.start_next_cycle()
                self.served += 1
                self.since = self.server.tick
            elif event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    self._write(h11.InformationalResponse(status_code=100, headers=[]))
                return
            elif event_type is h11.ConnectionClosed:
                # The client closed between requests: nothing to linger for.
                self.transport.close()
                return
            else:  # PAUSED: only after MUST_CLOSE, which ended us above
                return

    def _request_begun(self) -> bool:
        return self.h11.their_state is not h11.IDLE or bool(self.h11.trailing_data[0])

    def _respond(self, status: int | None, *, closing: bool) -> None:
        """Answer the request whose head h11 gave us (``self.request``)."""
        request = self.request
        assert request is not None
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if status is not None:
            pass
        elif request.target.split(b"?", 1)[0] != b"/":
            status = HTTPStatus.NOT_FOUND
        elif request.method not in (b"GET", b"HEAD"):
            status = HTTPStatus.METHOD_NOT_ALLOWED
            extra = ((b"Allow", b"GET, HEAD"),)
        else:
            status = HTTPStatus.OK
        body = (
            BODY
            if status is HTTPStatus.OK
            else f"{HTTPStatus(status).phrase}\n".encode()
        )
        self._send_response(
            status, body, head=request.method == b"HEAD", closing=closing, extra=extra
        )

    def _send_error(self, status: int) -> None:
        """An error response and ``Connection: close``, if one can still go."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already on its way: only closing is left
        phrase = HTTPStatus(status).phrase
        self._send_response(status, f"{phrase}\n".encode(), head=False, closing=True)

    def _send_response(
        self,
        status: int,
        body: bytes,
        *,
        head: bool,
        closing: bool,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        headers = [
            (b"Date", http_date()),
            (b"Server", SERVER),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            *extra,
        ]
        if closing:
            headers.append((b"Connection", b"close"))
        reason = HTTPStatus(status).phrase.encode()
        send = self.h11.send
        # One write per response: head, body and end together.
        data = send(h11.Response(status_code=status, headers=headers, reason=reason))
        assert data is not None  # None only for ConnectionClosed
        if not head:
            data += send(h11.Data(data=body)) or b""
        data += send(h11.EndOfMessage()) or b""
        self.transport.write(data)

    def _write(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        assert data is not None
        self.transport.write(data)

    def _end(self) -> None:
        """Our side ends the connection: FIN, then read until the client's."""
        if self.lingering:
            return
        self.lingering = True
        self.since = self.server.tick
        self.transport.write_eof()
        if self.h11.trailing_data[1]:
            self.transport.close()  # the client has closed its side already


async def main(host: str, port: int) -> None:
    server = HTTPServer()
    async with trio_evlisten.open_listener(
        address=(host, port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        drain_timeout=DRAIN_TIMEOUT,
        protocol=server.protocol,
    ) as listener:
        listener.nursery.start_soon(server.run, listener)
        where = f"[{host}]" if ":" in host else host
        print(f"HTTP server listening on {where}:{listener.port}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        # Leaving the block drains. The receiver is closed, so a second
        # Ctrl-C is a KeyboardInterrupt again: it cuts the drain short.


def parse_args(argv: list[str]) -> tuple[str, int] | None:
    """(host, port) from the command line, or None if the port is invalid."""
    p = argparse.ArgumentParser(prog="http_protocol.py", description=__doc__)
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
