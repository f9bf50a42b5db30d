"""What comes out of ``open_listener``: yours unwrapped, the listener's grouped."""

from __future__ import annotations

import errno
import os
import sys

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener
from trio_evlisten.testing import ScriptedSocket

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async for data in conn:
        await conn.send_all(data)


async def main() -> tuple[BaseException, list[BaseException]]:
    # 1. The block's own exception comes out as it went in.
    try:
        async with open_listener(
            echo, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ):
            raise ValueError("something in the block went wrong")
    except ValueError as exc:
        print("the block raised", repr(exc))
        yours: BaseException = exc

    # 2. A fatal accept() error with no error callback ends the listener:
    #    it cancels the block and comes out in an ExceptionGroup.
    einval = OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    with ScriptedSocket([einval]) as sock:
        try:
            async with (
                await trio.open_tcp_stream(*sock.getsockname()),
                open_listener(echo, sock=sock),
            ):
                await trio.sleep_forever()
        except BaseExceptionGroup as group:  # Python >= 3.11: except* OSError
            print("the listener failed with", group.exceptions)
            listeners: list[BaseException] = list(group.exceptions)
    return yours, listeners


if __name__ == "__main__":
    trio.run(main)
