"""An error callback with arguments: give up after three errors in a row.

``ScriptedSocket`` (from ``trio_evlisten.testing``) is a real listening
socket whose ``accept()`` fails on cue, so this runs anywhere:
``python error_cb.py``.
"""

from __future__ import annotations

import errno
import os
from functools import partial

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, serve_listener
from trio_evlisten.testing import ScriptedSocket


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async for data in conn:
        await conn.send_all(data)


def give_up_after(
    listener: ConnListener, error: OSError, limit: int, seen: list[OSError]
) -> None:
    seen.append(error)
    print(f"accept() failed: {error}")
    if len(seen) >= limit:
        print("giving up")
        listener.close()


async def main() -> list[OSError]:
    seen: list[OSError] = []
    enfile = OSError(errno.ENFILE, os.strerror(errno.ENFILE))
    with ScriptedSocket([enfile] * 5) as sock:
        # A client in the backlog makes the socket readable, so accept() runs.
        async with await trio.open_tcp_stream(*sock.getsockname()):
            # Returns once the listener is closed and its handlers are done.
            await serve_listener(
                echo,
                sock=sock,
                flags=Flag.CLOSE_ON_FREE,
                error_cb=partial(give_up_after, limit=3, seen=seen),
            )
    return seen


if __name__ == "__main__":
    trio.run(main)
