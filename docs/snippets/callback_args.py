"""The callback's extra arguments: the ``ptr`` of libevent, as ``*args``."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

if TYPE_CHECKING:
    from collections.abc import Iterator

HOST, PORT = "127.0.0.1", 9876


async def welcome(
    listener: ConnListener,
    conn: SocketStream,
    addr: object,
    visitors: Iterator[int],
    greeting: str,
) -> None:
    await conn.send_all(f"{greeting}, visitor {next(visitors)}\n".encode())


async def main() -> None:
    async with open_listener(
        welcome,
        itertools.count(1),  # shared by every handler: one task at a time runs
        "Welcome",
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE,
    ) as listener:
        print("counting visitors on port", listener.port)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
