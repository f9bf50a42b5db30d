"""A handler that raises: logged by default, propagated with "raise"."""

from __future__ import annotations

import sys

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener
from trio_evlisten.testing import open_stream_to

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def fragile(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    data = await conn.receive_some()
    if data == b"boom\n":
        raise ValueError("the client said boom")
    await conn.send_all(data)


async def ask(listener: ConnListener, message: bytes) -> bytes:
    async with await open_stream_to(listener) as client:
        await client.send_all(message)
        return await client.receive_some()


async def main() -> tuple[list[bytes], int, list[BaseException]]:
    # handler_errors="log" (the default): the traceback goes to the
    # trio_evlisten logger, that one connection is closed, the rest go on.
    async with open_listener(
        fragile, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
    ) as listener:
        replies = [await ask(listener, b"boom\n"), await ask(listener, b"hi\n")]
        errors = listener.statistics().handler_errors
        print("replies:", replies, "handler errors:", errors)

    # handler_errors="raise": Trio's strict way; the exception ends the
    # listener (cancelling the block) and comes out in an ExceptionGroup.
    try:
        async with open_listener(
            fragile,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE,
            handler_errors="raise",
        ) as listener:
            await ask(listener, b"boom\n")
            await trio.sleep_forever()
    except BaseExceptionGroup as group:
        print("the listener ended with", group.exceptions)
        raised = list(group.exceptions)
    return replies, errors, raised


if __name__ == "__main__":
    trio.run(main)
