"""evconnlistener_new_bind: give an address, get a listening listener."""

from __future__ import annotations

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "127.0.0.1", 9876


async def greet(
    listener: ConnListener, conn: SocketStream, addr: tuple[str, int]
) -> None:
    host, port = addr
    await conn.send_all(f"hello {host}:{port}\n".encode())


async def main() -> None:
    async with open_listener(
        greet,
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=-1,
    ) as listener:
        print("listening on port", listener.port)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
