"""A chat server: each line a client sends goes to every client.

Run it with ``python chat.py``, then ``nc 127.0.0.1 9876`` in two terminals.

Two tasks must never send on one stream at once (the second gets
:exc:`trio.BusyResourceError`), and a broadcast would do just that: every
client's handler sending to every client. So each client has a queue (a
memory channel) and one task, its writer, that alone sends on its stream;
a broadcast only puts the line in every queue, which never waits.
"""

from __future__ import annotations

import contextlib

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "0.0.0.0", 9876
#: Lines a client may fall behind by before it is dropped: one that does
#: not read must neither hold up the others nor fill our memory.
QUEUE_SIZE = 64
#: The longest line taken; a client that sends a longer one is dropped.
MAX_LINE = 4096


class Room:
    """The clients connected now: each one's queue, and the scope that drops it."""

    def __init__(self) -> None:
        self.clients: dict[trio.MemorySendChannel[bytes], trio.CancelScope] = {}

    def broadcast(self, line: bytes) -> None:
        """Queue ``line`` for every client; never waits."""
        for queue, scope in list(self.clients.items()):
            try:
                queue.send_nowait(line)
            except trio.WouldBlock:
                # QUEUE_SIZE lines behind: drop it, rather than wait for it
                # (holding up everyone) or queue for it without end.
                del self.clients[queue]
                scope.cancel()


async def write_lines(
    conn: SocketStream, lines: trio.MemoryReceiveChannel[bytes], scope: trio.CancelScope
) -> None:
    """The only task that sends on ``conn``: its queue, in order."""
    with contextlib.suppress(trio.BrokenResourceError):
        async for line in lines:
            await conn.send_all(line)
    scope.cancel()  # the client is gone: stop reading too


async def read_lines(conn: SocketStream, name: bytes, room: Room) -> None:
    """Broadcast each line ``conn`` sends, until it leaves."""
    received = b""
    with contextlib.suppress(trio.BrokenResourceError):  # gone: as at EOF
        async for data in conn:
            *lines, received = (received + data).split(b"\n")
            for line in lines:
                room.broadcast(name + b": " + line + b"\n")
            if len(received) > MAX_LINE:
                return


async def chat(
    listener: ConnListener, conn: SocketStream, addr: tuple[str, int], room: Room
) -> None:
    name = f"{addr[0]}:{addr[1]}".encode()
    queue, lines = trio.open_memory_channel[bytes](QUEUE_SIZE)
    async with trio.open_nursery() as nursery:
        room.clients[queue] = nursery.cancel_scope
        try:
            room.broadcast(name + b" joined\n")
            nursery.start_soon(write_lines, conn, lines, nursery.cancel_scope)
            await read_lines(conn, name, room)
            nursery.cancel_scope.cancel()  # it left: its writer too
        finally:
            room.clients.pop(queue, None)
    room.broadcast(name + b" left\n")


async def main() -> None:
    async with open_listener(
        chat,
        Room(),
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
    ) as listener:
        print("chat on", listener.sockname)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
