"""The chapter's echo server, the Trio way.

Run it with ``python echo_server.py``, then ``nc 127.0.0.1 9876`` and type.
"""

from __future__ import annotations

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "0.0.0.0", 9876


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    # echo_read_cb: copy all input to the output.
    async for data in conn:
        await conn.send_all(data)
    # EOF: the listener closes conn when this returns (echo_event_cb's
    # bufferevent_free). A reset peer raises trio.BrokenResourceError,
    # which the listener logs at DEBUG: no perror() needed.


def accept_error(listener: ConnListener, error: OSError) -> None:
    print(
        f"Got an error {error.errno} ({error.strerror}) on the listener. Shutting down."
    )
    listener.nursery.cancel_scope.cancel()  # event_base_loopexit(base, NULL)


async def main() -> None:
    async with open_listener(
        echo,
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=-1,
        error_cb=accept_error,
    ) as listener:
        print("listening on", listener.sockname)
        await trio.sleep_forever()  # event_base_dispatch(base)


if __name__ == "__main__":
    trio.run(main)
