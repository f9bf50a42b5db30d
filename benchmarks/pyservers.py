"""The Python echo servers the benchmark compares, one per process.

Run as ``python benchmarks/pyservers.py KIND PORT``; each listens on
127.0.0.1:PORT and echoes every byte back until the client closes:

* ``trio``: :func:`trio.serve_tcp`, the handler ``async for data in stream:
  await stream.send_all(data)`` (the same handler ``examples/echo.py`` uses);
* ``asyncio-streams``: :func:`asyncio.start_server`, read/write/drain;
* ``asyncio-protocol``: an :class:`asyncio.Protocol` writing in
  ``data_received``, pausing reads while the transport is over its high-water
  mark;
* ``uvloop-protocol``: the same protocol on uvloop's loop;
* ``corrupt``: an asyncio protocol that flips a bit of every chunk of 64 B or
  more: not a contender, the harness's own self-check (it must be reported
  as failing).

And the HTTP/1.1 servers of the ``http`` workload (h11, keep-alive, the same
responses as ``examples/http_server.py``, which is ``ours`` there):

* ``trio-http``: :func:`trio.serve_listeners` (what :func:`trio.serve_tcp`
  runs) serving the example's own ``serve_http``, the very function the
  listener runs, with a drain on SIGINT/SIGTERM as the listener has;
* ``asyncio-http``: :func:`asyncio.start_server` with h11, the example's
  ``HTTPConnection`` ported step by step: the same routes, headers and body,
  the same idle timeout (one deadline per connection, moved per request),
  drain, limits and one write per response;
* ``asyncio-protocol-http`` and ``uvloop-protocol-http``: the protocol
  example's own ``HTTPProtocol`` and ``HTTPServer`` (examples/http_protocol.py,
  ``ours-protocol`` in the http row) on asyncio's and uvloop's
  ``create_server``, its sweep and drain driven by an asyncio task: the same
  application, so that the row compares the loops under it;
* ``ours-protocol-bare-http``: examples/http_protocol.py's application on the
  listener without its sweep task (no idle timeout, no drain): what they
  cost (``--servers ours-protocol,ours-protocol-bare``);
* ``corrupt-http``: ``asyncio-http`` answering every 10th request with a 500:
  the self-check of the http workload;
* ``ours-http`` and its variants without a feature (``ours-no-timeout-http``,
  ``ours-no-drain-http``, ``ours-bare-http`` without either,
  ``ours-split-writes-http`` sending head, body and end in three writes):
  the example's application on the listener, to measure what each feature
  costs per request (``python -m benchmarks --servers
  ours,ours-bare,ours-no-timeout,ours-no-drain,ours-split-writes
  --workloads http``).

Every HTTP server behaves the same, so that the http row compares
listeners, not applications.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import signal
import sys
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any, cast

try:
    import h11
except ImportError:  # only the http servers need it (run.py checks for it)
    h11 = None  # type: ignore[assignment]

import trio

HOST = "127.0.0.1"
READ_SIZE = 65536
HTTP_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_server.py"
HTTP_PROTOCOL_EXAMPLE = HTTP_EXAMPLE.with_name("http_protocol.py")
#: corrupt-http answers every this many-th request with a 500.
CORRUPT_EVERY = 10


def http_example(path: Path = HTTP_EXAMPLE) -> ModuleType:
    """examples/http_server.py (or another example), imported from its path
    (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def trio_main(port: int) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    await trio.serve_tcp(echo, port, host=HOST)


async def streams_main(port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(echo, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


class EchoProtocol(asyncio.Protocol):
    """Echo in ``data_received``; stop reading while the write buffer is full."""

    corrupt = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.corrupt and len(data) >= 64:  # the 1-byte readiness probe passes
            data = bytes([data[0] ^ 1]) + data[1:]
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class CorruptProtocol(EchoProtocol):
    corrupt = True


async def protocol_main(port: int, protocol: Callable[[], asyncio.Protocol]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------------
# HTTP/1.1: every server does what examples/http_server.py does (the idle
# timeout, drain on SIGINT/SIGTERM, one write per response), so that the
# http row compares listeners, not applications.


class TrioDrain:
    """A drain for :func:`trio.serve_tcp`: what the example's ``Drain`` needs."""

    def __init__(self) -> None:
        self.draining = False
        self._event = trio.Event()

    def start(self) -> None:
        self.draining = True
        self._event.set()

    async def wait_draining(self) -> None:
        await self._event.wait()


async def trio_http_main(port: int) -> None:
    """The example's ``serve_http`` on :func:`trio.serve_listeners`.

    On SIGINT or SIGTERM: stop accepting, tell the connections (as the
    listener's drain does), give them the example's ``DRAIN_TIMEOUT``.
    """
    app = http_example()
    drain = TrioDrain()
    handler = functools.partial(app.serve_http, drain=drain)
    listeners = await trio.open_tcp_listeners(port, host=HOST, backlog=4096)
    async with trio.open_nursery() as handlers:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    functools.partial(
                        trio.serve_listeners,
                        handler,
                        listeners,
                        handler_nursery=handlers,
                    )
                )
                async for _ in signals:
                    break
                accepting.cancel_scope.cancel()
        drain.start()
        handlers.cancel_scope.deadline = trio.current_time() + app.DRAIN_TIMEOUT


class SplitWrites:
    """Makes the example's connection send head, body and end in three writes
    (the cost of not coalescing them; see ``ours-split-writes``)."""

    @staticmethod
    def connection_class(app: ModuleType) -> type[Any]:
        class SplitConnection(app.HTTPConnection):  # type: ignore[name-defined,misc]
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
                    (b"Date", app.http_date()),
                    (b"Server", app.SERVER),
                    (b"Content-Type", b"text/plain; charset=utf-8"),
                    (b"Content-Length", str(len(body)).encode()),
                    *(extra or ()),
                ]
                if closing:
                    headers.append((b"Connection", b"close"))
                reason = HTTPStatus(status).phrase.encode()
                await self._send(
                    h11.Response(status_code=status, headers=headers, reason=reason)
                )
                if not head:
                    await self._send(h11.Data(data=body))
                await self._send(h11.EndOfMessage())

        return SplitConnection


async def ours_http_main(
    port: int, *, idle_timeout: float | None, drain: bool, split: bool
) -> None:
    """The example's application on the listener, a feature left out.

    ``ours`` in the http row is examples/http_server.py itself; these
    variants measure what each of its features costs per request.
    """
    import trio_evlisten

    app = http_example()
    make = SplitWrites.connection_class(app) if split else app.HTTPConnection

    async def handle(listener: Any, stream: Any, addr: object) -> None:
        conn = make(stream, idle_timeout)
        if not drain:
            await conn.serve(None)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.close_idle_on_drain, listener)
            await conn.serve(listener)
            nursery.cancel_scope.cancel()

    async with trio_evlisten.open_listener(
        handle,
        address=(HOST, port),
        flags=trio_evlisten.Flag.CLOSE_ON_FREE | trio_evlisten.Flag.REUSEABLE,
        drain_timeout=app.DRAIN_TIMEOUT,
    ):
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break


class _Drained(Exception):
    """A drain ended the wait for a request of which no byte had come."""


class AsyncioShutdown:
    """The asyncio server's drain: the flag, and the connections it may cut."""

    def __init__(self) -> None:
        self.draining = False
        #: Connections waiting for a further request of which no byte came.
        self.idle: set[AsyncioHTTPConnection] = set()

    def start(self) -> None:
        self.draining = True
        for conn in list(self.idle):
            conn.drained = True
            # A cancelled StreamReader.read() consumes nothing, even if the
            # bytes came as it was cancelled: no request is cut in half.
            conn.task.cancel()


class AsyncioHTTPConnection:
    """examples/http_server.py's ``HTTPConnection``, on asyncio streams.

    The same steps in the same order: one deadline per connection moved
    before each request (a ``TimerHandle``, as the example moves its cancel
    scope's), a 408 for a request begun but not finished in time, the first
    request always served, a drain that ends idle waits and answers the
    request under way with ``Connection: close``, 413 over ``MAX_BODY``,
    ``100 Continue``, one write per response, FIN then linger on close.
    """

    def __init__(
        self,
        app: ModuleType,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        shutdown: AsyncioShutdown,
        fail: Callable[[], bool],
    ) -> None:
        self.app = app
        self.reader = reader
        self.writer = writer
        self.shutdown = shutdown
        self.fail = fail
        self.h11 = h11.Connection(h11.SERVER)
        self.served = 0
        self.loop = asyncio.get_running_loop()
        self.task = cast("asyncio.Task[None]", asyncio.current_task())
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False
        self.drained = False

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    async def serve(self) -> None:
        try:
            await self._serve()
        except ConnectionError:
            return  # reset: nobody is left to answer

    async def _serve(self) -> None:
        app = self.app
        try:
            while True:
                if self.served and self.shutdown.draining:
                    break
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.loop.call_at(
                    self.loop.time() + app.IDLE_TIMEOUT, self._expire
                )
                try:
                    request = await self._next_request()
                    if request is None:
                        return
                    await self._respond(request)
                except h11.RemoteProtocolError as exc:
                    await self._send_error(exc.error_status_hint)
                    break
                if self.h11.our_state is h11.MUST_CLOSE:
                    break
                self.h11.start_next_cycle()
                self.served += 1
        except asyncio.CancelledError:
            if not (self.expired or self.drained):
                raise
            if sys.version_info >= (3, 11):
                self.task.uncancel()
            if self.expired and self._request_begun():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._send_error(HTTPStatus.REQUEST_TIMEOUT), app.LINGER
                    )
        finally:
            if self.timer is not None:
                self.timer.cancel()
        await self._close()

    def _request_begun(self) -> bool:
        return self.h11.their_state is not h11.IDLE or bool(self.h11.trailing_data[0])

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.h11.receive_data(await self._receive())

    async def _receive(self) -> bytes:
        if self.served == 0 or self._request_begun():
            return await self.reader.read(self.app.MAX_RECV)
        self.shutdown.idle.add(self)
        try:
            return await self.reader.read(self.app.MAX_RECV)
        finally:
            self.shutdown.idle.discard(self)

    async def _next_request(self) -> h11.Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        return event

    async def _read_body(self) -> bool:
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            assert isinstance(event, h11.Data), event
            size += len(event.data)
            if size > self.app.MAX_BODY:
                return False

    async def _respond(self, request: h11.Request) -> None:
        extra: list[tuple[bytes, bytes]] = []
        body_read = await self._read_body()
        closing = self.shutdown.draining
        if not body_read:
            status, closing = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, True
        elif self.fail():
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        elif request.target.split(b"?", 1)[0] != b"/":
            status = HTTPStatus.NOT_FOUND
        elif request.method not in (b"GET", b"HEAD"):
            status = HTTPStatus.METHOD_NOT_ALLOWED
            extra.append((b"Allow", b"GET, HEAD"))
        else:
            status = HTTPStatus.OK
        body = (
            self.app.BODY if status is HTTPStatus.OK else f"{status.phrase}\n".encode()
        )
        await self._send_response(
            status, body, head=request.method == b"HEAD", closing=closing, extra=extra
        )

    async def _send_error(self, status: int) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
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
        app = self.app
        headers = [
            (b"Date", app.http_date()),
            (b"Server", app.SERVER),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            *(extra or ()),
        ]
        if closing:
            headers.append((b"Connection", b"close"))
        reason = HTTPStatus(status).phrase.encode()
        data = self._bytes(
            h11.Response(status_code=status, headers=headers, reason=reason)
        )
        if not head:
            data += self._bytes(h11.Data(data=body))
        data += self._bytes(h11.EndOfMessage())
        self.writer.write(data)
        await self.writer.drain()

    async def _send(self, event: h11.Event) -> None:
        self.writer.write(self._bytes(event))
        await self.writer.drain()

    def _bytes(self, event: h11.Event) -> bytes:
        data = self.h11.send(event)
        assert data is not None
        return data

    async def _close(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()
        if self.h11.trailing_data[1]:
            return

        async def read_to_eof() -> None:
            while await self.reader.read(self.app.MAX_RECV):
                pass

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(read_to_eof(), self.app.LINGER)


async def asyncio_http_main(port: int, fail_every: int = 0) -> None:
    """h11 over asyncio streams, as examples/http_server.py behaves.

    On SIGINT or SIGTERM: stop accepting, cut idle waits, let requests under
    way finish (``Connection: close``) for the example's ``DRAIN_TIMEOUT``,
    then cancel what is left.
    """
    app = http_example()
    shutdown = AsyncioShutdown()
    tasks: set[asyncio.Task[None]] = set()
    served = 0

    def fail() -> bool:
        nonlocal served
        served += 1
        return bool(fail_every) and served % fail_every == 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = AsyncioHTTPConnection(app, reader, writer, shutdown, fail)
        tasks.add(conn.task)
        try:
            await conn.serve()
        except h11.RemoteProtocolError:
            pass  # a second protocol error while answering the first
        finally:
            tasks.discard(conn.task)
            writer.close()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(serve, HOST, port, backlog=4096)
    async with server:
        await stop.wait()
        server.close()
        shutdown.start()
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=app.DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def protocol_http_main(port: int) -> None:
    """examples/http_protocol.py's application on the running asyncio loop.

    Its ``HTTPServer`` is loop-agnostic; what the example's ``run`` does on
    the listener is done here with asyncio: a sweep every ``SWEEP`` seconds,
    and on SIGINT or SIGTERM stop accepting, ``HTTPServer.drain``, wait up
    to ``DRAIN_TIMEOUT`` for the connections, abort what is left.
    """
    app = http_example(HTTP_PROTOCOL_EXAMPLE)
    http = app.HTTPServer()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drained = asyncio.Event()
    http.on_drained = drained.set
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(http.sweep_seconds)
            http.sweep()

    server = await loop.create_server(http.protocol, HOST, port, backlog=4096)
    sweeper = asyncio.ensure_future(sweep())
    try:
        await stop.wait()
        server.close()
        http.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drained.wait(), app.DRAIN_TIMEOUT)
        for conn in list(http.connections):
            conn.transport.abort()
        await server.wait_closed()
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


