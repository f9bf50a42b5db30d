"""``open_listener`` and ``serve_listener``: open the socket, then serve it.

Thin on purpose: :mod:`._socket` makes the listening socket and
:func:`._listener.run_listener` runs it (its nursery, its tasks, what leaving
the block means); these two functions check the arguments and chain them.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ._checks import check_accept_cb, check_error_cb
from ._fd_budget import warn_if_fd_limit_below
from ._flags import Flag, check_flags
from ._listener import ConnListener, run_listener, wait_closed
from ._options import ListenerOptions, resolve
from ._socket import make_listening_socket

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from typing_extensions import Unpack

    from ._listener import AcceptCallback, ErrorCallback
    from ._socket import Address, SockArg


@asynccontextmanager
async def open_listener(
    cb: AcceptCallback | None = None,
    *args: Any,
    address: Address | None = None,
    sock: SockArg | None = None,
    flags: Flag | int = 0,
    backlog: int = -1,
    error_cb: ErrorCallback | None = None,
    **options: Unpack[ListenerOptions],
) -> AsyncIterator[ConnListener]:
    """Listen for connections while the ``async with`` block runs.

    ``evconnlistener_new_bind`` (with ``address=``) and ``evconnlistener_new``
    (with ``sock=``) in one async context manager. Each accepted connection
    runs ``await cb(listener, conn, addr, *args)`` in a task of its own.

    Args:
        cb: the accept callback, ``async def cb(listener, conn, addr,
            *args)``; ``conn`` is a :class:`trio_evlisten.SocketStream` (a
            :class:`trio.SocketStream` with ``stream=trio.SocketStream``), a
            :class:`trio.SSLStream` over that stream with ``ssl_context=``,
            or, with ``LEAVE_SOCKETS_BLOCKING``, a blocking
            :class:`socket.socket` that the handler owns. ``None`` leaves
            the listener waiting until :meth:`~ConnListener.set_cb`.
        *args: passed to ``cb`` after ``addr``.
        address: where to bind: ``(host, port)``, ``(host, port, flowinfo,
            scope_id)`` (the family follows the host; ``""`` is the IPv4
            wildcard, ``"::"`` the IPv6 one), or a Unix socket path.
        sock: a bound or listening stream socket to wrap instead: a
            :class:`socket.socket`, a :mod:`trio.socket` socket or an int fd.
        flags: a combination of :class:`Flag` values.
        backlog: ``< 0`` picks the OS maximum (capped at 65535); ``0`` means
            ``sock`` is already listening; ``> 0`` is passed to ``listen()``.
        error_cb: set as if by :meth:`~ConnListener.set_error_cb` before the
            first ``accept()``.
        **options: the options beyond libevent's, each described in
            :class:`ListenerOptions` (``max_connections=``,
            ``drain_timeout=``, ``ssl_context=``, ``proxy_protocol=``, ...).
            With ``protocol=factory`` (protocol mode) give no ``cb``: each
            connection is served by ``factory()``, an :class:`asyncio.Protocol`.

    Yields:
        The running :class:`ConnListener`.

    Raises:
        TypeError: neither or both of ``address`` and ``sock``; an argument
            of the wrong type; a ``cb`` that is not an async function, or an
            ``error_cb`` that is one, or either unable to take the arguments
            it is called with (``*args`` for ``cb``; a plain function that
            returns a coroutine counts as not async).
        ValueError: an argument with a bad value (each message names it).
        OSError: ``bind()``/``listen()`` failed (``EADDRINUSE``, ...).
        ExceptionGroup: what the listener's nursery raised: a fatal accept
            error with no error callback, an error callback that raised, or a
            handler's exception with ``handler_errors="raise"`` (with any
            exception from the block beside them). An exception raised by the
            block alone comes out unwrapped, as it went in.

    Error handling:
        ``accept()`` errors are sorted by errno: transient ones are retried at
        once; out-of-resources ones (``EMFILE``, ``ENFILE``, ``ENOBUFS``,
        ``ENOMEM``) call ``error_cb`` (or, without one, log: the first error of
        a burst at once, then one summary line per 10 s) and pause accepting 10
        ms, doubling to 1 s (after ``EMFILE``/``ENFILE`` a handler that finishes
        ends the pause early); anything else calls ``error_cb`` and pauses
        likewise, or with no ``error_cb`` ends the listener by raising the
        :exc:`OSError` into its nursery. A handler's exception is logged on the
        ``trio_evlisten`` logger (``trio.BrokenResourceError`` at DEBUG, others
        at ERROR) unless ``handler_errors="raise"``.

    Resource handling:
        On leaving the block the listener is drained, as by
        :meth:`~ConnListener.drain` with ``drain_timeout`` as its grace:
        ``listener.draining`` is set, the connections the kernel had already
        queued are accepted and served, then the listener is closed (nothing
        more is accepted) and the block waits for the running handlers (up to
        ``drain_timeout``, then cancels the rest). With
        ``handler_nursery=`` it only closes: the handlers are the nursery's. The
        listening socket is closed only with ``CLOSE_ON_FREE``; a Unix socket
        path this function bound is then unlinked too. Without it, a socket
        this function bound is the caller's: take it in the block
        (``listener.socket`` or ``listener.fd``) to close it later, else
        leaving the block warns (:exc:`ResourceWarning`) that it still
        listens with nobody to accept. A socket passed as
        ``sock=`` is never closed on an error before the block starts. Each
        stream handed to a handler is closed when the handler returns. If the
        block raises, handlers are cancelled at once (Trio's nursery rule).
    """
    flags = check_flags(flags)
    check_accept_cb(cb, args)
    check_error_cb(error_cb)
    resolved = resolve(options, flags)
    if resolved["protocol"] is not None and (cb is not None or args):
        raise TypeError(
            f"open_listener() got both an accept callback ({cb!r}, args "
            f"{args!r}) and protocol=: give one of them (a protocol factory "
            f"takes no arguments: bind them with functools.partial)"
        )
    # Pending connections hold fds only where a preamble makes them pend.
    preamble = resolved["proxy_protocol"] or resolved["ssl_context"] is not None
    warn_if_fd_limit_below(
        resolved["max_connections"], resolved["max_pending"] if preamble else None
    )
    keepalive = resolved["keepalive"]
    if "keepalive" not in options and (sock is not None or _is_path(address)):
        # The default is for the TCP sockets open_listener binds (libevent's
        # rule); a wrapped socket keeps what its owner (systemd) set.
        keepalive = None
    lsock = await make_listening_socket(
        address=address,
        sock=sock,
        flags=flags,
        backlog=backlog,
        keepalive=keepalive,
        unix_mode=resolved["unix_mode"],
    )
    async with run_listener(lsock, flags, cb, args, error_cb, resolved) as listener:
        yield listener


def _is_path(address: object) -> bool:
    return isinstance(address, (str, os.PathLike))


async def serve_listener(
    cb: AcceptCallback | None = None,
    *args: Any,
    address: Address | None = None,
    sock: SockArg | None = None,
    flags: Flag | int = 0,
    backlog: int = -1,
    error_cb: ErrorCallback | None = None,
    task_status: trio.TaskStatus[ConnListener] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[ListenerOptions],
) -> None:
    """Run a listener as a task: for ``await nursery.start(...)``.

    Takes the arguments of :func:`open_listener` (bind them with
    :func:`functools.partial`). ``nursery.start`` returns the
    :class:`ConnListener` once it is accepting; the task then runs until it
    is cancelled, or until the listener is closed and its handlers have
    finished.

    Error handling:
        As :func:`open_listener`: what it would raise out of the block is
        raised out of this task.

    Resource handling:
        As :func:`open_listener`: on cancellation the listener is closed and
        its handlers are cancelled; the socket is closed with
        ``CLOSE_ON_FREE``.
    """
    async with open_listener(
        cb,
        *args,
        address=address,
        sock=sock,
        flags=flags,
        backlog=backlog,
        error_cb=error_cb,
        **options,
    ) as listener:
        task_status.started(listener)
        await wait_closed(listener)
