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
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import cast

import trio

HOST = "127.0.0.1"
READ_SIZE = 65536


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
    else:
        print(f"unknown server kind {kind!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
