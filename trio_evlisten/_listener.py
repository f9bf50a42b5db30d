"""The public object, :class:`ConnListener`, and running it.

Owns: the properties and methods users call, their argument checks and
docs, the statistics snapshot, the wiring of the stages, and
:func:`run_listener` (the nursery, its tasks, and what leaving the block
means). It decides nothing itself: the state and the accept decision are
:mod:`._state`'s; the accept task is :mod:`._accept`'s; where handlers run,
the line for a slot and the drain's waiting are :mod:`._host`'s; one
connection's life is :mod:`._connection`'s. A method here checks its
arguments, tells the state, and does what the state answers (wake the
accept task, release the socket).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import types
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._accept import Acceptor
from ._agent import AgentServer, lame_duck, snapshot_of
from ._checks import (
    check_accept_cb,
    check_error_cb,
    check_max_connections,
    check_seconds,
)
from ._clients import ClientLimiter
from ._connection import ConnectionRunner
from ._engine import make_engine, prepare_for_protocols
from ._fd_budget import default_max_pending, warn_if_fd_limit_below
from ._flags import Flag
from ._host import HandlerHost, task_name
from ._outcome import shape
from ._overload import LoopLag, Shedding, TokenBucket, default_burst
from ._proxy_reader import ProxyReader, trusted_networks
from ._recorder import ConnectionRecorder
from ._socket import accept_queue
from ._state import ListenerState
from ._stats import DrainResult, ListenerStatistics
from ._transport import check_protocol_factory

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._options import ListenerOptions
    from ._socket import ListeningSocket

    AcceptCallback = Callable[..., Awaitable[object]]
    ErrorCallback = Callable[..., object]

logger: Final = logging.getLogger("trio_evlisten")


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
    # Only read once, to make the state, which keeps them from then on.
    _cb: AcceptCallback | None
    _args: tuple[Any, ...]
    _error_cb: ErrorCallback | None
    _options: ListenerOptions

    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _sockname: Any = attrs.field(init=False)
    _proxy: ProxyReader | None = attrs.field(default=None, init=False)
    _state: ListenerState = attrs.field(init=False)
    _runner: ConnectionRunner = attrs.field(init=False)
    _host: HandlerHost = attrs.field(init=False)
    _acceptor: Acceptor = attrs.field(init=False)
    _shed: Shedding = attrs.field(init=False)
    _clients: ClientLimiter | None = attrs.field(default=None, init=False)
    _lag: LoopLag | None = attrs.field(default=None, init=False)
    _agent: AgentServer | None = attrs.field(default=None, init=False)
    _token: trio.lowlevel.TrioToken = attrs.field(
        factory=trio.lowlevel.current_trio_token, init=False
    )

    def __attrs_post_init__(self) -> None:
        self._sockname = sockname = self._lsock.std.getsockname()
        options = self._options
        if options["proxy_protocol"]:
            self._proxy = ProxyReader(
                trusted_networks(options["proxy_trusted"]),
                options["proxy_timeout"],
                sockname,
            )
        protocol = options["protocol"]
        self._shed = shed = Shedding(sockname)
        per_client = options["max_connections_per_client"]
        if per_client is not None:
            self._clients = ClientLimiter(
                per_client,
                options["client_limit_policy"],
                options["client_ipv6_prefix"],
                options["client_table_size"],
                shed,
            )
        self._state = state = ListenerState(
            self._flags,
            # Protocol mode: the factory is the handler (None shuts the gate).
            self._cb if protocol is None else protocol,  # type: ignore[arg-type]
            self._args,
            self._error_cb,
            (),
            options["max_connections"],
            options["max_pending"] or default_max_pending(options["max_connections"]),
            # Counting a connection for its client is a step before the
            # handler, as a PROXY header or a TLS handshake is.
            preamble=self._proxy is not None
            or options["ssl_context"] is not None
            or self._clients is not None,
        )
        self._throttle(state, shed)
        self._runner = runner = ConnectionRunner(
            self, state, self._flags, options, self._proxy, sockname
        )
        self._host = host = HandlerHost(
            state,
            runner,
            self._wake_acceptor,
            task_name(self._cb),
            clients=self._clients,
            proxied=self._proxy is not None,
        )
        if protocol is None:
            runner.prepare(self._lsock.std)
        else:
            prepare_for_protocols(self._lsock.std)
            host.use_engine(
                make_engine(self, state, runner, options["handler_errors"] == "raise")
            )
        self._acceptor = Acceptor(self, self._lsock, state, host.start, shed=shed)
        if options["agent_port"] is not None:
            self._agent = open_agent(sockname, options["agent_port"], state, self._lag)

    def _throttle(self, state: ListenerState, shed: Shedding) -> None:
        """Set up ``max_loop_lag`` and ``max_accept_rate``, if given."""
        options = self._options
        rate, bound = options["max_accept_rate"], options["max_loop_lag"]
        bucket = None
        if rate is not None:
            bucket = TokenBucket(rate, options["accept_burst"] or default_burst(rate))
        if bound is not None:
            self._lag = LoopLag(bound, state, self._wake_acceptor, shed)
        state.throttle(bucket, lag=bound is not None)

    # ------------------------------------------------------------------
    # Public, non-blocking API

    @property
    def fd(self) -> int:
        """The listening socket's file descriptor (``evconnlistener_get_fd``).

        ``-1`` once the socket is closed. Reading it, like :attr:`socket`,
        takes the socket: without ``CLOSE_ON_FREE`` it is then yours to close.
        """
        return self._lsock.take_fd()

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket, as a :mod:`trio.socket` object.

        Reading it takes the socket: without ``CLOSE_ON_FREE`` it outlives
        the listener and is yours to close (else leaving
        :func:`open_listener`'s block warns that it still listens).
        """
        return self._lsock.take()

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery the listener runs in (``evconnlistener_get_base``).

        :func:`open_listener`'s own (with ``handler_nursery=``, that one).
        Its scope covers the accept task, the handlers and the ``async
        with`` body: cancel it to stop everything at once, as the echo
        example's ``event_base_loopexit`` does.

        Handlers do not run in it directly but in a nursery of their own
        inside it, so that :meth:`drain` can cancel them alone. A task you
        start here runs beside the accept task: leaving the block waits for
        it (after draining the handlers), ``drain_timeout`` does not bound
        it, and an exception it raises ends the listener even with
        ``handler_errors="log"``. For a helper task that belongs to one
        connection, open a nursery inside the handler instead: a drain that
        cancels the handler cancels it too, and its exceptions are the
        handler's (logged, or raised with ``handler_errors="raise"``).
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
        return self._state.enabled

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called, or the listener ended."""
        return self._state.closed

    def statistics(self) -> ListenerStatistics:
        """A frozen snapshot of the listener's counters and state.

        ``queue_depth``/``queue_limit`` are read from the kernel at the call
        (one ``getsockopt``), the rest from the listener's counters.
        """
        state = self._state
        queue = None if state.closed else accept_queue(self._lsock.std)
        acceptor, runner = self._acceptor, self._runner
        with state.lock:
            return ListenerStatistics(
                accepted=acceptor.accepted,
                active=state.active,
                pending=state.pending,
                errors=acceptor.errors,
                retried=acceptor.retried,
                paused_by_errors=state.paused,
                backoff=acceptor.backoff.current,
                handler_errors=runner.handler_errors,
                tls_failures=runner.tls_failures,
                proxy_rejected=0 if self._proxy is None else self._proxy.rejected,
                enabled=state.enabled,
                closed=state.closed,
                max_connections=state.max_connections,
                max_pending=state.max_pending,
                queue_depth=None if queue is None else queue[0],
                queue_limit=None if queue is None else queue[1],
                backlog=self._lsock.backlog if queue is None else queue[1],
                **self._shed_statistics(),
                lameduck=state.lameduck,
            )

    def _shed_statistics(self) -> dict[str, Any]:
        """The statistics of shedding load (under the state's lock)."""
        state, shed, lag = self._state, self._shed, self._lag
        try:
            now: float | None = trio.current_time()
        except RuntimeError:
            now = None  # another thread: no clock to read
        bucket = state.bucket
        return {
            "paused_by_load": state.loaded,
            "load_paused_seconds": 0.0
            if lag is None
            else lag.paused_seconds(now)
            if now is not None
            else lag.paused_for,
            "loop_lag": None if lag is None else lag.lag,
            "paused_by_rate": bucket is not None
            and now is not None
            and bucket.ready_at(now) > now,
            "pauses": types.MappingProxyType(dict(shed.pauses)),
            "refused": types.MappingProxyType(dict(shed.refused)),
            "held": shed.held,
            "clients": 0 if self._clients is None else len(self._clients),
        }

    def enable(self) -> None:
        """Start (or resume) accepting connections (``evconnlistener_enable``).

        Idempotent.

        Raises:
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        self._change("enable", self._state.set_enabled, True)

    def disable(self) -> None:
        """Stop accepting until :meth:`enable` (``evconnlistener_disable``).

        Idempotent. Connections that arrive meanwhile wait in the kernel's
        backlog. Handlers already running go on.

        Raises:
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        self._change("disable", self._state.set_enabled, False)

    def set_cb(self, cb: AcceptCallback | None, *args: Any) -> None:
        """Replace the accept callback and its arguments (``evconnlistener_set_cb``).

        Connections accepted from now on go to ``cb(listener, conn, addr,
        *args)``; handlers already running keep the callback they started
        with. ``cb=None`` stops accepting until a callback is set again. In
        protocol mode (``protocol=``), ``cb`` is the new protocol factory
        (called with no arguments, so no ``args``).

        Raises:
            TypeError: ``cb`` is not ``None`` nor an async function (a plain
                function that returns a coroutine is refused too), or
                cannot take ``(listener, conn, addr, *args)``.
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        if self._options["protocol"] is None:
            check_accept_cb(cb, args)
        else:
            check_protocol_factory(cb, "set_cb's argument in protocol mode")
            if args:
                raise TypeError(
                    f"a protocol factory is called with no arguments, so set_cb "
                    f"takes none after it (got {args!r}); bind them with "
                    f"functools.partial"
                )
        self._change("set_cb", self._state.set_cb, cb, args)
        self._host.task_name = task_name(cb)

    def set_error_cb(self, error_cb: ErrorCallback | None, *args: Any) -> None:
        """Set the callback for ``accept()`` errors (``evconnlistener_set_error_cb``).

        It is called as ``error_cb(listener, error, *args)`` in the accept
        task, synchronously, with the :exc:`OSError`; it may call
        :meth:`disable`, :meth:`enable`, :meth:`close` or cancel
        ``listener.nursery.cancel_scope``. ``None`` removes it: errors are
        then logged, or, for fatal ones, raised into the nursery.

        Raises:
            TypeError: ``error_cb`` is not ``None`` nor a plain function, or
                cannot take ``(listener, error, *args)``.
            trio.ClosedResourceError: the listener is closed.
            RuntimeError: called from another thread without
                :attr:`Flag.THREADSAFE`.
        """
        check_error_cb(error_cb, args)
        self._change("set_error_cb", self._state.set_error_cb, error_cb, args)

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
        self._change(
            "set_max_connections", self._state.set_max_connections, max_connections
        )
        warn_if_fd_limit_below(max_connections)

    @property
    def agent_port(self) -> int | None:
        """The port answering HAProxy's agent check (``agent_port=``), or ``None``.

        The real port when ``agent_port=0`` asked for a free one.
        """
        return None if self._agent is None else self._agent.port

    @property
    def lameduck(self) -> bool:
        """Whether a drain's lame duck has begun (``lameduck=``).

        The agent port says ``drain`` and the listener accepts and serves as
        before; :attr:`draining` is set only when the lame duck is over. A
        handler that keeps connections alive may use it to ask its client to
        reconnect (HTTP's ``Connection: close``), so the balancer, which no
        longer sends here, moves it elsewhere.
        """
        return self._state.lameduck

    @property
    def draining(self) -> bool:
        """Whether a drain has begun, so handlers should finish up.

        Set by :meth:`drain`, and by leaving :func:`open_listener`'s block
        (without ``handler_nursery=``). Handlers poll it between requests or
        wait for it with :meth:`wait_draining`.
        """
        return self._state.draining.is_set()

    async def wait_draining(self) -> None:
        """Wait until a drain begins (returns at once if one has).

        For a handler that idles (a keep-alive connection, a subscription):
        race it against the next request and finish up when it returns.
        """
        await self._state.draining.wait()

    async def drain(
        self, grace: float | None = None, *, lameduck: float | None = None
    ) -> DrainResult:
        """Serve what is queued, stop accepting, let handlers finish, cancel the rest.

        In order: the lame duck, for up to ``lameduck`` seconds (the
        listener's ``lameduck=`` option if ``None``; see it), during which
        :attr:`lameduck` is set, the agent port says ``drain`` and the
        listener goes on accepting; set :attr:`draining` (waking :meth:`wait_draining`);
        accept the connections the kernel has already queued (they completed
        their TCP handshake, so closing the socket now would reset them),
        even on a disabled listener, up to the queue's limit and within
        ``grace``; :meth:`close` (nothing more is accepted); wait, until
        ``grace`` seconds after the drain began (``None``: as long as it
        takes; a WARNING after 10 s and every 60 s names how many still
        run), for the handlers to return; cancel those still running, and
        wait for them to unwind. ``grace`` counts from the end of the lame
        duck. There is no lame duck once a drain began (or its lame duck
        did), once closed, or after :meth:`mark_handed_off` (the successor
        serves the port).

        Only the handler tasks this listener started are cancelled: with
        ``handler_nursery=`` the nursery and its other tasks are untouched.
        A handler cancelled this way is not a handler error (not counted,
        not logged above DEBUG, not raised with ``handler_errors="raise"``).

        Don't await it from one of the listener's own handlers: it would
        wait for that handler too, and cancel it at the end of ``grace``.

        Args:
            grace: seconds to wait before cancelling, ``>= 0``, or ``None``.
            lameduck: seconds of lame duck, ``>= 0`` (``0``: none), or
                ``None`` for the listener's ``lameduck=``.

        Returns:
            A :class:`DrainResult`: how many handlers finished by themselves,
            how many raised, and how many were cancelled.

        Raises:
            TypeError: ``grace`` or ``lameduck`` is not a number of seconds
                or ``None``.
            ValueError: ``grace`` or ``lameduck`` is negative or NaN.
            RuntimeError: called from another thread (it is async: use
                :func:`trio.from_thread.run`).
        """
        check_seconds("grace", grace, optional=True)
        check_seconds("lameduck", lameduck, optional=True)
        if not self._state.check_thread("drain"):
            raise RuntimeError(
                "ConnListener.drain() was called from a thread other than the "
                "listener's; it is async: use trio.from_thread.run(listener.drain)"
            )
        if self._host.is_handler(trio.lowlevel.current_task()):
            raise RuntimeError(
                "ConnListener.drain() was awaited from one of the listener's own "
                "handlers (or a task inside one): it would wait for that handler "
                "to finish. Start it in another task instead, e.g. "
                "listener.nursery.start_soon(listener.drain), or return from "
                "the handler and drain from the task that opened the listener"
            )
        if lameduck is None:
            lameduck = self._options["lameduck"]
        await self._lame_duck(lameduck)
        start = self._runner.ended()
        self._state.begin_drain()
        # Connections past their preamble waiting for a slot start now,
        # past the cap: the drain serves them.
        self._host.grant()
        deadline = math.inf if grace is None else trio.current_time() + grace
        # Take what the kernel queued and close in the same step, with no
        # checkpoint in between (sweep() is synchronous), so that nothing
        # can join the queue unseen before the socket closes.
        self._acceptor.sweep()
        self.close()
        return await self._host.finish_drain(start, deadline)

    async def _lame_duck(self, seconds: float) -> None:
        if not seconds or self._lsock.handed_off:
            return
        with self._state.lock:
            began = self._state.begin_lameduck()
        if not began:
            return
        agent = self._agent
        logger.info(
            "listener on %r: lame duck for up to %g s (the agent port says drain)",
            self._sockname,
            seconds,
        )
        await lame_duck(
            self._acceptor_count, seconds, None if agent is None else agent.wait_told
        )

    def _acceptor_count(self) -> int:
        return self._acceptor.accepted

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
        on_trio_thread = self._state.check_thread("close")
        with self._state.lock:
            first = self._state.close()
        if first:
            self._soon(on_trio_thread, self._release)

    async def aclose(self) -> None:
        """:meth:`close`, as an async method (it checkpoints)."""
        self.close()
        await trio.lowlevel.checkpoint()

    def mark_handed_off(self) -> None:
        """Record that a successor process holds this listener's socket.

        :func:`hand_off` calls it for each listener it passes; call it
        yourself if you pass :attr:`fd` to a successor some other way. From
        then on, closing the listener leaves a Unix socket's path in place
        (the successor serves it), and a drain leaves the kernel's queue to
        the successor instead of taking it.
        """
        self._lsock.hand_off()

    # ------------------------------------------------------------------
    # Telling the state, and doing what it answers

    def _change(
        self, method: str, transition: Callable[..., object], *args: Any
    ) -> None:
        """Run one of the state's transitions; wake the accept task if it says so."""
        on_trio_thread = self._state.check_thread(method)
        with self._state.lock:
            wake = transition(*args)
        if wake:
            self._soon(on_trio_thread, self._wake)

    def _soon(self, on_trio_thread: bool, fn: Callable[[], None]) -> None:
        """Run ``fn`` now on the Trio thread, or soon from another one."""
        if on_trio_thread:
            fn()
        else:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn)

    def _wake(self) -> None:
        # The gate may have opened: the accept task re-reads it, and a raised
        # cap gives connections waiting in line their slots.
        self._acceptor.wake()
        self._host.grant()

    def _wake_acceptor(self) -> None:
        self._acceptor.wake()

    def _release(self) -> None:
        self._acceptor.wake()
        self._lsock.release(close=bool(self._flags & Flag.CLOSE_ON_FREE))
        self._state.closed_event.set()

    async def _accept(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The accept task: however it ends, the listener is closed with it."""
        try:
            await self._acceptor.run(task_status=task_status)
        finally:
            self.close()


@asynccontextmanager
async def run_listener(
    lsock: ListeningSocket,
    flags: Flag,
    cb: AcceptCallback | None,
    args: tuple[Any, ...],
    error_cb: ErrorCallback | None,
    options: ListenerOptions,
) -> AsyncIterator[ConnListener]:
    """Run a listener on ``lsock`` while the block runs (:func:`open_listener`'s body).

    Resource handling:
        The socket is released (closed with ``CLOSE_ON_FREE``) if the
        listener cannot be made, and when the listener closes. Leaving the
        block drains (without ``handler_nursery=``) or closes (with it).
    """
    try:
        listener = ConnListener(lsock, flags, cb, args, error_cb, options)
    except BaseException:
        lsock.release(close=bool(flags & Flag.CLOSE_ON_FREE))
        raise
    handler_nursery = options["handler_nursery"]
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            if listener._agent is not None:
                # First, so that it owns (and closes) the agent's socket.
                await nursery.start(listener._agent.serve)
            if handler_nursery is None:
                listener._nursery = nursery
                # Handlers get a nursery of their own, for drain() to cancel.
                await nursery.start(listener._host.host)
            else:
                listener._nursery = handler_nursery
                await listener._host.use_nursery(handler_nursery)
            await nursery.start(listener._accept)
            if listener._lag is not None:
                nursery.start_soon(listener._lag.run)
            try:
                yield listener
            except BaseException as exc:
                body_error = exc
                listener.close()
                raise
            if handler_nursery is None:
                # A normal exit drains: handlers see listener.draining, what
                # the kernel queued is served, handlers get drain_timeout to
                # finish, then are cancelled.
                await listener.drain(options["drain_timeout"])
            else:
                listener.close()
            if listener._agent is not None:
                # Answering "stopped" up to here: the handlers are done now.
                listener._agent.stop()
    except BaseExceptionGroup as group:
        error = shape(group, listener._host.group, body_error)
    else:
        lsock.warn_if_left_listening()
        return
    raise error


def open_agent(
    sockname: Any, port: int, state: ListenerState, lag: LoopLag | None = None
) -> AgentServer:
    """The agent server for a listener bound to ``sockname``, bound to ``port``.

    With ``lag`` (``max_loop_lag``), the weight it reports also says how
    close the event loop runs to that bound.

    Raises:
        ValueError: the listener is on a Unix socket (no host to bind on).
        OSError: the agent port cannot be bound.
    """
    if not isinstance(sockname, tuple):
        raise ValueError(
            f"agent_port needs a TCP listener (one with a host to answer on), "
            f"not one on the Unix socket {sockname!r}"
        )
    if lag is None:
        agent = AgentServer(lambda: snapshot_of(state))
    else:
        agent = AgentServer(lambda: snapshot_of(state, lag.lag, lag.bound))
    agent.bind(sockname[0], port)
    return agent


def record_connections(listener: ConnListener) -> ConnectionRecorder:
    """Make ``listener`` record connection durations; return where (once made, kept).

    For :mod:`trio_evlisten.metrics`: until it is called, a listener's
    connections record nothing.
    """
    runner = listener._runner
    if runner.recorder is None:
        runner.recorder = ConnectionRecorder()
    return runner.recorder


async def wait_closed(listener: ConnListener) -> None:
    """Wait until ``listener`` is closed and its socket released."""
    await listener._state.closed_event.wait()
