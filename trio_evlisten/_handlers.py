"""Hosting handler tasks: where they run, how many, and draining them.

Owns: the nursery handlers are started in (ours, owned by a host task so that
its scope covers the handlers and nothing else; or the caller's
``handler_nursery=``, with a cancel scope per handler), the count of running
handlers and what a finishing one wakes, and :meth:`Handlers.drain`'s waiting
and cancelling.

May not touch: what a connection does once its task runs (that is
:mod:`._connection`), the accept loop, or the listener's gate state (a
finishing handler only asks the accept task to re-read it).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._connection import serve_connection
from ._stats import DrainResult

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from socket import socket as StdSocket

    from ._listener import AcceptCallback, ConnListener

_NO_SCOPE: Final = contextlib.nullcontext()


@attrs.define(eq=False)
class Handlers:
    """The running handlers of one listener."""

    _listener: ConnListener
    #: Handlers running now (counted from accept, under the listener's lock).
    active: int = attrs.field(default=0, init=False)
    #: Set once drain() cancelled the handlers still running.
    cancelling: bool = attrs.field(default=False, init=False)
    # Where handlers are started: our handler nursery, or the caller's.
    _spawn_into: trio.Nursery | None = attrs.field(default=None, init=False)
    # Our handler nursery's scope (None with handler_nursery=).
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    # The group our handler nursery raised, for open_listener to splice.
    group: BaseException | None = attrs.field(default=None, init=False)
    # With handler_nursery=: a cancel scope per handler, so drain() can
    # cancel ours without touching the caller's other tasks.
    _scoped: bool = attrs.field(default=False, init=False)
    _scopes: set[trio.CancelScope] = attrs.field(factory=set, init=False)
    _idle: trio.Event | None = attrs.field(default=None, init=False)
    _draining: trio.Event = attrs.field(factory=trio.Event, init=False)

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
                task_status.started()
                await self._listener._gate.closed_event.wait()
        except BaseExceptionGroup as group:
            self.group = group
            raise

    def use_nursery(self, nursery: trio.Nursery) -> None:
        """Run handlers in the caller's ``nursery``, each in its own scope."""
        self._spawn_into = nursery
        self._scoped = True

    def start(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        """Start a handler task for a connection just accepted (already counted)."""
        try:
            # A fixed name: trio would otherwise format one per task, which
            # costs a string allocation per connection (~280 B held while
            # the connection lives) and CPU on the accept path.
            assert self._spawn_into is not None
            self._spawn_into.start_soon(
                self._run, conn, addr, cb, args, name=self._listener._gate.task_name
            )
        except BaseException:
            # Typically "Nursery is closed to new arrivals": the handler
            # nursery the user gave us has finished. The connection must not
            # leak; the listener cannot go on without a place for handlers.
            conn.close()
            self.active -= 1
            raise

    async def _run(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        scope: contextlib.AbstractContextManager[object] = _NO_SCOPE
        if self._scoped:
            # In a caller's handler_nursery: a cancel scope of our own, so
            # drain() cancels our handlers and none of the caller's tasks.
            scope = own = trio.CancelScope()
            if self.cancelling:
                own.cancel()
            self._scopes.add(own)
        try:
            with scope:
                await serve_connection(self._listener, conn, addr, cb, args)
        finally:
            if self._scoped:
                scopes = self._scopes
                scopes.discard(scope)
                if not scopes:
                    # A set never shrinks by discarding: give back the table
                    # a burst of connections grew (clear() does, cheaply).
                    scopes.clear()
            self._finished()

    def _finished(self) -> None:
        listener = self._listener
        with listener._gate.lock:
            self.active -= 1
            cap = listener._gate.max_connections
            # A slot (and an fd) came free: the gate may open again.
            freed = listener._acceptor.slot_freed()
            wake = (cap is not None and self.active + 1 >= cap) or freed
            idle = self.active == 0
        if wake:
            listener._acceptor.wake()
        if idle and self._idle is not None:
            self._idle.set()

    # ------------------------------------------------------------------
    # Draining

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    async def wait_draining(self) -> None:
        await self._draining.wait()

    async def drain(self, grace: float | None) -> DrainResult:
        """Set draining, wait ``grace`` for the handlers, cancel the rest."""
        listener = self._listener
        self._draining.set()
        with listener._gate.lock:
            running = self.active
        if grace is None:
            await self._wait_idle()
        else:
            with trio.move_on_after(grace):
                await self._wait_idle()
        with listener._gate.lock:
            cancelled = self.active
        if cancelled:
            self.cancelling = True
            if self._scope is not None:
                self._scope.cancel()
            for scope in self._scopes:
                scope.cancel()
            await self._wait_idle()
        else:
            await trio.lowlevel.checkpoint()
        return DrainResult(finished=max(running - cancelled, 0), cancelled=cancelled)

    async def _wait_idle(self) -> None:
        while self.active:
            # Shared by concurrent drains: replace it only once it fired.
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
