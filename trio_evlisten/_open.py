"""``open_listener`` and ``serve_listener``: open the socket, then serve it.

Thin on purpose: :mod:`._socket` makes the listening socket and
:class:`ConnListener` runs it; these two functions only chain them inside a
nursery and decide what leaving the block means.
"""

from __future__ import annotations

import ssl
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ._flags import Flag, check_flags
from ._listener import ConnListener, _check_cb
from ._options import (
    TLS_HANDSHAKE_TIMEOUT,
    HandlerErrors,
    Options,
    warn_if_fd_limit_below,
)
from ._proxy_gate import PROXY_TIMEOUT
from ._socket import make_listening_socket

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from ._listener import AcceptCallback, ErrorCallback
    from ._proxy_gate import Network
    from ._socket import Address, SockArg


@asynccontextmanager
async def open_listener(
    cb: AcceptCallback | None,
    *args: Any,
    address: Address | None = None,
    sock: SockArg | None = None,
    flags: Flag | int = 0,
    backlog: int = -1,
    error_cb: ErrorCallback | None = None,
    max_connections: int | None = None,
    drain_timeout: float | None = None,
    handler_nursery: trio.Nursery | None = None,
    handler_errors: HandlerErrors = "log",
    ssl_context: ssl.SSLContext | None = None,
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    proxy_protocol: bool = False,
    proxy_trusted: Iterable[str | Network] | None = None,
    proxy_timeout: float = PROXY_TIMEOUT,
) -> AsyncIterator[ConnListener]:
    """Listen for connections while the ``async with`` block runs.

    ``evconnlistener_new_bind`` (with ``address=``) and ``evconnlistener_new``
    (with ``sock=``) in one async context manager. Each accepted connection
    runs ``await cb(listener, conn, addr, *args)`` in a task of its own.

    Args:
        cb: the accept callback, ``async def cb(listener, conn, addr,
            *args)``; ``conn`` is a :class:`trio.SocketStream` (or, with
            ``LEAVE_SOCKETS_BLOCKING``, a blocking :class:`socket.socket`).
            ``None`` leaves the listener waiting until :meth:`~ConnListener.set_cb`.
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
        max_connections: at this many running handlers, stop accepting until
            one finishes (connections wait in the kernel's backlog); change
            it later with :meth:`~ConnListener.set_max_connections`. A
            :class:`ResourceLimitWarning` says when ``RLIMIT_NOFILE`` is
            below it plus a reserve of 64.
        drain_timeout: on leaving the block, drain as
            :meth:`~ConnListener.drain` does: set ``listener.draining``, wait
            this many seconds for running handlers, then cancel them
            (``None``: wait for all).
        handler_nursery: run handlers in this nursery instead of the
            listener's own; they then outlive the block.
        handler_errors: ``"log"`` (default) logs an exception escaping a
            handler and goes on; ``"raise"`` lets it propagate, which ends
            the listener and everything in its nursery.
        ssl_context: serve TLS: each handler gets a :class:`trio.SSLStream`
            whose handshake has already completed, run in the handler's own
            task. A failed or slow handshake drops the connection (logged at
            DEBUG, counted in ``statistics().tls_failures``); the handler is
            not called.
        tls_handshake_timeout: seconds the handshake may take.
        proxy_protocol: every connection starts with a PROXY protocol v1 or
            v2 header (HAProxy's, as HAProxy and nginx send it), read in the
            handler's task before any TLS handshake; ``addr`` is then the
            original client's (the real peer's for ``LOCAL``/``UNKNOWN``).
            Exactly the header's bytes are consumed. A peer outside
            ``proxy_trusted``, or a bad, truncated or slow header, drops the
            connection without calling the handler (counted in
            ``statistics().proxy_rejected``; at most one WARNING per 10 s).
        proxy_trusted: the networks (``"10.0.0.0/8"``, ``"::1"``,
            :mod:`ipaddress` networks) that may send a header; ``None``
            means loopback only (``127.0.0.0/8``, ``::1``). Unix-socket
            peers are always trusted.
        proxy_timeout: seconds the header may take to arrive.

    Yields:
        The running :class:`ConnListener`.

    Raises:
        TypeError: neither or both of ``address`` and ``sock``; an argument
            of the wrong type.
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
        On leaving the block the listener is closed (so nothing more is
        accepted), then drained: ``listener.draining`` is set and the block
        waits for running handlers (up to ``drain_timeout``). With
        ``handler_nursery=`` it only closes: the handlers are the nursery's. The
        listening socket is closed only with ``CLOSE_ON_FREE``; a Unix socket
        path this function bound is then unlinked too. A socket passed as
        ``sock=`` is never closed on an error before the block starts. Each trio
        stream handed to a handler is closed when the handler returns. If the
        block raises, handlers are cancelled at once (Trio's nursery rule).
    """
    flags = check_flags(flags)
    _check_cb(cb, "cb")
    _check_cb(error_cb, "error_cb")
    options = Options(
        max_connections=max_connections,
        drain_timeout=drain_timeout,
        handler_nursery=handler_nursery,
        handler_errors=handler_errors,
        ssl_context=ssl_context,
        tls_handshake_timeout=tls_handshake_timeout,
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        proxy_timeout=proxy_timeout,
    )
    options.check(flags)
    # Points at the caller's ``async with`` (through __aenter__).
    warn_if_fd_limit_below(max_connections, stacklevel=3)
    lsock = await make_listening_socket(
        address=address, sock=sock, flags=flags, backlog=backlog
    )
    try:
        listener = ConnListener(lsock, flags, cb, args, error_cb, (), options)
    except BaseException:
        lsock.release(close=bool(flags & Flag.CLOSE_ON_FREE))
        raise
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            if handler_nursery is None:
                listener._nursery = nursery
                # Handlers get a nursery of their own, for drain() to cancel.
                await nursery.start(listener._handlers.host)
            else:
                listener._nursery = handler_nursery
                listener._handlers.use_nursery(handler_nursery)
            await nursery.start(listener._acceptor.run)
            try:
                yield listener
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                listener.close()
            if handler_nursery is None:
                # A normal exit drains: handlers see listener.draining, get
                # drain_timeout to finish, then are cancelled.
                await listener.drain(drain_timeout)
    except BaseExceptionGroup as group:
        # Handlers' errors come from the handler nursery's host task, one
        # group deeper: lift them to this level, as if handlers were direct
        # children of this nursery.
        spliced = _splice(group, listener._handlers.group)
        # The nursery is ours, not the caller's: an exception from the body
        # alone (KeyboardInterrupt, the caller's own error) comes out as it
        # went in. Errors of the listener itself stay in their group.
        if body_error is None or not _is_only(spliced, body_error):
            if spliced is group:
                raise
            spliced.__suppress_context__ = True
            raise spliced.with_traceback(group.__traceback__) from group.__cause__
    else:
        return
    raise body_error


