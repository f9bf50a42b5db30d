"""Protocol mode with async work: a task per request, a hand-over to a stream.

Run it with ``python protocol_tasks.py``, then ``nc 127.0.0.1 9876``: each
line comes back upper-cased by a task; a first line ``STREAM`` turns the
connection into a plain echo served by a task-mode handler.
"""

from __future__ import annotations

import asyncio

import trio

from trio_evlisten import Flag, SocketStream, Transport, open_listener

HOST, PORT = "0.0.0.0", 9876


async def lookup(transport: Transport, key: bytes) -> None:
    # A database call, say: a task may await; a protocol's callback may not.
    await trio.sleep(0.01)
    transport.write(key.upper() + b"\n")


async def stream_echo(stream: SocketStream, data: bytes) -> None:
    # From here on a task-mode handler: first what the protocol already had.
    await stream.send_all(data)
    async for chunk in stream:
        await stream.send_all(chunk)


class Lookup(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, Transport)
        self.transport = transport
        self.buffer = b""
        self.first = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.first and self.buffer.startswith(b"STREAM\n"):
            # Sniffed: a byte stream is what a task does best.
            rest = self.buffer[len(b"STREAM\n") :]
            self.transport.hand_over(stream_echo, data=rest)
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.first = False
            # Counted with this connection: a drain waits for it.
            self.transport.start_task(lookup, self.transport, line)


async def main() -> None:
    async with open_listener(
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        protocol=Lookup,
    ) as listener:
        print("listening on", listener.sockname)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
