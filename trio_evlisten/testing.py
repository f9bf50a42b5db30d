"""Helpers for testing code that uses trio_evlisten, in your own pytest-trio tests.

- :class:`ScriptedSocket`: a real listening socket on 127.0.0.1 whose
  ``accept()`` raises the errors you script, to drive a listener's error
  paths (pair it with pytest-trio's ``autojump_clock`` to check timing).
- :func:`open_stream_to`: a client :class:`trio.SocketStream` connected to a
  listener, whatever its address family.
"""

from __future__ import annotations

import collections
import socket
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._listener import ConnListener

__all__ = ["ScriptedSocket", "open_stream_to"]


@final
class ScriptedSocket(socket.socket):
    """A listening TCP socket on 127.0.0.1 whose ``accept()`` follows a script.

    Each call to ``accept()`` takes the next item of ``script``: an
    :exc:`OSError` is raised; ``None`` means "accept for real". Once the
    script runs out, every call accepts for real. Pass it to
    ``open_listener(sock=...)``.

    The socket only becomes readable when a client connects, so connect one
    (:func:`open_stream_to`) before expecting the scripted errors; a
    connection stays queued through the errors and is accepted once the
    script lets it.

    Attributes:
        script: the remaining items (a deque: append more at any time).
        calls: :func:`trio.current_time` at each ``accept()`` call, to check a
            backoff schedule under ``autojump_clock``.
    """

    def __init__(self, script: Iterable[OSError | None] = (), *, backlog: int = 128):
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.bind(("127.0.0.1", 0))
            self.listen(backlog)
        except BaseException:
            self.close()
            raise
        self.script: collections.deque[OSError | None] = collections.deque(script)
        self.calls: list[float] = []

    def accept(self) -> tuple[socket.socket, object]:
        self.calls.append(trio.current_time())
        if self.script:
            item = self.script.popleft()
            if item is not None:
                raise item
        return super().accept()


async def open_stream_to(listener: ConnListener) -> trio.SocketStream:
    """Open a client stream to ``listener`` (TCP, IPv6 or Unix socket).

    A wildcard address (``0.0.0.0``, ``::``) is reached through loopback.

    Resource handling:
        The caller owns the stream and must close it (``async with``).
    """
    sockname = listener.sockname
    if isinstance(sockname, (str, bytes)):
        path = sockname.decode() if isinstance(sockname, bytes) else sockname
        return await trio.open_unix_socket(path)
    host = sockname[0]
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return await trio.open_tcp_stream(host, sockname[1])
