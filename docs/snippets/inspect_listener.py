"""Inspecting a listener: its socket, address, state and counters."""

from __future__ import annotations

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "127.0.0.1", 9876


async def report(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    stats = listener.statistics()
    await conn.send_all(
        f"port={listener.port} accepted={stats.accepted} active={stats.active} "
        f"enabled={listener.enabled}\n".encode()
    )


async def main() -> None:
    async with open_listener(
        report, address=(HOST, PORT), flags=Flag.CLOSE_ON_FREE
    ) as listener:
        print("fd:", listener.fd)  # evconnlistener_get_fd
        print("socket:", listener.socket)  # the trio socket object
        print("bound to:", listener.sockname)  # the real port, even for port 0
        print("handlers run in:", listener.nursery)  # evconnlistener_get_base
        print(listener.statistics())
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