async def ours_protocol_bare_http_main(port: int) -> None:
    """examples/http_protocol.py's ``main`` without its sweep task."""
    import trio_evlisten

    app = http_example(HTTP_PROTOCOL_EXAMPLE)
    http = app.HTTPServer(None)
    async with trio_evlisten.open_listener(
        address=(HOST, port),
        flags=trio_evlisten.Flag.CLOSE_ON_FREE | trio_evlisten.Flag.REUSEABLE,
        drain_timeout=app.DRAIN_TIMEOUT,
        protocol=http.protocol,
    ):
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break


#: The example's application on the listener with features left out, to
#: measure each one's cost per request: kind -> (idle timeout, drain,
#: coalesced writes are split).
OURS_HTTP_VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "ours-http": (True, True, False),
    "ours-no-timeout-http": (False, True, False),
    "ours-no-drain-http": (True, False, False),
    "ours-bare-http": (False, False, False),
    "ours-split-writes-http": (True, True, True),
}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} KIND PORT", file=sys.stderr)
        return 2
    kind, port = argv[1], int(argv[2])
    if kind == "trio":
        trio.run(trio_main, port)
    elif kind == "asyncio-streams":
        asyncio.run(streams_main(port))
    elif kind == "asyncio-protocol":
        asyncio.run(protocol_main(port, EchoProtocol))
    elif kind == "uvloop-protocol":
        import uvloop

        uvloop.run(protocol_main(port, EchoProtocol))
    elif kind == "corrupt":
        asyncio.run(protocol_main(port, CorruptProtocol))
    elif kind == "trio-http":
        trio.run(trio_http_main, port)
    elif kind == "asyncio-http":
        asyncio.run(asyncio_http_main(port))
    elif kind == "asyncio-protocol-http":
        asyncio.run(protocol_http_main(port))
    elif kind == "uvloop-protocol-http":
        import uvloop

        uvloop.run(protocol_http_main(port))
    elif kind == "ours-protocol-bare-http":
        trio.run(ours_protocol_bare_http_main, port)
    elif kind == "corrupt-http":
        asyncio.run(asyncio_http_main(port, CORRUPT_EVERY))
    elif kind in OURS_HTTP_VARIANTS:
        timeout, drain, split = OURS_HTTP_VARIANTS[kind]
        idle_timeout = http_example().IDLE_TIMEOUT if timeout else None
        main = functools.partial(
            ours_http_main, port, idle_timeout=idle_timeout, drain=drain, split=split
        )
        trio.run(main)
    else:
        print(f"unknown server kind {kind!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
