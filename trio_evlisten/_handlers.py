"""Hosting handler tasks: where they run, how many, and draining them.

Owns: the nursery handlers are started in (ours, owned by a host task so that
its scope covers the handlers and nothing else; or the caller's
``handler_nursery=``, with a cancel scope per handler), the counts (``active``
handlers, each holding a slot of ``max_connections``; ``pending``
connections, still in their preamble or waiting for a slot, bounded by
``max_pending``), the FIFO of connections waiting for a slot, what a
finishing one wakes, and the drain's waiting, warning and cancelling.

May not touch: what a connection does once its task runs (that is
:mod:`._connection`), the accept loop, or the gate's state (a finishing
handler only asks the accept task to re-read it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._connection import close
from ._stats import DrainResult

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import Callable
    from socket import socket as StdSocket

    from ._connection import Connections
    from ._gate import AcceptCallback, Gate

logger: Final = logging.getLogger("trio_evlisten")

#: A drain that waits this long for handlers logs a WARNING naming how many
#: still run, and again every :data:`DRAIN_WARN_EVERY` seconds.
DRAIN_WARN_AFTER: Final = 10.0
DRAIN_WARN_EVERY: Final = 60.0

_NO_SCOPE: Final = contextlib.nullcontext()


@attrs.define(eq=False)
class Handlers:
    """The connections of one listener from accept to close."""

    _gate: Gate
    _conns: Connections
    #: Ends an out-of-fds pause when a handler finishes (the accept task's).
    _slot_freed: Callable[[], bool]
    #: Wakes the accept task.
    _wake: Callable[[], None]
    max_pending: int
    #: Handlers running, each holding a slot (counted from accept when there
    #: is no preamble, so the cap is exact even in a burst).
    active: int = attrs.field(default=0, init=False)
    #: Connections accepted whose handler has not started yet.
    pending: int = attrs.field(default=0, init=False)
    # Connections past their preamble, waiting for a slot, first come first.
    _slot_queue: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False
    )
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
    # One bound method for every connection's task to call when it ends (a
    # bound method per connection would be 48 bytes each, held while it runs).
    _done: Callable[[], None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._done = self._finished_active

    # ------------------------------------------------------------------
    # Room (all under the gate's lock)

    def has_room(self) -> bool:
        """Whether one more connection may be accepted now."""
        if self.pending >= self.max_pending:
            return False
        if self._conns.has_preamble:
            # Slots are taken once the preamble is done; until then the
            # connection is pending, bounded by max_pending.
            return True
        cap = self._gate.max_connections
        return cap is None or self.active < cap

    def admit(self) -> None:
        """Count a connection just accepted."""
        if self._conns.has_preamble:
            self.pending += 1
        else:
            self.active += 1

    def promote(self) -> None:
        """Give free slots to connections waiting for one (the cap rose).

        Trio thread only.
        """
        with self._gate.lock:
            self._promote()

    def _promote(self) -> int:
        cap = self._gate.max_connections
        n = len(self._slot_queue)
        if cap is not None:
            n = min(n, cap - self.active)
        if n > 0:
            self.active += n
            self.pending -= n
            self._slot_queue.unpark(count=n)
        return max(n, 0)

    async def _take_slot(self) -> None:
        """Move this connection from pending to active, waiting in line."""
        with self._gate.lock:
            cap = self._gate.max_connections
            if not self._slot_queue and (cap is None or self.active < cap):
                full = self.pending >= self.max_pending
                self.pending -= 1
                self.active += 1
            else:
                full = None
        if full is None:
            # _finished() or promote() moves us, then unparks us.
            await self._slot_queue.park()
        elif full:
            self._wake()

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
                await self._gate.closed_event.wait()
        except BaseExceptionGroup as group:
            self.group = group
            raise
        finally:
            self._conns.log.flush(trio.current_time(), final="; listener closed")

    def use_nursery(self, nursery: trio.Nursery) -> None:
        """Run handlers in the caller's ``nursery``, each in its own scope."""
        self._spawn_into = nursery
        self._scoped = True

    def start(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        """Start the task of a connection just accepted (already admitted)."""
        try:
            # A fixed name: trio would otherwise format one per task, which
            # costs a string allocation per connection (~280 B held while
            # the connection lives) and CPU on the accept path.
            assert self._spawn_into is not None
            if self._scoped or self._conns.has_preamble:
                self._spawn_into.start_soon(
                    self._run, conn, addr, cb, args, name=self._gate.task_name
                )
            else:
                # The common case needs nothing of ours around the handler
                # but the count: the connection's own run is the task.
                self._spawn_into.start_soon(
                    self._conns.run,
                    conn,
                    None,
                    addr,
                    cb,
                    args,
                    self._done,
                    name=self._gate.task_name,
                )
        except BaseException:
            # Typically "Nursery is closed to new arrivals": the handler
            # nursery the user gave us has finished. The connection must not
            # leak; the listener cannot go on without a place for handlers.
            conn.close()
            self._finished(slot=not self._conns.has_preamble)
            raise

    async def _run(
        self, conn: StdSocket, addr: Any, cb: AcceptCallback, args: tuple[Any, ...]
    ) -> None:
        scope: contextlib.AbstractContextManager[object] = _NO_SCOPE
        if self._scoped:
            # In a caller's handler_nursery: a cancel scope of our own, so
            # drain() cancels our handlers and none of the caller's tasks.
            scope = own = trio.CancelScope()
            if self._conns.cancelling:
                own.cancel()
            self._scopes.add(own)
        conns = self._conns
        slot = not conns.has_preamble
        try:
            with scope:
                if slot:
                    await conns.run(conn, None, addr, cb, args)
                    return
                opened = await conns.open(conn, addr)
                if opened is None:
                    return
                try:
                    await self._take_slot()
                except BaseException:
                    # Cancelled while waiting in line (a drain, say): the
                    # handler never got it, so it is still ours to close.
                    close(conn)
                    raise
                slot = True
                await conns.run(conn, opened[0], opened[1], cb, args)
        finally:
            if self._scoped:
                scopes = self._scopes
                scopes.discard(scope)
                if not scopes:
                    # A set never shrinks by discarding: give back the table
                    # a burst of connections grew (clear() does, cheaply).
                    scopes.clear()
            self._finished(slot=slot)

    def _finished_active(self) -> None:
        self._finished(slot=True)

    def _finished(self, *, slot: bool) -> None:
        with self._gate.lock:
            cap = self._gate.max_connections
            was_full = self.pending >= self.max_pending
            if slot:
                was_full |= cap is not None and self.active >= cap
                self.active -= 1
                self._promote()
            else:
                self.pending -= 1
            # A slot (and an fd) came free: the gate may open again.
            wake = self._slot_freed() or was_full
            idle = not (self.active or self.pending)
        if wake:
            self._wake()
        if idle and self._idle is not None:
            self._idle.set()

    # ------------------------------------------------------------------
    # Draining

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    async def wait_draining(self) -> None:
        await self._draining.wait()

    def begin_drain(self) -> tuple[int, int]:
        """Set draining; return the counters the drain's result starts from."""
        self._draining.set()
        return self._conns.finished, self._conns.handler_errors

    async def finish_drain(
        self, start: tuple[int, int], deadline: float
    ) -> DrainResult:
        """Wait until ``deadline`` for the connections, then cancel the rest."""
        if not await self._wait_idle(deadline):
            with self._gate.lock:
                cancelled = self.active + self.pending
            self._conns.cancelling = True
            if self._scope is not None:
                self._scope.cancel()
            for scope in self._scopes:
                scope.cancel()
            await self._wait_idle(float("inf"))
        else:
            cancelled = 0
            await trio.lowlevel.checkpoint()
        self._conns.log.flush(trio.current_time(), final="; drained")
        finished, failed = start
        return DrainResult(
            finished=self._conns.finished - finished,
            failed=self._conns.handler_errors - failed,
            cancelled=cancelled,
        )

    async def _wait_idle(self, deadline: float) -> bool:
        """Wait until no connection is left, or ``deadline``; return which.

        Warns (once after :data:`DRAIN_WARN_AFTER` seconds, then every
        :data:`DRAIN_WARN_EVERY`) while it waits, so a drain held up by
        handlers that never finish is not silent.
        """
        began = trio.current_time()
        warn_at = began + DRAIN_WARN_AFTER
        while self.active or self.pending:
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
                "in their preamble after %.0f s",
                self.active,
                self.pending,
                trio.current_time() - began,
            )
            warn_at += DRAIN_WARN_EVERY
        return True
