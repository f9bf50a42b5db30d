"""enable and disable: start disabled, then serve one client at a time."""

from __future__ import annotations

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "127.0.0.1", 9876


async def serve_alone(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    listener.disable()  # the next client waits in the kernel's backlog
    try:
        async for data in conn:
            await conn.send_all(data)
    finally:
        if not listener.closed:  # enable() on a closed listener would raise
            listener.enable()


async def main() -> None:
    async with open_listener(
        serve_alone,
        address=(HOST, PORT),
        flags=Flag.DISABLED | Flag.CLOSE_ON_FREE,
    ) as listener:
        # Bound and listening, but accepting nothing yet: clients queue up.
        # This is the place for setup that must finish first.
        print("port", listener.port, "enabled:", listener.enabled)
        listener.enable()
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
