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

* ``trio-http``: :func:`trio.serve_tcp` serving the example's own
  ``serve_http``, the very function the listener runs;
* ``asyncio-http``: :func:`asyncio.start_server` with h11, the same routes,
  headers and body;
* ``corrupt-http``: ``asyncio-http`` answering every 10th request with a 500:
  the self-check of the http workload.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import cast

import trio

HOST = "127.0.0.1"
READ_SIZE = 65536
HTTP_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_server.py"
#: corrupt-http answers every this many-th request with a 500.
CORRUPT_EVERY = 10


def http_example() -> ModuleType:
    """examples/http_server.py, imported from its path (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("http_server", HTTP_EXAMPLE)
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


async def trio_http_main(port: int) -> None:
    await trio.serve_tcp(http_example().serve_http, port, host=HOST)


async def asyncio_http_main(port: int, fail_every: int = 0) -> None:
    """h11 over asyncio streams: the example's routes, headers and body.

    Keep-alive only as far as the benchmark needs: a malformed request or a
    reset ends the connection without an answer.
    """
    import h11

    app = http_example()

    def response(conn: h11.Connection, request: h11.Request, status: int) -> bytes:
        body = app.BODY if status == 200 else f"{HTTPStatus(status).phrase}\n".encode()
        headers = [
            (b"Date", app.http_date()),
            (b"Server", app.SERVER),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        if status == 405:
            headers.append((b"Allow", b"GET, HEAD"))
        reason = HTTPStatus(status).phrase.encode()
        data = conn.send(
            h11.Response(status_code=status, headers=headers, reason=reason)
        )
        if request.method != b"HEAD":
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        return (data or b"") + (conn.send(h11.EndOfMessage()) or b"")

    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(READ_SIZE))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    served += 1
                    if fail_every and served % fail_every == 0:
                        status = 500
                    elif request.target.split(b"?", 1)[0] != b"/":
                        status = 404
                    elif request.method not in (b"GET", b"HEAD"):
                        status = 405
                    else:
                        status = 200
                    writer.write(response(conn, request, status))
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                elif not isinstance(event, h11.Data):
                    break  # ConnectionClosed
        except (h11.RemoteProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


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
    elif kind == "corrupt-http":
        asyncio.run(asyncio_http_main(port, CORRUPT_EVERY))
    else:
        print(f"unknown server kind {kind!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
