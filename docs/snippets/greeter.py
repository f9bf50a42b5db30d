"""A small server of your own, to test: it greets each client by name.

A client sends its name on one line and gets ``hello NAME`` back. Run it with
``python greeter.py`` (port 9876) and try ``echo Ada | nc 127.0.0.1 9876``;
``test_greeter.py`` beside it is its test module.
"""

from __future__ import annotations

import errno
import logging

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST = "0.0.0.0"
PORT = 9876
log = logging.getLogger("greeter")


async def greet(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    """Read a name (up to the first newline, or EOF) and answer ``hello NAME``."""
    received = bytearray()
    async for data in conn:
        received += data
        if b"\n" in received:
            break
    name = bytes(received).partition(b"\n")[0].strip() or b"stranger"
    await conn.send_all(b"hello " + name + b"\n")


def on_accept_error(listener: ConnListener, error: OSError) -> None:
    """Out of fds or memory: wait it out. Anything else: stop serving."""
    if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        # The listener pauses accepting (10 ms, doubling to 1 s) by itself.
        log.warning("accept() failed: %s; pausing", error.strerror)
    else:
        log.error("the listening socket is broken (%s); closing it", error)
        listener.close()


async def main() -> None:
    async with open_listener(
        greet,
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        error_cb=on_accept_error,
    ) as listener:
        print("greeting on", listener.sockname)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
