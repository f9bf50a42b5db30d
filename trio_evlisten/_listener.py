"""The listener: one object owns the gate, the accept loop and the handlers.

State rules, all kept by :class:`ConnListener` and nowhere else:

* ``closed`` is terminal; :meth:`~ConnListener.close` reaches it from any
  state, from any task, callback, or (with ``THREADSAFE``) thread.
* The gate is open, and ``accept()`` may be called, exactly when the
  listener is not closed, is enabled, has a callback, runs fewer handlers
  than ``max_connections``, and is not pausing after an error.
* Capacity is one gate: ``max_connections`` and running out of file
  descriptors (``EMFILE``/``ENFILE``) both wait for a handler to finish. A
  handler that ends wakes the accept task when either held the gate shut;
  after ``EMFILE``/``ENFILE`` the backoff timer is only the upper bound.
* ``drain()`` closes, sets ``draining``, waits, then cancels the handlers
  still running: by default they run in a nursery of their own (opened by a
  host task, so the ``async with`` body is not in it), whose scope drain
  cancels, at no cost per connection; in a caller's ``handler_nursery`` each
  handler runs in a cancel scope of its own (about 0.8 KiB and 10 us a
  connection, paid only there), and only those are cancelled.
* Every change that can open the gate or close the listener wakes the accept
  task, which re-reads the state; a change that shuts the gate needs no wake:
  the gate is re-checked under the lock before every single ``accept()``.
* With ``THREADSAFE`` the state, and each check-then-``accept()``, is guarded
  by one lock, so a ``disable()`` or ``close()`` that returned in any thread
  is obeyed by the very next ``accept()``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import sys
import threading
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._errors import FD_ERRNOS, Backoff, ErrorClass, ErrorLog, classify
from ._flags import Flag
from ._options import (
    Options,
    check_max_connections,
    check_seconds,
    warn_if_fd_limit_below,
)
from ._proxy_gate import REJECTED, ProxyGate
from ._socket import accept_queue
from ._stats import DrainResult, ListenerStatistics

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from socket import socket as StdSocket

    from ._socket import ListeningSocket

    AcceptCallback = Callable[..., Awaitable[object]]
    ErrorCallback = Callable[..., object]

logger: Final = logging.getLogger("trio_evlisten")

#: How many connections one wake-up of the accept task takes at most before
#: it goes back to the scheduler, so a flood of connects cannot starve the
#: handlers that serve them.
ACCEPT_BATCH: Final = 64

#: How long the listener waits to send TLS's close_notify after a handler
#: returns before it closes the connection anyway.
TLS_CLOSE_TIMEOUT: Final = 1.0


def _check_cb(cb: object, what: str, *, optional: bool = True) -> None:
    if cb is None and optional:
        return
    if not callable(cb):
        raise TypeError(f"{what} must be callable or None, not {cb!r}")


@final
@attrs.define(eq=False)
class ConnListener:
    """A running connection listener, as :func:`open_listener` yields it.

    Don't construct it directly; get it from :func:`open_listener` or
    :func:`serve_listener`.

    Methods that don't block (:meth:`enable`, :meth:`disable`,
    :meth:`set_cb`, :meth:`set_error_cb`, :meth:`set_max_connections`,
    :meth:`close`) are plain methods
    and take effect before the next ``accept()``. Without
    :attr:`Flag.THREADSAFE` they must be called from the listener's own
    thread (its Trio thread); with it, from any thread.
    """

    _lsock: ListeningSocket
    _flags: Flag
    _cb: AcceptCallback | None
    _args: tuple[Any, ...]
    _error_cb: ErrorCallback | None
    _error_args: tuple[Any, ...]
    _options: Options

    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    # Where handlers are started: our handler nursery, or the caller's.
    _spawn_into: trio.Nursery | None = attrs.field(default=None, init=False)
    # Our handler nursery's scope (None with handler_nursery=).
    _handlers_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    # The group our handler nursery raised, for open_listener to splice.
    _handlers_group: BaseException | None = attrs.field(default=None, init=False)
    # With handler_nursery=: a cancel scope per handler, so drain() can
    # cancel ours without touching the caller's other tasks.
    _scoped: bool = attrs.field(default=False, init=False)
    _enabled: bool = attrs.field(init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _closed_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _lock: contextlib.AbstractContextManager[object] = attrs.field(init=False)
    _thread: int = attrs.field(factory=threading.get_ident, init=False)
    _token: trio.lowlevel.TrioToken = attrs.field(
        factory=trio.lowlevel.current_trio_token, init=False
    )
    _waiter: trio.CancelScope | None = attrs.field(default=None, init=False)
    _backoff: Backoff = attrs.field(factory=Backoff, init=False)
    _resume_at: float = attrs.field(default=-math.inf, init=False)
    _sockname: Any = attrs.field(init=False)

    _accepted: int = attrs.field(default=0, init=False)
    _active: int = attrs.field(default=0, init=False)
    _errors: int = attrs.field(default=0, init=False)
    _retried: int = attrs.field(default=0, init=False)
    _handler_error_count: int = attrs.field(default=0, init=False)
    _tls_failures: int = attrs.field(default=0, init=False)
    _proxy: ProxyGate | None = attrs.field(default=None, init=False)
    _task_name: str = attrs.field(init=False)
    _max_connections: int | None = attrs.field(init=False)
    _error_log: ErrorLog = attrs.field(init=False)
    # Paused by EMFILE/ENFILE: a handler that finishes ends the pause.
    _fd_wait: bool = attrs.field(default=False, init=False)
    _draining: trio.Event = attrs.field(factory=trio.Event, init=False)
    # The cancel scope of each running handler task, for drain() to cancel.
    _scopes: set[trio.CancelScope] = attrs.field(factory=set, init=False)
    _cancel_handlers: bool = attrs.field(default=False, init=False)
    _idle: trio.Event | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._enabled = not self._flags & Flag.DISABLED
        self._lock = (
            threading.RLock()
            if self._flags & Flag.THREADSAFE
            else contextlib.nullcontext()
        )
        self._sockname = self._lsock.std.getsockname()
        if self._options.proxy_protocol:
            self._proxy = ProxyGate(
                self._options.proxy_trusted, self._options.proxy_timeout, self._sockname
            )
        self._task_name = _task_name(self._cb)
        self._max_connections = self._options.max_connections
        self._error_log = ErrorLog(logger, self._sockname)

    # ------------------------------------------------------------------
    # Public, non-blocking API

    @property
    def fd(self) -> int:
        """The listening socket's file descriptor (``evconnlistener_get_fd``).

        ``-1`` once the socket is closed.
        """
        return self._lsock.std.fileno()

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket, as a :mod:`trio.socket` object."""
        return self._lsock.trio

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery the handlers run in (``evconnlistener_get_base``).

        Cancel its scope to stop the listener and every handler, as the echo
        example's ``event_base_loopexit`` does.
        """
        assert self._nursery is not None
        return self._nursery

    @property
    def sockname(self) -> Any:
        """The address the socket is bound to, as ``getsockname()`` gave it.

        With port 0 this shows the port the OS picked. Still readable after
        :meth:`close`.
        """
        return self._sockname

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when you asked for port 0).

        Raises:
            AttributeError: the listener is on a Unix socket, which has no
                port; use :attr:`sockname`.
        """
        if not isinstance(self._sockname, tuple):
            raise AttributeError(
                f"a Unix socket listener ({self._sockname!r}) has no port; "
                "use listener.sockname"
            )
        port: int = self._sockname[1]
        return port

    @property
    def flags(self) -> Flag:
        """The flags the listener was opened with."""
        return self._flags

    @property
    def enabled(self) -> bool:
        """Whether the listener is enabled (see :meth:`enable`).

        Accepting also needs a callback: with ``cb=None`` an enabled
        listener still waits.
        """
        return self._enabled

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called, or the listener ended."""
        return self._closed

    def statistics(self) -> ListenerStatistics:
        """A frozen snapshot of the listener's counters and state.

        ``queue_depth``/``queue_limit`` are read from the kernel at the call
        (one ``getsockopt``), the rest from the listener's counters.
        """
        queue = None if self._closed else accept_queue(self._lsock.std)
        with self._lock:
            return ListenerStatistics(
                accepted=self._accepted,
                active=self._active,
                errors=self._errors,
                retried=self._retried,
                paused_by_errors=self._resume_at > _now(),
                backoff=self._backoff.current,
                handler_errors=self._handler_error_count,
                tls_failures=self._tls_failures,
                proxy_rejected=0 if self._proxy is None else self._proxy.rejected,
                enabled=self._enabled,
                closed=self._closed,
                max_connections=self._max_connections,
                queue_depth=None if queue is None else queue[0],
                queue_limit=None if queue is None else queue[1],
                backlog=self._lsock.backlog if queue is None else queue[1],
            )

    def enable(self) -> None:
        """Start (or resume) accepting connections (``evconnlistener_enable``).

        Idempotent.

        Raises:
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        self._check_thread("enable")
        with self._lock:
            self._check_open("enable")
            self._enabled = True
        self._wake_threadsafe()

    def disable(self) -> None:
        """Stop accepting until :meth:`enable` (``evconnlistener_disable``).

        Idempotent. Connections that arrive meanwhile wait in the kernel's
        backlog. Handlers already running go on.

        Raises:
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        self._check_thread("disable")
        with self._lock:
            self._check_open("disable")
            self._enabled = False
        # No wake: the gate is checked before every accept(), and a task
        # parked in wait_readable will find it shut when it wakes.

    def set_cb(self, cb: AcceptCallback | None, *args: Any) -> None:
        """Replace the accept callback and its arguments (``evconnlistener_set_cb``).

        Connections accepted from now on go to ``cb(listener, conn, addr,
        *args)``; handlers already running keep the callback they started
        with. ``cb=None`` stops accepting until a callback is set again.

        Raises:
            TypeError: ``cb`` is neither callable nor ``None``.
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        _check_cb(cb, "cb")
        self._check_thread("set_cb")
        with self._lock:
            self._check_open("set_cb")
            self._cb, self._args = cb, args
            self._task_name = _task_name(cb)
        if cb is not None:
            self._wake_threadsafe()

    def set_error_cb(self, error_cb: ErrorCallback | None, *args: Any) -> None:
        """Set the callback for ``accept()`` errors (``evconnlistener_set_error_cb``).

        It is called as ``error_cb(listener, error, *args)`` in the accept
        task, synchronously, with the :exc:`OSError`; it may call
        :meth:`disable`, :meth:`enable`, :meth:`close` or cancel
        ``listener.nursery.cancel_scope``. ``None`` removes it: errors are
        then logged, or, for fatal ones, raised into the nursery.

        Raises:
            TypeError: ``error_cb`` is neither callable nor ``None``.
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        _check_cb(error_cb, "error_cb")
        self._check_thread("set_error_cb")
        with self._lock:
            self._check_open("set_error_cb")
            self._error_cb, self._error_args = error_cb, args

    def set_max_connections(self, max_connections: int | None) -> None:
        """Change the cap on running handlers of a running listener.

        ``None`` removes the cap. Raising it (or removing it) wakes the
        accept task, so connections waiting in the backlog are taken at
        once; lowering it below the handlers running now cancels none of
        them: accepting resumes when enough have finished. Warns
        (:class:`ResourceLimitWarning`) if ``RLIMIT_NOFILE`` cannot cover
        the new cap.

        Raises:
            TypeError: ``max_connections`` is neither ``None`` nor an int.
            ValueError: ``max_connections`` is below 1.
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        check_max_connections(max_connections)
        self._check_thread("set_max_connections")
        with self._lock:
            self._check_open("set_max_connections")
            self._max_connections = max_connections
        warn_if_fd_limit_below(max_connections, stacklevel=2)
        self._wake_threadsafe()

    @property
    def draining(self) -> bool:
        """Whether a drain has begun, so handlers should finish up.

        Set by :meth:`drain`, and by leaving :func:`open_listener`'s block
        (without ``handler_nursery=``). Handlers poll it between requests or
        wait for it with :meth:`wait_draining`.
        """
        return self._draining.is_set()

    async def wait_draining(self) -> None:
        """Wait until a drain begins (returns at once if one has).

        For a handler that idles (a keep-alive connection, a subscription):
        race it against the next request and finish up when it returns.
        """
        await self._draining.wait()

    async def drain(self, grace: float | None = None) -> DrainResult:
        """Stop accepting, ask handlers to finish, wait, then cancel the rest.

        In order: :meth:`close` (nothing more is accepted), set
        :attr:`draining` (waking :meth:`wait_draining`), wait up to
        ``grace`` seconds (``None``: as long as it takes) for the running
        handlers to return, cancel those still running, and wait for them
        to unwind.

        Only the handler tasks this listener started are cancelled: with
        ``handler_nursery=`` the nursery and its other tasks are untouched.
        A handler cancelled this way is not a handler error (not counted,
        not logged above DEBUG, not raised with ``handler_errors="raise"``).

        Don't await it from one of the listener's own handlers: it would
        wait for that handler too, and cancel it at the end of ``grace``.

        Args:
            grace: seconds to wait before cancelling, ``>= 0``, or ``None``.

        Returns:
            A :class:`DrainResult`: how many handlers finished by themselves
            and how many were cancelled.

        Raises:
            TypeError: ``grace`` is not a number of seconds or ``None``.
            ValueError: ``grace`` is negative or NaN.
            RuntimeError: called from another thread (it is async: use
                :func:`trio.from_thread.run`).
        """
        check_seconds("grace", grace, optional=True)
        self._check_thread("drain")
        self.close()
        self._draining.set()
        with self._lock:
            running = self._active
        if grace is None:
            await self._wait_idle()
        else:
            with trio.move_on_after(grace):
                await self._wait_idle()
        with self._lock:
            cancelled = self._active
        if cancelled:
            self._cancel_handlers = True
            if self._handlers_scope is not None:
                self._handlers_scope.cancel()
            for scope in self._scopes:
                scope.cancel()
            await self._wait_idle()
        else:
            await trio.lowlevel.checkpoint()
        return DrainResult(finished=max(running - cancelled, 0), cancelled=cancelled)

    async def _wait_idle(self) -> None:
        while self._active:
            # Shared by concurrent drains: replace it only once it fired.
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    def close(self) -> None:
        """Stop accepting, for good (``evconnlistener_free``).

        Idempotent, and callable from anywhere, callbacks included: once it
        returns, no further connection is accepted. Handlers already running
        go on. With :attr:`Flag.CLOSE_ON_FREE` the listening socket is closed
        (and a Unix socket's path unlinked); without it the socket stays open
        for the caller.

        Resource handling:
            From another thread (with :attr:`Flag.THREADSAFE`) the listener
            is closed at once, and the socket itself is released by the
            listener's Trio thread moments later, since only that thread may
            close an fd Trio is waiting on.

        Raises:
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        on_trio_thread = self._check_thread("close")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if on_trio_thread:
            self._release()
        else:
            self._run_on_trio_thread(self._release)

    async def aclose(self) -> None:
        """:meth:`close`, as an async method (it checkpoints)."""
        self.close()
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------
    # Private: threads

    def _check_thread(self, method: str) -> bool:
        """Return whether we are on the listener's thread, or raise."""
        if threading.get_ident() == self._thread:
            return True
        if self._flags & Flag.THREADSAFE:
            return False
        raise RuntimeError(
            f"ConnListener.{method}() was called from a thread other than the "
            "listener's; open the listener with Flag.THREADSAFE to allow that"
        )

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise trio.ClosedResourceError(
                f"ConnListener.{method}() called on a closed listener"
            )

    def _run_on_trio_thread(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn)

    def _wake_threadsafe(self) -> None:
        if threading.get_ident() == self._thread:
            self._wake()
        else:
            self._run_on_trio_thread(self._wake)

    # ------------------------------------------------------------------
    # Private: the accept task (all of this runs on the Trio thread)

    async def _host_handlers(
        self, *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the nursery the handlers run in, until closed and idle.

        A task of its own, so that the nursery's scope covers the handlers
        and nothing else: drain() can cancel them while the ``async with``
        body (which may be the one awaiting drain) runs on.
        """
        try:
            async with trio.open_nursery() as handlers:
                self._handlers_scope = handlers.cancel_scope
                task_status.started(handlers)
                await self._closed_event.wait()
        except BaseExceptionGroup as group:
            self._handlers_group = group
            raise

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()

    def _release(self) -> None:
        self._wake()
        self._lsock.release(close=bool(self._flags & Flag.CLOSE_ON_FREE))
        self._closed_event.set()

    def _gate_open(self) -> bool:
        return (
            not self._closed
            and self._enabled
            and self._cb is not None
            and (self._max_connections is None or self._active < self._max_connections)
        )

    async def _park(self, deadline: float, *, readable: bool = False) -> bool:
        """Wait until woken, ``deadline``, or (if asked) the socket is readable.

        Returns whether the socket became readable.
        """
        with trio.CancelScope(deadline=deadline) as scope:
            self._waiter = scope
            try:
                if readable:
                    await trio.lowlevel.wait_readable(self._lsock.std)
                    return True
                await trio.sleep_forever()
            except trio.ClosedResourceError:
                # The socket was closed under us (by close(), or by someone
                # closing listener.socket); the loop finds out which.
                return False
            finally:
                self._waiter = None
        return False

    async def _accept_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    gate_open = self._gate_open()
                now = trio.current_time()
                # A grouped error line falls due: log it (no-op otherwise).
                self._error_log.flush(now)
                log_due = self._error_log.due
                if not gate_open:
                    await self._park(log_due)
                elif self._resume_at > now:
                    await self._park(min(self._resume_at, log_due))
                elif self._lsock.closed_underfoot():
                    self._on_accept_error(
                        OSError(
                            errno.EBADF,
                            "the listening socket was closed under the listener",
                        )
                    )
                else:
                    try:
                        readable = await self._park(log_due, readable=True)
                    except OSError as exc:
                        # epoll refused the fd (EBADF: closed behind trio's
                        # back): an accept error like any other.
                        self._on_accept_error(exc)
                    else:
                        if readable:
                            self._accept_batch()
        finally:
            # However the accept task ends (closed, an error, cancelled), the
            # listener is closed with it, and errors not yet reported are.
            self.close()
            self._error_log.flush(trio.current_time(), final=True)

    def _accept_batch(self) -> None:
        std = self._lsock.std
        for _ in range(ACCEPT_BATCH):
            with self._lock:
                if not self._gate_open():
                    return
                try:
                    conn, addr = std.accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    error: OSError | None = exc
                else:
                    error = None
                    self._accepted += 1
                    self._active += 1
                    cb, args = self._cb, self._args
            if error is not None:
                if self._on_accept_error(error):
                    continue
                return
            self._backoff.reset()
            self._resume_at = -math.inf
            self._fd_wait = False
            assert cb is not None
            self._spawn(conn, addr, cb, args)

    def _on_accept_error(self, exc: OSError) -> bool:
        """Deal with one failed ``accept()``; return whether to go on at once."""
        kind = classify(exc)
        if kind is ErrorClass.RETRY:
            self._retried += 1
            return True
        self._errors += 1
        delay = self._backoff.next_delay()
        now = trio.current_time()
        self._resume_at = now + delay
        # Out of fds: a handler that finishes frees one, and ends the pause.
        self._fd_wait = exc.errno in FD_ERRNOS
        error_cb, error_args = self._error_cb, self._error_args
        if error_cb is not None:
            error_cb(self, exc, *error_args)
        elif kind is ErrorClass.RESOURCES:
            self._error_log.error(exc, delay, now)
        else:
            raise exc
        return False

    def _spawn(
        self,
        conn: StdSocket,
        addr: Any,
        cb: AcceptCallback,
        args: tuple[Any, ...],
    ) -> None:
        try:
            # A fixed name: trio would otherwise format one per task, which
            # costs a string allocation per connection (~280 B held while
            # the connection lives) and CPU on the accept path.
            assert self._spawn_into is not None
            self._spawn_into.start_soon(
                self._run_handler, conn, addr, cb, args, name=self._task_name
            )
        except BaseException:
            # Typically "Nursery is closed to new arrivals": the handler
            # nursery the user gave us has finished. The connection must not
            # leak; the listener cannot go on without a place for handlers.
            conn.close()
            self._active -= 1
            raise

    async def _tls_handshake(
        self, stream: trio.SocketStream, addr: Any
    ) -> trio.SSLStream[trio.SocketStream] | None:
        """Run the server side of the handshake; None if it failed or timed out."""
        assert self._options.ssl_context is not None
        tls = trio.SSLStream(stream, self._options.ssl_context, server_side=True)
        with trio.move_on_after(self._options.tls_handshake_timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError:
                # A client that does not speak TLS, or rejects our certificate:
                # its problem, not the server's; DEBUG keeps busy logs clean.
                logger.debug("TLS handshake with %r failed", addr, exc_info=True)
            else:
                return tls
        with self._lock:
            self._tls_failures += 1
        return None

    async def _run_handler(
        self,
        conn: StdSocket | None,
        addr: Any,
        cb: AcceptCallback,
        args: tuple[Any, ...],
    ) -> None:
        trio_sock: trio.socket.SocketType | None = None
        scope: contextlib.AbstractContextManager[object] = _NO_SCOPE
        if self._scoped:
            # In a caller's handler_nursery: a cancel scope of our own, so
            # drain() cancels our handlers and none of the caller's tasks.
            scope = own = trio.CancelScope()
            if self._cancel_handlers:
                own.cancel()
            self._scopes.add(own)
        try:
            with scope:
                if self._flags & Flag.LEAVE_SOCKETS_BLOCKING:
                    assert conn is not None
                    if self._proxy is not None:
                        # Read while the socket is still non-blocking, in this
                        # task (never the accept loop's), before anything else.
                        addr = await self._proxy.read(
                            trio.socket.from_stdlib_socket(conn), addr
                        )
                        if addr is REJECTED:
                            return
                    conn.setblocking(True)
                    # From here on the handler owns the socket.
                    conn_for_handler, conn = conn, None
                    await cb(self, conn_for_handler, addr, *args)
                else:
                    assert conn is not None
                    trio_sock = trio.socket.from_stdlib_socket(conn)
                    if self._proxy is not None:
                        # Before the TLS handshake: the header comes in clear.
                        addr = await self._proxy.read(trio_sock, addr)
                        if addr is REJECTED:
                            return
                    stream = trio.SocketStream(trio_sock)
                    if self._options.ssl_context is None:
                        await cb(self, stream, addr, *args)
                    else:
                        tls = await self._tls_handshake(stream, addr)
                        if tls is not None:
                            await cb(self, tls, addr, *args)
                            # Say goodbye properly (close_notify), so the client
                            # can tell our close from a truncation attack; but
                            # never wait long for a peer that does not read.
                            with trio.move_on_after(TLS_CLOSE_TIMEOUT):
                                await tls.aclose()
        except trio.BrokenResourceError:
            if self._options.handler_errors == "raise" and not self._cancel_handlers:
                raise
            logger.debug("handler for %r: the peer went away", addr, exc_info=True)
        except Exception:
            if self._cancel_handlers:
                # Cancelled by drain(), it failed while unwinding: the drain's
                # doing, not a bug of the handler's.
                logger.debug("handler for %r raised once drained", addr, exc_info=True)
            else:
                self._handler_error_count += 1
                if self._options.handler_errors == "raise":
                    raise
                logger.exception("handler for %r raised", addr)
        finally:
            if self._scoped:
                scopes = self._scopes
                scopes.discard(scope)
                if not scopes:
                    # A set never shrinks by discarding: give back the table
                    # a burst of connections grew (clear() does, cheaply).
                    scopes.clear()
            # The listener owns the trio stream and closes it, through trio so
            # that any task still waiting on it is told (closing twice is
            # harmless). A blocking socket is the handler's once handed over,
            # and closed here only if it never got that far.
            if trio_sock is not None:
                trio_sock.close()
            elif conn is not None:
                conn.close()
            with self._lock:
                self._active -= 1
                cap = self._max_connections
                # A slot (and an fd) came free: the gate may open again.
                wake = (cap is not None and self._active + 1 >= cap) or self._fd_wait
                if self._fd_wait:
                    self._fd_wait = False
                    self._resume_at = -math.inf
                idle = self._active == 0
            if wake:
                self._wake()
            if idle and self._idle is not None:
                self._idle.set()


_NO_SCOPE: Final = contextlib.nullcontext()


def _task_name(cb: object) -> str:
    """The name handler tasks get, for trio's task tree and tracebacks."""
    name = getattr(cb, "__qualname__", None) or type(cb).__qualname__
    return f"trio_evlisten handler {name}"


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # called from a thread: no Trio clock here
        return -math.inf
