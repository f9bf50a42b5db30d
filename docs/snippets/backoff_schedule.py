"""The backoff schedule, measured: ten EMFILEs in a row, no error callback.

Trio's MockClock makes the pauses virtual and the times exact. With no error
callback the errors are logged grouped on the ``trio_evlisten`` logger: the
first at once, the other nine in one line when the listener closes.
"""

from __future__ import annotations

import errno
import os

import trio
import trio.testing

from trio_evlisten import ConnListener, SocketStream, open_listener
from trio_evlisten.testing import ScriptedSocket


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async for data in conn:
        await conn.send_all(data)


async def main() -> tuple[list[float], bytes]:
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    with ScriptedSocket([emfile] * 10) as sock:
        start = trio.current_time()
        async with (
            open_listener(echo, sock=sock),
            await trio.open_tcp_stream(*sock.getsockname()) as client,
        ):
            await client.send_all(b"ping")
            reply = await client.receive_some(4)  # served after the errors
        # sock.calls: the time of each accept() call.
        return [round(t - start, 3) for t in sock.calls], reply


if __name__ == "__main__":
    calls, reply = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    print("accept() called at", calls, "then echoed", reply)
