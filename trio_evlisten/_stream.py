"""A lean :class:`trio.abc.HalfCloseableStream` over a stdlib socket.

One concern: the stream a handler is given, and how it reaches its socket
(options, the trio socket object). :class:`trio.SocketStream` wraps a trio
socket object, and each of its calls goes through trio's general machinery
(an error-translating context manager, a conflict detector, the socket
method wrapper, ``_try_sync``); here each call is one function that does the
system call on the stdlib socket itself, with trio's semantics kept exactly
(``trio.testing.check_half_closeable_stream`` proves it in
``tests/test_stream.py``).

The copy kept for speed: :meth:`SocketStream.__anext__` repeats
:meth:`SocketStream.receive_some`'s body (see the comment there). Nothing
else is written twice: :func:`adopt` and the constructor share
:meth:`SocketStream._attach`.
"""

from __future__ import annotations

import errno
import socket as _stdlib_socket
import sys
from contextlib import suppress
from typing import TYPE_CHECKING, Final, NoReturn, final, overload

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

if TYPE_CHECKING:
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer

#: What ``receive_some()`` asks the kernel for when given no ``max_bytes``;
#: trio's ``SocketStream`` uses the same (``DEFAULT_RECEIVE_SIZE``).
DEFAULT_RECEIVE_SIZE: Final = 65536

# The errnos that mean "this socket was closed under us" rather than "the
# connection broke": EBADF on Unix, ENOTSOCK on Windows (as trio sorts them).
_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})


def _raise_stream_error(exc: OSError) -> NoReturn:
    """Raise the trio stream error for ``exc``, as trio's ``SocketStream`` does.

    Called inside the ``except`` block, so ``exc`` is the context; for a closed
    socket it is suppressed (``from None``), as trio does, since EBADF says
    nothing a user can act on beyond "closed".
    """
    if exc.errno in _CLOSED_ERRNOS:
        raise trio.ClosedResourceError("this socket was already closed") from None
    raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def _recv_now(sock: _stdlib_socket.socket, max_bytes: int) -> bytes | None:
    """``sock.recv()`` that does not wait: ``None`` if nothing has arrived.

    A function of its own for memory, not style: an exception raised in a
    frame gives that frame a frame object, kept as long as the frame lives.
    Raised in ``receive_some``'s own frame, the "nothing yet" of a connection
    about to wait would cost memory for as long as it waits idle (the
    "memory per idle connection" row of ``python -m benchmarks.stream_micro``);
    raised here, it is gone on return. (Other errors are rare, and end the
    stream.)
    """
    try:
        return sock.recv(max_bytes)
    except BlockingIOError:
        return None


def _refuse_busy_receive() -> NoReturn:
    raise trio.BusyResourceError(
        "another task is currently receiving data on this SocketStream"
    )


def _refuse_busy_send() -> NoReturn:
    raise trio.BusyResourceError(
        "another task is currently sending data on this SocketStream"
    )


def _refuse_send_after_eof() -> NoReturn:
    raise trio.ClosedResourceError("can't send data after sending EOF") from None


#: ``TCP_NOTSENT_LOWAT`` as trio sets it: a socket reports writable only while
#: it holds less than this much data not yet sent, so a sender is paced by
#: the network instead of filling megabytes of kernel buffer (lower latency,
#: less memory, and ``wait_send_all_might_not_block`` means something). trio
#: picked 16 KiB (python-trio/trio#72: "bandwidth * rescheduling interval");
#: we keep it so the two streams behave alike.
NOTSENT_LOWAT: Final = 2**14

TCP_FAMILIES: Final = frozenset(
    {_stdlib_socket.AF_INET, getattr(_stdlib_socket, "AF_INET6", -1)}
)

#: The options a stream sets on a TCP socket (:class:`SocketStream` and
#: trio's alike), each on its own: one refused does not skip the next.
#: TCP_NOTSENT_LOWAT is left out where the platform has no such constant,
#: as trio leaves it out.
STREAM_TCP_OPTIONS: Final[tuple[tuple[int, int, int], ...]] = (
    (_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1),
) + (
    ((_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT),)
    if hasattr(_stdlib_socket, "TCP_NOTSENT_LOWAT")
    else ()
)


def prepare_listening_socket(sock: _stdlib_socket.socket) -> bool:
    """Set the options :class:`SocketStream` sets, once, on a listening socket.

    Linux copies ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` from a listening
    socket into every socket ``accept()`` returns (checked in
    tests/test_stream.py), so a listener that sets them here can hand its
    connections to :func:`adopt`, two system calls cheaper per connection.

    Returns:
        Whether accepted sockets will come with the options (False elsewhere
        than Linux, or if the kernel refused one): then use the constructor.
    """
    if not sys.platform.startswith("linux"):
        return False
    if sock.family not in TCP_FAMILIES:
        return True  # nothing to set: a Unix socket has no TCP options
    try:
        for level, option, value in STREAM_TCP_OPTIONS:
            sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


