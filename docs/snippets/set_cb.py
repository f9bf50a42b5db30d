"""set_cb: listen at once, but accept only when there is a callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

if TYPE_CHECKING:
    from collections.abc import Mapping

HOST, PORT = "127.0.0.1", 9876


def build_table() -> dict[str, str]:
    """Something slow that the handlers need (here: a table of squares)."""
    return {str(n): str(n * n) for n in range(100_000)}


async def lookup(
    listener: ConnListener,
    conn: SocketStream,
    addr: object,
    table: Mapping[str, str],
) -> None:
    key = (await conn.receive_some(1024)).decode().strip()
    await conn.send_all(f"{table.get(key, '?')}\n".encode())


async def main() -> None:
    # cb=None: the port is open at once, but nothing is accepted; clients
    # wait in the kernel's backlog until a callback is set.
    async with open_listener(
        None, address=(HOST, PORT), flags=Flag.CLOSE_ON_FREE
    ) as listener:
        print("port", listener.port, "is open; building the table")
        table = await trio.to_thread.run_sync(build_table)
        listener.set_cb(lookup, table)
        print("serving lookups")
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
