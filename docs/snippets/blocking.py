"""LEAVE_SOCKETS_BLOCKING: hand each connection to blocking code in a thread."""

from __future__ import annotations

import socket

import trio

from trio_evlisten import ConnListener, Flag, open_listener

HOST, PORT = "127.0.0.1", 9876


def blocking_echo(conn: socket.socket) -> None:
    with conn:  # the handler owns a blocking socket: it closes it
        while data := conn.recv(65536):
            conn.sendall(data)


async def hand_off(listener: ConnListener, conn: socket.socket, addr: object) -> None:
    await trio.to_thread.run_sync(blocking_echo, conn)


async def main() -> None:
    async with open_listener(
        hand_off,
        address=(HOST, PORT),
        flags=Flag.LEAVE_SOCKETS_BLOCKING | Flag.CLOSE_ON_FREE,
    ) as listener:
        print("blocking echo on port", listener.port)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
