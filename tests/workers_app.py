"""Handlers for tests/test_workers.py, run by worker processes as MODULE:FUNC."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from trio_evlisten import ConnListener


async def pid_echo(
    listener: ConnListener, conn: trio.SocketStream, addr: object
) -> None:
    """Say which worker process this is ("<pid>\\n"), then echo."""
    await conn.send_all(f"{os.getpid()}\n".encode())
    async for data in conn:
        await conn.send_all(data)


async def stuck_echo(
    listener: ConnListener, conn: trio.SocketStream, addr: object
) -> None:
    """Leave a non-daemon thread behind that never ends, so that the worker
    process cannot exit by itself (the interpreter waits for the thread) and
    the supervisor has to SIGKILL it; then echo."""
    threading.Thread(target=threading.Event().wait, name="stuck").start()
    await pid_echo(listener, conn, addr)


async def addr_echo(
    listener: ConnListener, conn: trio.SocketStream, addr: object
) -> None:
    """Say which address the listener reported ("<repr(addr)>\\n"), then echo."""
    await conn.send_all(f"{addr!r}\n".encode())
    async for data in conn:
        await conn.send_all(data)


class PidEchoProtocol(asyncio.Protocol):
    """pid_echo in protocol mode: the worker's pid line, then an echo."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(f"{os.getpid()}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