def _splice(
    group: BaseExceptionGroup[BaseException], inner: BaseException | None
) -> BaseExceptionGroup[BaseException]:
    """``group`` with the group ``inner`` (one of its members) opened in place.

    Trio may hand on a copy of ``inner`` (derived when it strips
    ``Cancelled``), so the member is found by its exceptions' identity.
    """
    if not isinstance(inner, BaseExceptionGroup):
        return group
    ours = {id(exc) for exc in inner.exceptions}

    def is_inner(exc: BaseException) -> bool:
        return isinstance(exc, BaseExceptionGroup) and all(
            id(e) in ours for e in exc.exceptions
        )

    if not any(is_inner(exc) for exc in group.exceptions):
        return group
    members: list[BaseException] = []
    for exc in group.exceptions:
        if is_inner(exc):
            assert isinstance(exc, BaseExceptionGroup)
            members.extend(exc.exceptions)
        else:
            members.append(exc)
    return group.derive(members)


def _is_only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether ``exc`` is the only leaf of the (possibly nested) ``group``."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner is exc


async def serve_listener(
    cb: AcceptCallback | None,
    *args: Any,
    address: Address | None = None,
    sock: SockArg | None = None,
    flags: Flag | int = 0,
    backlog: int = -1,
    error_cb: ErrorCallback | None = None,
    max_connections: int | None = None,
    drain_timeout: float | None = None,
    handler_nursery: trio.Nursery | None = None,
    handler_errors: HandlerErrors = "log",
    ssl_context: ssl.SSLContext | None = None,
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    proxy_protocol: bool = False,
    proxy_trusted: Iterable[str | Network] | None = None,
    proxy_timeout: float = PROXY_TIMEOUT,
    task_status: trio.TaskStatus[ConnListener] = trio.TASK_STATUS_IGNORED,
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
        max_connections=max_connections,
        drain_timeout=drain_timeout,
        handler_nursery=handler_nursery,
        handler_errors=handler_errors,
        ssl_context=ssl_context,
        tls_handshake_timeout=tls_handshake_timeout,
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        proxy_timeout=proxy_timeout,
    ) as listener:
        task_status.started(listener)
        await listener._closed_event.wait()
