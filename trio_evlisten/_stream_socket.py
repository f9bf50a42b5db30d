"""How a :class:`SocketStream` reaches its socket: options and the trio object.

Owns: ``setsockopt``/``getsockopt`` with :class:`trio.SocketStream`'s
signatures, and the ``socket`` attribute, a trio socket object for the same
socket made only when asked for. Nothing here sends or receives (that is
:mod:`._stream`).
"""

from __future__ import annotations

import socket as _stdlib_socket
from typing import TYPE_CHECKING, overload

import trio

if TYPE_CHECKING:
    import sys

    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer


class SocketAccess:
    """The socket-facing half of :class:`SocketStream` (a mixin, no state)."""

    # The stream's socket, and the trio object for it once asked for.
    __slots__ = ("_sock", "_tsock")

    _sock: _stdlib_socket.socket
    _tsock: trio.socket.SocketType | None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The trio socket object for this stream's socket (made once, on demand).

        Raises:
            trio.ClosedResourceError: it is asked for the first time after
                the stream was closed.
        """
        tsock = self._tsock
        if tsock is None:
            if self._sock.fileno() == -1:
                raise trio.ClosedResourceError(
                    "the stream was closed before its trio socket was made"
                )
            tsock = self._tsock = trio.socket.from_stdlib_socket(self._sock)
        return tsock

    @overload
    def setsockopt(self, level: int, option: int, value: int | Buffer) -> None: ...

    @overload
    def setsockopt(self, level: int, option: int, value: None, length: int) -> None: ...

    def setsockopt(
        self,
        level: int,
        option: int,
        value: int | Buffer | None,
        length: int | None = None,
    ) -> None:
        """Set an option on the socket (:meth:`socket.socket.setsockopt`).

        Args:
            level: e.g. ``socket.IPPROTO_TCP``.
            option: e.g. ``socket.TCP_NODELAY``.
            value: an int or a bytes-like value; ``None`` with ``length``.
            length: with ``value=None``, the option's length.

        Raises:
            TypeError: ``value`` and ``length`` do not fit together.
            OSError: the kernel refused (raised as it is, as trio does).
        """
        if length is None:
            if value is None:
                raise TypeError(
                    "invalid value for argument 'value', "
                    "must not be None when specifying length"
                )
            self._sock.setsockopt(level, option, value)
            return
        if value is not None:
            raise TypeError(
                f"invalid value for argument 'value': {value!r}, "
                "must be None when specifying optlen"
            )
        self._sock.setsockopt(level, option, value, length)

    @overload
    def getsockopt(self, level: int, option: int) -> int: ...

    @overload
    def getsockopt(self, level: int, option: int, buffersize: int) -> bytes: ...

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        """Read an option of the socket (:meth:`socket.socket.getsockopt`).

        Args:
            level: e.g. ``socket.IPPROTO_TCP``.
            option: e.g. ``socket.TCP_NODELAY``.
            buffersize: 0 for an int option, else the size of the bytes to read.

        Returns:
            The option's value: an int, or bytes when ``buffersize`` > 0.

        Raises:
            OSError: the kernel refused (raised as it is, as trio does).
        """
        if buffersize == 0:
            return self._sock.getsockopt(level, option)
        return self._sock.getsockopt(level, option, buffersize)