@final
class SocketStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` over a connected stdlib socket.

    The stream handlers get: :class:`trio.SocketStream`'s surface and
    semantics (every method, every error, every checkpoint) for less CPU per
    call and less memory per idle connection (the figures, and how they are
    taken, are in :doc:`/benchmarks` and
    ``python -m benchmarks.stream_micro``). Each method makes its
    system call on the stdlib :class:`socket.socket` directly: a
    non-blocking attempt first, and only if the kernel says "would block",
    :func:`trio.lowlevel.wait_readable` or
    :func:`~trio.lowlevel.wait_writable`. A call that succeeds at once still
    checkpoints (:func:`~trio.lowlevel.checkpoint_if_cancelled` before the
    system call, :func:`~trio.lowlevel.cancel_shielded_checkpoint` after),
    so a cancelled call never loses data and every call is a cancel point and
    a schedule point, as trio promises.

    For TCP sockets (``AF_INET``/``AF_INET6``) it sets ``TCP_NODELAY`` and
    ``TCP_NOTSENT_LOWAT`` = 16 KiB as trio's
    ``SocketStream`` does, ignoring an :exc:`OSError` like trio; use
    :meth:`setsockopt` to change them.

    What differs from :class:`trio.SocketStream`:

    * It wraps a stdlib :class:`socket.socket` (trio's takes a trio socket).
      :attr:`socket` still gives a trio socket object for the same socket,
      made the first time it is asked for.
    * Two tasks receiving at once (``receive_some`` or ``async for``): the
      second raises :exc:`trio.BusyResourceError` even when the first one is
      not blocked (trio notices only when both wait in ``wait_readable``),
      as :class:`trio.abc.ReceiveStream` documents it.
    * ``send_all`` of a :class:`memoryview` whose items are wider than a byte
      counts bytes, not items, when a send is partial (trio's counts items).
    * Asking for :attr:`socket` for the first time after the stream was
      closed raises :exc:`trio.ClosedResourceError` (a trio socket object
      cannot be made over a closed socket).

    Args:
        sock: a connected ``SOCK_STREAM`` :class:`socket.socket` (exactly
            that type: not a subclass such as :class:`ssl.SSLSocket`, not a
            trio socket). It is made non-blocking here.

    Raises:
        TypeError: ``sock`` is not a stdlib :class:`socket.socket`.
        ValueError: ``sock`` is not a ``SOCK_STREAM`` socket (as trio's
            ``SocketStream`` raises).

    Error handling:
        ``EBADF`` from the socket (it was closed: by :meth:`aclose`, or under
        the stream) becomes :exc:`trio.ClosedResourceError`; any other
        :exc:`OSError` (reset, broken pipe, timed out) becomes
        :exc:`trio.BrokenResourceError` raised ``from`` it. A second task
        sending (``send_all``, ``send_eof``,
        ``wait_send_all_might_not_block``) while one is, or receiving while
        one is, gets :exc:`trio.BusyResourceError`. ``send_all`` after
        ``send_eof`` raises :exc:`trio.ClosedResourceError`. A cancelled
        ``receive_some`` consumed no data; a cancelled ``send_all`` may have
        sent part of it (as with any trio stream: treat the stream as broken).

    Resource handling:
        The stream owns the socket: :meth:`aclose` (or leaving ``async
        with``) closes it, and first tells trio
        (:func:`trio.lowlevel.notify_closing`), so a task blocked in
        ``receive_some``, ``send_all`` or ``wait_send_all_might_not_block``
        wakes with :exc:`trio.ClosedResourceError`. Closing is idempotent.
        The trio socket from :attr:`socket` is the same socket: closing
        either closes both.
    """

    # No ConflictDetector objects: three flags in slots are all the state a
    # connection needs beyond its socket and, once asked for, the trio
    # socket object for it.
    __slots__ = ("_eof", "_receiving", "_sending", "_sock", "_tsock")

    def __init__(self, sock: _stdlib_socket.socket) -> None:
        if type(sock) is not _stdlib_socket.socket:
            raise TypeError(f"SocketStream needs a stdlib socket.socket, not {sock!r}")
        if sock.type != _stdlib_socket.SOCK_STREAM:
            raise ValueError(f"SocketStream needs a SOCK_STREAM socket, not {sock!r}")
        if sock.family in TCP_FAMILIES:
            # As trio: Nagle off (a stream's writes are already whole
            # messages), and the not-sent low-water mark explained at
            # NOTSENT_LOWAT. Best effort, like trio: an OSError is ignored.
            # (trio tries on any socket; a Unix socket refuses both, and
            # checking the family spares it two failing system calls.)
            for level, option, value in STREAM_TCP_OPTIONS:
                with suppress(OSError):
                    sock.setsockopt(level, option, value)
        self._attach(sock)

    def _attach(self, sock: _stdlib_socket.socket) -> None:
        """Take ``sock`` as this stream's socket, in the state a stream starts in.

        The one place that sets a new stream's fields, for the constructor
        and for :func:`adopt`. Non-blocking unless it already is:
        ``getblocking()`` reads Python's own flag, no system call, and the
        PROXY reader leaves its sockets non-blocking.
        """
        if sock.getblocking():
            sock.setblocking(False)
        self._sock = sock
        self._tsock: trio.socket.SocketType | None = None
        self._sending = self._receiving = self._eof = False

    def __repr__(self) -> str:
        return f"<trio_evlisten.SocketStream over {self._sock!r}>"

    # ---- the socket: options, and the trio object --------------------------

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

    # ---- receiving -------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive what the peer sent, up to ``max_bytes`` bytes.

        Args:
            max_bytes: the most to return; default 64 KiB.

        Returns:
            At least one byte, or ``b""`` at end of stream (the peer sent
            EOF).

        Raises:
            ValueError: ``max_bytes`` is less than 1.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: the stream was closed, before or during
                the call.
            trio.BrokenResourceError: the connection broke (e.g. reset).
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes!r}")
        if self._receiving:
            _refuse_busy_receive()
        self._receiving = True
        try:
            sock = self._sock
            await checkpoint_if_cancelled()
            try:
                data = _recv_now(sock, max_bytes)
            except OSError as exc:
                await cancel_shielded_checkpoint()
                _raise_stream_error(exc)
            if data is not None:
                await cancel_shielded_checkpoint()
                return data
            while True:
                await wait_readable(sock)
                try:
                    data = _recv_now(sock, max_bytes)
                except OSError as exc:
                    _raise_stream_error(exc)
                if data is not None:  # else woken spuriously: wait again
                    return data
        finally:
            self._receiving = False

    # ---- COPY KEPT FOR MEMORY: __anext__ repeats receive_some's body ------
    #
    # ``async for data in stream`` is how most handlers receive, and an idle
    # connection spends its life waiting in here. Calling receive_some()
    # from here (as trio.abc.ReceiveStream does) would keep one more
    # coroutine frame alive per waiting connection. What it costs: the
    # "memory per idle connection" row of ``python -m benchmarks.stream_micro``
    # (its handler uses ``async for``) with a delegating __anext__ swapped
    # in; what guards it: tests/test_stream.py's
    # test_async_for_waits_in_its_own_frame. Change one body, change the
    # other: every receive test there runs through both (``RECEIVERS``).

    async def __anext__(self) -> bytes:
        """The next :meth:`receive_some` (default size); stops at end of stream."""
        if self._receiving:
            _refuse_busy_receive()
        self._receiving = True
        try:
            sock = self._sock
            await checkpoint_if_cancelled()
            try:
                data = _recv_now(sock, DEFAULT_RECEIVE_SIZE)
            except OSError as exc:
                await cancel_shielded_checkpoint()
                _raise_stream_error(exc)
            if data is not None:
                await cancel_shielded_checkpoint()
            else:
                while True:
                    await wait_readable(sock)
                    try:
                        data = _recv_now(sock, DEFAULT_RECEIVE_SIZE)
                    except OSError as exc:
                        _raise_stream_error(exc)
                    if data is not None:  # else woken spuriously: wait again
                        break
            if data:
                return data
            raise StopAsyncIteration
        finally:
            self._receiving = False

    # ---- sending ---------------------------------------------------------

    def _shut_wr_by_trio_socket(self) -> bool:
        # A user may have shut down through ``stream.socket``, as trio's
        # SocketStream allows; it records that on the trio socket.
        tsock = self._tsock
        return tsock is not None and tsock.did_shutdown_SHUT_WR

    def _raise_send_error(self, exc: OSError) -> NoReturn:
        """The trio error for a failed ``send()``: call it in the ``except``."""
        if self._shut_wr_by_trio_socket():
            _refuse_send_after_eof()
        _raise_stream_error(exc)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting while the kernel's buffer is full.

        Args:
            data: the bytes to send; ``b""`` is allowed and sends nothing.

        Raises:
            trio.BusyResourceError: another task is sending (``send_all``,
                ``send_eof`` or ``wait_send_all_might_not_block``).
            trio.ClosedResourceError: the stream was closed, before or during
                the call, or ``send_eof`` was called.
            trio.BrokenResourceError: the connection broke (reset, broken
                pipe).
        """
        if self._sending or self._eof:
            if self._eof:
                _refuse_send_after_eof()
            _refuse_busy_send()
        self._sending = True
        try:
            sock = self._sock
            await checkpoint_if_cancelled()
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                await cancel_shielded_checkpoint()
                self._raise_send_error(exc)
            # len() of bytes and bytearray (what handlers send) counts bytes;
            # another buffer's may count items, so it takes the careful path.
            if sent == len(data) and type(data) in (bytes, bytearray):
                await cancel_shielded_checkpoint()
                return
            await self._send_rest(data, sent)
        finally:
            self._sending = False

    async def _send_rest(self, data: Buffer, sent: int) -> None:
        """The rest of ``send_all`` after a first ``send()`` that sent ``sent``."""
        sock = self._sock
        with memoryview(data) as view, view.cast("B") as octets:
            if sent == octets.nbytes:
                await cancel_shielded_checkpoint()
                return
            while True:
                # A partial send (or none) means the buffer is full: wait.
                await wait_writable(sock)
                try:
                    with octets[sent:] as rest:
                        sent += sock.send(rest)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._raise_send_error(exc)
                if sent == octets.nbytes:
                    return

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the kernel would take more data without blocking.

        Raises:
            trio.BusyResourceError: another task is sending.
            trio.ClosedResourceError: the stream was closed, before or during
                the call.
            trio.BrokenResourceError: the connection broke.
        """
        if self._sending:
            _refuse_busy_send()
        self._sending = True
        try:
            if self._sock.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed")
            try:
                await wait_writable(self._sock)
            except OSError as exc:
                _raise_stream_error(exc)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Shut down the sending half (TCP FIN); idempotent.

        Receiving goes on; :meth:`send_all` afterwards raises
        :exc:`trio.ClosedResourceError`.

        Raises:
            trio.BusyResourceError: another task is sending.
            trio.ClosedResourceError: the stream was closed.
            trio.BrokenResourceError: the connection broke.
        """
        if self._sending:
            _refuse_busy_send()
        self._sending = True
        try:
            await checkpoint()
            # Idempotent (macOS raises ENOTCONN for a second shutdown).
            if self._eof or self._shut_wr_by_trio_socket():
                self._eof = True
                return
            try:
                # Through the trio socket if there is one, so that its
                # did_shutdown_SHUT_WR agrees with us.
                (self._tsock or self._sock).shutdown(_stdlib_socket.SHUT_WR)
            except OSError as exc:
                _raise_stream_error(exc)
            self._eof = True
        finally:
            self._sending = False

    # ---- closing ---------------------------------------------------------

    def _close(self) -> None:
        """Close the socket now, waking any task blocked on it; idempotent.

        The synchronous half of :meth:`aclose` (which is this, then a
        checkpoint). :func:`trio.lowlevel.notify_closing` first, so that
        waiters get :exc:`trio.ClosedResourceError` rather than waiting on a
        dead fd.
        """
        close_socket(self._sock)

    async def aclose(self) -> None:
        """Close the stream (and its socket); idempotent, and a checkpoint.

        The socket is closed even if the call is cancelled.
        """
        self._close()
        await checkpoint()


def adopt(sock: _stdlib_socket.socket) -> SocketStream:
    """A :class:`SocketStream` over a socket just accepted from a listening
    socket that :func:`prepare_listening_socket` prepared.

    The constructor without its checks and options: those hold by
    construction (``accept()`` on a stream socket gives an exact
    ``socket.socket``, and Linux copies the TCP options from the listening
    socket), which spares two system calls per connection.
    """
    stream = SocketStream.__new__(SocketStream)
    stream._attach(sock)
    return stream


def close_socket(sock: _stdlib_socket.socket) -> None:
    """Close ``sock`` now, waking any task blocked on it; idempotent.

    :func:`trio.lowlevel.notify_closing` first, so that waiters get
    :exc:`trio.ClosedResourceError` rather than waiting on a dead fd. The
    one way this package closes a connection's socket: the stream's
    :meth:`~SocketStream.aclose` and the listener's cleanup (which also
    keeps an ``OSError`` from leaving it).
    """
    if sock.fileno() != -1:
        notify_closing(sock)
        sock.close()
