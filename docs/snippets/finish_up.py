"""Drain with a finish-up signal: a keep-alive handler ends between requests.

On ``drain()`` (or on leaving the ``async with`` block) the listener stops
accepting, sets ``listener.draining``, and gives handlers the grace period to
finish; this one stops reading, says goodbye and returns.
"""

from __future__ import annotations

import trio

from trio_evlisten import ConnListener, DrainResult, Flag, SocketStream, open_listener


async def keep_alive(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async with trio.open_nursery() as requests:

        async def stop_reading_when_draining() -> None:
            await listener.wait_draining()
            requests.cancel_scope.cancel()

        requests.start_soon(stop_reading_when_draining)
        async for request in conn:  # one request per read, for brevity
            await conn.send_all(b"ok " + request)
        requests.cancel_scope.cancel()  # the client left first
    await conn.send_all(b"bye\n")  # finish up properly


async def main() -> tuple[DrainResult, bytes, int | None, int | None]:
    async with open_listener(
        keep_alive, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE, backlog=5
    ) as listener:
        stats = listener.statistics()  # backlog, and the kernel's queue limit
        client = await trio.open_tcp_stream("127.0.0.1", listener.port)
        async with client:
            await client.send_all(b"a\n")
            replies = await client.receive_some()
            result = await listener.drain(grace=5)
            while data := await client.receive_some():
                replies += data
    return result, replies, stats.backlog, stats.queue_limit


if __name__ == "__main__":
    print(trio.run(main))
