"""Protocol mode's transport: asyncio's ``Transport``, driven by an engine.

Owns: one connection's side of protocol mode, with the names and semantics
of asyncio's socket transport (CPython's ``asyncio/selector_events.py``,
``_SelectorSocketTransport``, and the flow control of ``transports.py``'s
``_FlowControlMixin``): the write buffer and its limits, pausing and resuming
reads, half-close, ``close`` (flush first) and ``abort``, and which events the
connection wants from its engine (readable while reading, writable while the
write buffer holds data).

May not touch: the epoll fd or the task that waits (:mod:`._engine` serves
the events and calls :meth:`Transport._read_ready` and
:meth:`Transport._write_ready`), the counts, or when ``connection_lost`` runs:
:meth:`Transport._lose` only marks the connection lost and asks the engine
to finish it, as asyncio defers ``connection_lost`` with ``call_soon``, so a
protocol never sees ``connection_lost`` in the middle of one of its own
callbacks.

Where Trio's rules differ from asyncio's, Trio's win: a protocol callback
that raises aborts its connection (asyncio calls the loop's exception
handler and, for most callbacks, goes on), ``connection_lost`` gets that
exception, and the listener counts and logs it like a handler's
(``handler_errors="raise"`` raises it into the listener's nursery).
"""

from __future__ import annotations

import asyncio
import inspect
import socket as _socket
from asyncio import trsock
from typing import TYPE_CHECKING, Any, Final

from ._checks import check_task_fn

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from ._engine import Engine

#: How much one read asks of the kernel, as asyncio's ``max_size``: a bulk
#: stream is read in few system calls (the benchmark's bulk workload shows
#: what a smaller size costs).
MAX_READ: Final = 256 * 1024

#: asyncio's default write-buffer limits (``_FlowControlMixin``): past the
#: high-water mark ``pause_writing()``, at or below the low one
#: ``resume_writing()``.
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = HIGH_WATER // 4

#: The events a transport asks its engine for. epoll's values (the engines
#: translate where they use something else).
READ: Final = 1  # select.EPOLLIN
WRITE: Final = 4  # select.EPOLLOUT

# Errors of a non-blocking call that mean "not now", not "broken".
NOT_NOW: Final = (BlockingIOError, InterruptedError)


def check_protocol_factory(factory: object, name: str = "protocol") -> object:
    """Accept ``None`` or a zero-argument callable returning a protocol.

    Raises:
        TypeError: ``factory`` is not callable, or is an async function (an
            accept callback given where a protocol factory belongs).
    """
    if factory is None:
        return None
    if not callable(factory):
        raise TypeError(
            f"{name} must be a protocol factory (a class such as an "
            f"asyncio.Protocol subclass, or a function returning an instance), "
            f"not {factory!r}"
        )
    if inspect.iscoroutinefunction(factory):
        raise TypeError(
            f"{name} must be a protocol factory called with no arguments, but "
            f"{factory!r} is an async function: that is an accept callback; "
            f"pass it as open_listener's first argument instead"
        )
    return factory


