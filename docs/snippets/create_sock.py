"""evconnlistener_new: wrap a socket you made and bound yourself."""

from __future__ import annotations

import socket

import trio

from trio_evlisten import ConnListener, SocketStream, open_listener

HOST, PORT = "127.0.0.1", 9876


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    async for data in conn:
        await conn.send_all(data)


async def main() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, PORT))
        # No CLOSE_ON_FREE: the socket stays ours, and the `with` closes it
        # after the listener is done with it.
        async with open_listener(echo, sock=sock, backlog=-1) as listener:
            print("listening on fd", listener.fd, "port", listener.port)
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
