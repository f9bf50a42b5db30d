"""The listener: one object owns the gate, the accept loop and the handlers.

State rules, all kept by :class:`ConnListener` and nowhere else:

* ``closed`` is terminal; :meth:`~ConnListener.close` reaches it from any
  state, from any task, callback, or (with ``THREADSAFE``) thread.
* The gate is open, and ``accept()`` may be called, exactly when the
  listener is not closed, is enabled, has a callback, runs fewer handlers
  than ``max_connections``, and is not pausing after an error.
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
import threading
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._errors import Backoff, ErrorClass, classify
from ._flags import Flag
from ._options import Options
from ._proxy_gate import REJECTED, ProxyGate
from ._stats import ListenerStatistics

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
    :meth:`set_cb`, :meth:`set_error_cb`, :meth:`close`) are plain methods
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
        """A frozen snapshot of the listener's counters and state."""
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
                max_connections=self._options.max_connections,
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
            and (
                self._options.max_connections is None
                or self._active < self._options.max_connections
            )
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
                if not gate_open:
                    await self._park(math.inf)
                elif self._resume_at > trio.current_time():
                    await self._park(self._resume_at)
                elif self._lsock.closed_underfoot():
                    self._on_accept_error(
                        OSError(
                            errno.EBADF,
                            "the listening socket was closed under the listener",
                        )
                    )
                else:
                    try:
                        readable = await self._park(math.inf, readable=True)
                    except OSError as exc:
                        # epoll refused the fd (EBADF: closed behind trio's
                        # back): an accept error like any other.
                        self._on_accept_error(exc)
                    else:
                        if readable:
                            self._accept_batch()
        finally:
            # However the accept task ends (closed, an error, cancelled), the
            # listener is closed with it.
            self.close()

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
        self._resume_at = trio.current_time() + delay
        error_cb, error_args = self._error_cb, self._error_args
        if error_cb is not None:
            error_cb(self, exc, *error_args)
        elif kind is ErrorClass.RESOURCES:
            logger.error(
                "accept() on %r failed: %s; pausing accepts for %.3f s",
                self._sockname,
                exc,
                delay,
            )
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
            self.nursery.start_soon(
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
        try:
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
            if self._options.handler_errors == "raise":
                raise
            logger.debug("handler for %r: the peer went away", addr, exc_info=True)
        except Exception:
            self._handler_error_count += 1
            if self._options.handler_errors == "raise":
                raise
            logger.exception("handler for %r raised", addr)
        finally:
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
                was_full = self._active + 1 == self._options.max_connections
            if was_full:
                self._wake()


def _task_name(cb: object) -> str:
    """The name handler tasks get, for trio's task tree and tracebacks."""
    name = getattr(cb, "__qualname__", None) or type(cb).__qualname__
    return f"trio_evlisten handler {name}"


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # called from a thread: no Trio clock here
        return -math.inf
