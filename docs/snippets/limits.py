"""A cap on connections, raised at run time, then a drain with a grace period.

The handler just reads until its client leaves, and knows nothing about
draining: when the grace period ends, the drain cancels it in its read.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_evlisten import ConnListener, DrainResult, Flag, SocketStream, open_listener
from trio_evlisten.testing import open_stream_to


async def read_until_eof(
    listener: ConnListener, conn: SocketStream, addr: object
) -> None:
    async for _ in conn:
        pass


async def main() -> tuple[list[tuple[int, int, int | None]], DrainResult, bytes]:
    seen = []  # (accepted, active, waiting in the kernel's accept queue)
    async with (
        open_listener(
            read_until_eof,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE,
            max_connections=1,
        ) as listener,
        await open_stream_to(listener) as first,
        await open_stream_to(listener) as second,
    ):
        # Let the listener do what it can: take one client, leave one queued.
        await trio.testing.wait_all_tasks_blocked()
        stats = listener.statistics()
        seen.append((stats.accepted, stats.active, stats.queue_depth))

        listener.set_max_connections(2)  # the queued client is taken at once
        await trio.testing.wait_all_tasks_blocked()
        stats = listener.statistics()
        seen.append((stats.accepted, stats.active, stats.queue_depth))

        # Both handlers are blocked in a read; neither returns by itself.
        result = await listener.drain(grace=2.0)
        # Their streams were closed when they were cancelled: EOF here.
        ends = await first.receive_some() + await second.receive_some()
    return seen, result, ends


if __name__ == "__main__":
    print(trio.run(main))