class Transport(asyncio.Transport):
    """One connection in protocol mode: asyncio's ``Transport`` over a socket.

    The protocol gets it in ``connection_made``. Every method is asyncio's
    (:class:`asyncio.Transport`), with its semantics; beyond them,
    :attr:`listener` is the :class:`~trio_evlisten.ConnListener` serving the
    connection, :meth:`start_task` runs async work for it, and
    :meth:`hand_over` gives the connection to a task-mode handler.

    Don't construct it; the listener does.

    Error handling:
        ``write`` on a transport whose connection is lost drops the data, as
        asyncio's does; ``write`` after ``write_eof`` is a
        :exc:`RuntimeError`. An error of the socket (a reset) ends the
        connection: the protocol's ``connection_lost`` gets the
        :exc:`OSError`.

    Resource handling:
        The listener owns the socket: it is closed once the connection is
        lost (after ``close`` flushed the buffer, after ``abort`` at once,
        or when the listener is cancelled or a drain's grace ends).
    """

    __slots__ = (
        "_addr",
        "_buffered",
        "_closing",
        "_driver",
        "_engine",
        "_eof",
        "_eof_in",
        "_fd",
        "_high",
        "_lost",
        "_low",
        "_mask",
        "_paused",
        "_protocol",
        "_reading",
        "_sock",
        "_wbuf",
    )

    def __init__(
        self, engine: Engine, sock: _socket.socket, addr: Any, protocol: Any
    ) -> None:
        # Not BaseTransport.__init__: its ``_extra`` dict would cost memory
        # on every connection; get_extra_info() answers from the socket.
        self._engine = engine
        self._sock = sock
        self._fd = sock.fileno()
        self._addr = addr
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        # Made on the first write the kernel does not take whole.
        self._wbuf: bytearray | None = None
        #: The events the engine waits for on our behalf (READ, WRITE).
        self._mask = 0
        self._reading = True
        # EOF came and eof_received() kept the connection half-open.
        self._eof_in = False
        self._closing = False
        self._eof = False
        # pause_writing() was called and resume_writing() not yet.
        self._paused = False
        self._high = HIGH_WATER
        self._low = LOW_WATER
        #: ``None`` while the connection lives; then ``(exc, error)``: what
        #: connection_lost gets, and whether a callback raised it.
        self._lost: tuple[BaseException | None, bool] | None = None
        #: The fallback engine's wait for this connection (a cancel scope).
        self._driver: Any = None

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closing" if self._closing else "open"
        return f"<trio_evlisten Transport fd={self._fd} {state} peer={self._addr!r}>"

    # ------------------------------------------------------------------
    # Beyond asyncio's

    @property
    def listener(self) -> Any:
        """The :class:`~trio_evlisten.ConnListener` serving this connection.

        For ``listener.draining`` (finish up, then :meth:`close`) and
        ``listener.statistics()``.
        """
        return self._engine.listener

    def start_task(
        self, async_fn: Callable[..., Awaitable[object]], *args: Any
    ) -> None:
        """Run ``async_fn(*args)`` in a task where the listener's handlers run.

        For async work a protocol's callbacks cannot do (a database call per
        request): the task writes its result back with :meth:`write`. It is
        the connection's: its slot (``max_connections``,
        ``max_connections_per_client``) stays held, and ``active`` counts it,
        until the connection is lost *and* its tasks have finished; a drain
        waits for them and cancels them at the end of its grace.

        Raises:
            TypeError: ``async_fn`` is not an async function taking ``*args``.
            RuntimeError: the transport is closing or its connection lost
                (no task could be tied to it).

        Error handling:
            An exception from the task aborts its connection if it is not
            lost yet (the protocol's ``connection_lost`` gets it) and is
            counted and logged as a handler's (raised into the listener's
            nursery with ``handler_errors="raise"``); once the connection is
            lost, it is counted and logged (or raised) by itself.

        Resource handling:
            The task owns nothing of the connection's; the listener still
            closes the socket when the connection is lost.
        """
        check_task_fn(async_fn, "start_task", (), args)
        self._refuse_when_closing("start_task")
        self._engine.start_task(self, async_fn, args)

    def hand_over(
        self,
        async_fn: Callable[..., Awaitable[object]],
        *args: Any,
        data: bytes | bytearray | memoryview = b"",
    ) -> None:
        """Stop serving this connection as a protocol; a handler task takes it.

        ``async_fn(stream, data, *args)`` then runs where the listener's
        handlers run, with the :class:`~trio_evlisten.SocketStream` a task-mode
        handler gets, over the same socket, holding the same slot, and is
        counted as a handler's end when it returns. ``data`` is what the
        protocol already received and wants the handler to see first
        (sniffed bytes; h11's ``trailing_data`` after an Upgrade).

        From this call on the protocol gets no more calls but one:
        ``connection_lost(None)``, soon (never within this call), since the
        connection is over for it, as after :meth:`close`. What :meth:`write`
        buffered is sent on the stream before ``async_fn`` runs.

        Raises:
            TypeError: ``async_fn`` is not an async function taking
                ``(stream, data, *args)``, or ``data`` is not bytes-like.
            RuntimeError: the transport is closing, lost, or after
                :meth:`write_eof`, or it speaks TLS (handing over a TLS
                session is not done).

        Error handling:
            The handler's exceptions are treated as a task-mode handler's
            (counted and logged, or raised with ``handler_errors="raise"``).
            If ``connection_lost`` raises, that is counted as the
            connection's error and the handler never runs.

        Resource handling:
            The socket passes to the handler's stream; the listener closes
            it when the handler returns, as in task mode.
        """
        check_task_fn(async_fn, "hand_over", ("stream", "data"), args)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"hand_over's data must be bytes-like (what the protocol "
                f"received and the handler should see first), not {data!r}"
            )
        self._refuse_when_closing("hand_over")
        if self._eof:
            raise RuntimeError(
                "hand_over() after write_eof(): the write side is shut, so "
                "no handler could answer; hand over before write_eof()"
            )
        if self.get_extra_info("ssl_object") is not None:
            raise RuntimeError(
                "hand_over() of a TLS transport is not supported: the TLS "
                "session cannot move to a stream; serve this listener in "
                "task mode, or without TLS"
            )
        unsent = bytes(self._wbuf) if self._wbuf else b""
        self._engine.hand_over(self, async_fn, args, bytes(data), unsent)
        self._lose(None)

    def _refuse_when_closing(self, method: str) -> None:
        if self._closing:
            state = "lost" if self._lost else "closing"
            raise RuntimeError(
                f"{method}() on a {state} transport ({self!r}): call it while "
                f"the connection is open, before close() or abort()"
            )

    # ------------------------------------------------------------------
    # BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername`` (the PROXY header's client where one was read),
        ``sockname``, ``socket`` (an ``asyncio.trsock.TransportSocket``, as
        asyncio gives); ``default`` for any other name."""
        sock = self._sock
        try:
            if name == "peername":
                return self._addr
            if name == "sockname":
                return sock.getsockname()
            if name == "socket":
                return trsock.TransportSocket(sock)
        except OSError:
            return default
        return default

    def is_closing(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called, or the
        connection is lost."""
        return self._closing

    def close(self) -> None:
        """Close: stop reading, flush the write buffer, then close the socket.

        ``connection_lost(None)`` follows once the buffer is sent (soon, not
        within this call). Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        if self._wbuf:
            self._update()
        else:
            self._lose(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol, as asyncio allows."""
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol this transport calls."""
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

    # ------------------------------------------------------------------
    # ReadTransport

    def is_reading(self) -> bool:
        """Whether the transport reads from the kernel (not paused, not closing)."""
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        """Stop reading from the kernel until :meth:`resume_reading`
        (the peer's data waits there; TCP then slows the peer down)."""
        if self._closing or not self._reading:
            return
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`."""
        if self._closing or self._reading:
            return
        self._reading = True
        self._update()

    # ------------------------------------------------------------------
    # WriteTransport

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        """Set the write buffer's high- and low-water marks (asyncio's rule:
        ``high`` defaults to 64 KiB, or to 4x ``low``; ``low`` to ``high // 4``).

        Raises:
            ValueError: not ``high >= low >= 0``.
        """
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """``(low, high)``, as asyncio returns them."""
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        wbuf = self._wbuf
        return 0 if wbuf is None else len(wbuf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: at once as far as the kernel takes it, the rest buffered.

        Never blocks. Past the high-water mark the protocol's
        ``pause_writing()`` is called.

        Raises:
            TypeError: ``data`` is not bytes-like.
            RuntimeError: after :meth:`write_eof`.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not "
                f"{type(data).__name__!r}"
            )
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._lost is not None or not data:
            return
        wbuf = self._wbuf
        if not wbuf:
            # HOT PATH: the kernel usually takes it all, and nothing is kept.
            try:
                n = self._sock.send(data)
            except NOT_NOW:
                n = 0
            except OSError as exc:
                self._lose(exc)
                return
            if n == len(data):
                return
            if wbuf is None:
                self._wbuf = wbuf = bytearray()
            wbuf += memoryview(data).cast("B")[n:]
            self._update()
        else:
            wbuf += data
        self._maybe_pause()

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        """:meth:`write` each of them, joined into one send."""
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        """Close the write side once the buffer is sent (``shutdown(SHUT_WR)``)."""
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._wbuf:
            self._shutdown()

    def can_write_eof(self) -> bool:
        """True: TCP and Unix stream sockets can half-close."""
        return True

    def abort(self) -> None:
        """Close at once, dropping the write buffer.

        ``connection_lost(None)`` follows (soon, not within this call).
        """
        self._lose(None)

    # ------------------------------------------------------------------
    # Called by the engine (and by the methods above)

    def _update(self) -> None:
        """Tell the engine which events we want now."""
        want = (
            READ if self._reading and not self._closing and not self._eof_in else 0
        ) | (WRITE if self._wbuf else 0)
        if want != self._mask:
            self._engine.set_events(self, want)

    def _lose(self, exc: BaseException | None, *, error: bool = False) -> None:
        """The connection is over: stop everything, have the engine finish it."""
        if self._lost is not None:
            return
        self._lost = (exc, error)
        self._closing = True
        self._wbuf = None
        if self._mask:
            self._engine.set_events(self, 0)
        self._engine.lose_soon(self)

    def _failed(self, exc: Exception) -> None:
        """A protocol callback raised ``exc``: abort this connection only."""
        self._lose(exc, error=True)

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(_socket.SHUT_WR)
        except OSError as exc:
            self._lose(exc)

    def _read_ready(self) -> None:
        """The socket is readable: read once, hand it to the protocol."""
        protocol = self._protocol
        if self._buffered:
            self._read_into(protocol)
            return
        try:
            data = self._sock.recv(MAX_READ)
        except NOT_NOW:
            return
        except OSError as exc:
            self._lose(exc)
            return
        if data:
            try:
                protocol.data_received(data)
            except Exception as exc:
                self._failed(exc)
        else:
            self._on_eof(protocol)

    def _read_into(self, protocol: Any) -> None:
        try:
            buf = protocol.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except Exception as exc:
            self._failed(exc)
            return
        try:
            nbytes = self._sock.recv_into(buf)
        except NOT_NOW:
            return
        except OSError as exc:
            self._lose(exc)
            return
        if nbytes:
            try:
                protocol.buffer_updated(nbytes)
            except Exception as exc:
                self._failed(exc)
        else:
            self._on_eof(protocol)

    def _on_eof(self, protocol: Any) -> None:
        try:
            keep_open = protocol.eof_received()
        except Exception as exc:
            self._failed(exc)
            return
        if keep_open:
            # Half-open: the peer is done sending, we may still write.
            self._eof_in = True
            self._update()
        else:
            self.close()

    def _write_ready(self) -> None:
        """The socket is writable: send what the buffer holds."""
        wbuf = self._wbuf
        if not wbuf:
            return
        try:
            n = self._sock.send(wbuf)
        except NOT_NOW:
            return
        except OSError as exc:
            self._lose(exc)
            return
        del wbuf[:n]
        self._maybe_resume()
        if wbuf or self._lost is not None:
            return
        self._update()
        if self._closing:
            self._lose(None)
        elif self._eof:
            self._shutdown()

    def _maybe_pause(self) -> None:
        wbuf = self._wbuf
        if self._paused or wbuf is None or len(wbuf) <= self._high:
            return
        self._paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._failed(exc)

    def _maybe_resume(self) -> None:
        wbuf = self._wbuf
        if self._paused and (wbuf is None or len(wbuf) <= self._low):
            self._paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._failed(exc)

    def _finish(self) -> tuple[BaseException | None, bool, Any]:
        """For the engine, once lost: what connection_lost gets, and the protocol.

        Drops our references so that the protocol and the transport, which
        refer to each other, are freed by reference counting.
        """
        assert self._lost is not None
        protocol, self._protocol = self._protocol, None
        return self._lost[0], self._lost[1], protocol
