"""The chapter's echo server in protocol mode: bufferevent-style callbacks.

Run it with ``python echo_protocol.py``, then ``nc 127.0.0.1 9876`` and type.
"""

from __future__ import annotations

import asyncio

import trio

from trio_evlisten import Flag, open_listener

HOST, PORT = "0.0.0.0", 9876


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # echo_read_cb: copy all input to the output. Never blocks: what the
        # kernel does not take at once waits in the transport's buffer.
        self.transport.write(data)
        if self.transport.listener.draining:  # type: ignore[attr-defined]
            self.transport.close()  # answered; a drain waits for this

    def pause_writing(self) -> None:
        # The peer does not read its echo: stop reading it until it does.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def main() -> None:
    async with open_listener(
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        protocol=Echo,
    ) as listener:
        print("listening on", listener.sockname)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
