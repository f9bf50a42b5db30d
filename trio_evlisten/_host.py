"""Hosting handler tasks: where they run, the line for a slot, and draining.

Owns: the nursery handlers are started in (ours, owned by a host task so that
its scope covers the handlers and nothing else; or the caller's
``handler_nursery=``, with a cancel scope per handler), the line of
connections waiting for a handler slot (a FIFO), what a finishing
connection sets off (slots handed on, the accept task woken), and the
drain's waiting, warning and cancelling.

May not touch: the counts and caps (:class:`._state.ListenerState` keeps
them; this module tells it what happened and does what it answers), what a
connection does once its task runs (:mod:`._connection`), or the accept
loop (it only wakes it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._clients import HOLD, REFUSED
from ._connection import close
from ._stats import DrainResult
from ._tls_transport import TLSSession

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from socket import socket as StdSocket

    from ._clients import ClientLimiter
    from ._connection import ConnectionRunner
    from ._engine import EpollEngine, TaskEngine
    from ._state import AcceptCallback, ListenerState

logger: Final = logging.getLogger("trio_evlisten")

#: A drain that waits this long for handlers logs a WARNING naming how many
#: still run, and again every :data:`DRAIN_WARN_EVERY` seconds.
DRAIN_WARN_AFTER: Final = 10.0
DRAIN_WARN_EVERY: Final = 60.0

_NO_SCOPE: Final = contextlib.nullcontext()


@attrs.define(eq=False)
class HandlerHost:
    """Where one listener's handler tasks run, from start to drain."""

    _state: ListenerState
    _runner: ConnectionRunner
    #: Wakes the accept task.
    _wake: Callable[[], None]
    #: The name handler tasks get, for trio's task tree and tracebacks.
    task_name: str
    #: ``max_connections_per_client``'s counts, or None.
    _clients: ClientLimiter | None = attrs.field(default=None, kw_only=True)
    #: Connections start with a PROXY header: the client's address is known
    #: only after it.
    _proxied: bool = attrs.field(default=False, kw_only=True)
    # Connections past their preamble, waiting for a slot, first come first.
    _line: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False
    )
    # Where handlers are started: our handler nursery, or the caller's.
    _spawn_into: trio.Nursery | None = attrs.field(default=None, init=False)
    # Our handler nursery's scope (None with handler_nursery=).
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    #: The group our handler nursery raised, for open_listener to splice.
    group: BaseException | None = attrs.field(default=None, init=False)
    # With handler_nursery=: a cancel scope per handler task, so drain() can
    # cancel ours without touching the caller's other tasks.
    _scoped: bool = attrs.field(default=False, init=False)
    _scopes: dict[trio.lowlevel.Task, trio.CancelScope] = attrs.field(
        factory=dict, init=False
    )
    _idle: trio.Event | None = attrs.field(default=None, init=False)
    # One bound method for every connection's task to call when it ends (a
    # bound method per connection would be held while each one runs).
    _done: Callable[[], None] = attrs.field(init=False)
    # Protocol mode: the engine that serves connections instead of tasks.
    _engine: EpollEngine | TaskEngine | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._done = self._finished_active

    def use_engine(self, engine: EpollEngine | TaskEngine) -> None:
        """Protocol mode: connections go to ``engine``, which runs in our nursery."""
        self._engine = engine
        engine.done = self._done
        engine.spawn = self._spawn

    def _spawn(self, async_fn: Callable[..., Any], *args: Any) -> None:
        """Protocol mode: start an engine's task (start_task, hand_over)
        beside the handlers, so that a drain waits for it and cancels it."""
        assert self._spawn_into is not None
        if self._scoped:
            self._spawn_into.start_soon(
                self._in_own_scope, async_fn, *args, name=self.task_name
            )
        else:
            self._spawn_into.start_soon(async_fn, *args, name=self.task_name)

    async def _in_own_scope(self, async_fn: Callable[..., Any], *args: Any) -> None:
        with self._own_scope():
            await async_fn(*args)

    @contextlib.contextmanager
    def _own_scope(self) -> Iterator[None]:
        """A cancel scope drain() cancels, for a task in a caller's
        handler_nursery (which it must not cancel), as :meth:`_run` keeps."""
        own = trio.CancelScope()
        if self._state.cancelling:
            own.cancel()
        task = trio.lowlevel.current_task()
        self._scopes[task] = own
        try:
            with own:
                yield
        finally:
            del self._scopes[task]
            if not self._scopes:
                self._scopes.clear()  # see _run

    async def _serve_engine(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the engine until the listener is closed and idle (in a
        caller's handler_nursery: :meth:`host` does this in ours)."""
        assert self._engine is not None
        with self._own_scope():
            async with trio.open_nursery() as nursery:
                await nursery.start(self._engine.run)
                task_status.started()
                await self._state.closed_event.wait()
                self._engine.wake()  # to end once idle

    # ------------------------------------------------------------------
    # Where handlers run

    async def host(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the nursery the handlers run in, until closed and idle.

        A task of its own, so that the nursery's scope covers the handlers
        and nothing else: drain() can cancel them while the ``async with``
        body (which may be the one awaiting drain) runs on.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._spawn_into = nursery
                if self._engine is not None:
                    # Beside the handlers, so that a drain cancels it too.
                    await nursery.start(self._engine.run)
                task_status.started()
                await self._state.closed_event.wait()
                if self._engine is not None:
                    self._engine.wake()  # to end once idle
        except BaseExceptionGroup as group:
            self.group = group
            raise
        finally:
            self._runner.flush_log("; listener closed")

    async def use_nursery(self, nursery: trio.Nursery) -> None:
        """Run handlers in the caller's ``nursery``, each in its own scope.

        In protocol mode the engine starts there too, in a scope of its own,
        so that its connections outlive the ``async with`` block as task
        mode's handlers do, and a drain cancels it and nothing else.
        """
        self._spawn_into = nursery
        self._scoped = True
        if self._engine is not None:
            await nursery.start(self._serve_engine, name=self.task_name)

    def is_handler(self, task: trio.lowlevel.Task) -> bool:
        """Whether ``task`` is one of our handlers, or runs inside one."""
        ours = None if self._scoped else self._spawn_into
        scoped = self._scopes
        while True:
            if task in scoped:
                return True
            nursery = task.parent_nursery
            if nursery is None:
                return False
            if nursery is ours:
                return True
            task = nursery.parent_task

    def start(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        """Start the task of a connection just accepted (already admitted)."""
        runner = self._runner
        preamble = self._state.preamble
        try:
            # A fixed name: trio would otherwise format one per task, which
            # costs a string per connection, held while it lives, and CPU on
            # the accept path.
            assert self._spawn_into is not None
            if self._engine is not None and not preamble:
                self._engine.register(conn, addr, cb)
            elif self._scoped or preamble:
                self._spawn_into.start_soon(
                    self._run, conn, addr, cb, args, name=self.task_name
                )
            else:
                # HOT PATH, kept apart on purpose: the common case needs
                # nothing of ours around the handler but the count, so the
                # connection's own run is the task, one coroutine frame less
                # per waiting connection than _run's shape (measured by the
                # idle workload: python -m benchmarks --workloads idle).
                self._spawn_into.start_soon(
                    runner.run, conn, None, addr, cb, args, self._done,
                    name=self.task_name,
                )  # fmt: skip
        except BaseException:
            # Typically "Nursery is closed to new arrivals": the handler
            # nursery the user gave us has finished. The connection must not
            # leak; the listener cannot go on without a place for handlers.
            close(conn)
            self._finished(slot=not preamble)
            raise

    async def _run(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        scope: contextlib.AbstractContextManager[object] = _NO_SCOPE
        task = None
        if self._scoped:
            # In a caller's handler_nursery: a cancel scope of our own, so
            # drain() cancels our handlers and none of the caller's tasks.
            scope = own = trio.CancelScope()
            if self._state.cancelling:
                own.cancel()
            task = trio.lowlevel.current_task()
            self._scopes[task] = own
        runner = self._runner
        slot = not self._state.preamble
        engine = self._engine
        handed = False
        clients, key = self._clients, None
        try:
            with scope:
                if slot:
                    await runner.run(conn, None, addr, cb, args)
                    return
                recorder = runner.recorder
                since = None if recorder is None else trio.current_time()
                if clients is not None and not self._proxied:
                    # Before any TLS handshake: refusing is then cheap.
                    admitted, key = await self._enter(clients, conn, addr)
                    if not admitted:
                        return
                opened = await runner.open(conn, addr)
                if opened is None:
                    return
                if clients is not None and self._proxied:
                    # The client is the one the PROXY header named.
                    admitted, key = await self._enter(clients, conn, opened[1])
                    if not admitted:
                        return
                try:
                    await self._take_slot()
                except BaseException:
                    # Cancelled while waiting in line (a drain, say): the
                    # handler never got it, so it is still ours to close.
                    close(conn)
                    raise
                slot = True
                if recorder is not None:
                    assert since is not None
                    recorder.queued.observe(trio.current_time() - since)
                if engine is not None:
                    # The engine holds the slot from here, and the socket,
                    # and the client's count until the connection is lost.
                    handed = True
                    on_lost = None
                    if key is not None:
                        assert clients is not None
                        on_lost = functools.partial(clients.leave, key)
                        key = None
                    # With TLS, the preamble's handshake gave its session.
                    tls = opened[0]
                    assert tls is None or isinstance(tls, TLSSession), tls
                    engine.register(conn, opened[1], cb, on_lost, tls)
                    return
                await runner.run(conn, opened[0], opened[1], cb, args, since=since)
        finally:
            if key is not None:
                assert clients is not None
                clients.leave(key)
            if task is not None:
                scopes = self._scopes
                del scopes[task]
                if not scopes:
                    # A dict never shrinks by deleting: give back the table
                    # a burst of connections grew (clear() does, cheaply).
                    scopes.clear()
            if not handed:
                self._finished(slot=slot)

    @staticmethod
    async def _enter(
        clients: ClientLimiter, conn: StdSocket, addr: Any
    ) -> tuple[bool, int | None]:
        """Count ``conn`` for its client: ``(admitted, key to leave)``.

        Over the client's limit it is held here (pending, no handler slot)
        or closed at once, by ``client_limit_policy``.

        Resource handling:
            ``conn`` is closed here if it is refused, or if holding it is
            cancelled.
        """
        verdict, key = clients.enter(addr)
        if verdict is REFUSED:
            close(conn)
            await trio.lowlevel.checkpoint()
            return False, None
        if verdict is HOLD:
            assert key is not None
            try:
                await clients.wait_turn(key)
            except BaseException:
                close(conn)
                raise
        return True, key

    # ------------------------------------------------------------------
    # Slots

    async def _take_slot(self) -> None:
        """Move this connection from pending to active, waiting in line."""
        state = self._state
        with state.lock:
            wake = state.take_slot(len(self._line))
        if wake is None:
            # _grant() moves us, then unparks us.
            await self._line.park()
        elif wake:
            self._wake()

    def grant(self) -> None:
        """Give free slots to connections waiting in line (the cap rose, or
        a drain began). Trio thread only."""
        with self._state.lock:
            n = self._state.slots_to_grant(len(self._line))
        if n:
            self._line.unpark(count=n)

    def _finished_active(self) -> None:
        self._finished(slot=True)

    def _finished(self, *, slot: bool) -> None:
        state = self._state
        with state.lock:
            wake = state.finished(slot=slot)
            n = state.slots_to_grant(len(self._line)) if slot and self._line else 0
            idle = state.idle
        if n:
            self._line.unpark(count=n)
        if wake:
            self._wake()
        if idle and self._idle is not None:
            self._idle.set()
        if idle and self._engine is not None:
            self._engine.wake()  # its task ends once closed and idle

    # ------------------------------------------------------------------
    # Draining

    async def finish_drain(
        self, start: tuple[int, int], deadline: float
    ) -> DrainResult:
        """Wait until ``deadline`` for the connections, then cancel the rest.

        ``start`` is the runner's ``(finished, handler_errors)`` when the
        drain began, so the result counts this drain's connections only.
        """
        state = self._state
        if not await self._wait_idle(deadline):
            with state.lock:
                cancelled = state.active + state.pending
            state.cancelling = True
            if self._scope is not None:
                self._scope.cancel()
            for scope in self._scopes.values():
                scope.cancel()
            await self._wait_idle(float("inf"))
        else:
            cancelled = 0
            await trio.lowlevel.checkpoint()
        self._runner.flush_log("; drained")
        finished, failed = self._runner.ended()
        return DrainResult(
            finished=finished - start[0],
            failed=failed - start[1],
            cancelled=cancelled,
        )

    async def _wait_idle(self, deadline: float) -> bool:
        """Wait until no connection is left, or ``deadline``; return which.

        Warns (once after :data:`DRAIN_WARN_AFTER` seconds, then every
        :data:`DRAIN_WARN_EVERY`) while it waits, so a drain held up by
        handlers that never finish is not silent, and says what to do.
        """
        state = self._state
        began = trio.current_time()
        warn_at = began + DRAIN_WARN_AFTER
        while not state.idle:
            # Shared by concurrent drains: replace it only once it fired.
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            with trio.move_on_at(min(deadline, warn_at)):
                await self._idle.wait()
                continue
            if trio.current_time() >= deadline:
                return False
            logger.warning(
                "draining: still waiting for %d handler(s) and %d connection(s) "
                "in their preamble after %.0f s. A handler that waits for its "
                "peer should return once listener.draining is set (race its "
                "wait against listener.wait_draining()); drain_timeout= (or "
                "drain(grace=)) bounds the wait, then cancels them",
                state.active,
                state.pending,
                trio.current_time() - began,
            )
            warn_at += DRAIN_WARN_EVERY
        return True


def task_name(cb: object) -> str:
    """The name handler tasks get, for trio's task tree and tracebacks."""
    name = getattr(cb, "__qualname__", None) or type(cb).__qualname__
    return f"trio_evlisten handler {name}"
