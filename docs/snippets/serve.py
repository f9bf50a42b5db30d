"""serve_listener: the listener as one more task in your nursery."""

from __future__ import annotations

from functools import partial

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, serve_listener

HOST, PORT = "127.0.0.1", 9876


async def shout(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async for data in conn:
        await conn.send_all(data.upper())


async def main() -> None:
    async with trio.open_nursery() as nursery:
        listener: ConnListener = await nursery.start(
            partial(
                serve_listener, shout, address=(HOST, PORT), flags=Flag.CLOSE_ON_FREE
            )
        )
        # nursery.start returned: the listener is accepting now.
        print("shouting back on port", listener.port)
        # Start your other tasks here. The nursery ends when it is cancelled,
        # or once listener.close() is called and the handlers are done.


if __name__ == "__main__":
    trio.run(main)
