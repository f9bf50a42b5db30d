"""A server that sheds load at the door: a bound on the event loop's lag,
an accept rate, and a cap per client address.

The handler echoes once and holds the connection until its client leaves.
Three clients from 127.0.0.1 and one from 127.0.0.2 connect; the first
address may hold two connections, so its third is refused at once, and the
other address is served as if nothing happened.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_evlisten import ConnListener, Flag, ListenerStatistics, open_listener


async def echo_once_then_hold(
    listener: ConnListener, conn: trio.abc.Stream, addr: object
) -> None:
    await conn.send_all(await conn.receive_some())
    await conn.receive_some()  # until the client leaves


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A client from ``source``: 127.0.0.2 and the like are distinct
    loopback addresses on Linux (bind the client's socket before connect)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def served(stream: trio.SocketStream) -> bool:
    try:
        await stream.send_all(b"hi")
        return await stream.receive_some() == b"hi"
    except trio.BrokenResourceError:
        return False


async def main() -> tuple[list[bool], ListenerStatistics]:
    async with open_listener(
        echo_once_then_hold,
        address=("127.0.0.1", 0),
        flags=Flag.CLOSE_ON_FREE,
        max_connections=100,
        max_loop_lag=0.05,  # stop accepting while the loop runs 50 ms late
        max_accept_rate=1000,  # connections per second, bursts of 100
        max_connections_per_client=2,  # then refused (or "hold")
    ) as listener:
        clients = [await connect_from("127.0.0.1", listener.port) for _ in range(3)]
        clients.append(await connect_from("127.0.0.2", listener.port))
        try:
            results = [await served(c) for c in clients]
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
        finally:
            for c in clients:
                await c.aclose()
    return results, stats
