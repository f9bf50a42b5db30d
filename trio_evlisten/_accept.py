"""The accept task: wait for the listening socket, accept, hand connections on.

Owns: parking (until readable, woken, or the end of a pause), accepting in
batches, sorting ``accept()`` errors (with :mod:`._errors`) into retry /
back off / raise and the backoff schedule, the grouped log of accept
errors, the drain's sweep of the kernel's queue, and the counters of what
it accepted and what failed.

May not touch: the listener's state, except through
:class:`._state.ListenerState`'s methods (it asks ``may_accept()`` before
every ``accept()``, and tells it ``admit()`` and ``pause()``), and what
happens to a connection once accepted (the ``start`` function it is given
takes it).
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import FD_ERRNOS, Backoff, ErrorClass, GroupedLog, classify, errno_name
from ._overload import CAPACITY, RATE
from ._socket import BACKLOG_MAX, accept_queue
from ._state import ACCEPT, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable
    from socket import socket as StdSocket

    from ._overload import Shedding
    from ._socket import ListeningSocket
    from ._state import AcceptCallback, ListenerState

    StartHandler = Callable[[StdSocket, Any, AcceptCallback, tuple[Any, ...]], None]

logger: Final = logging.getLogger("trio_evlisten")

#: How many connections one wake-up of the accept task takes at most before
#: it goes back to the scheduler, so a flood of connects cannot starve the
#: handlers that serve them.
ACCEPT_BATCH: Final = 64


@attrs.define(eq=False)
class Acceptor:
    """The accept task of one listener, and what it keeps between wake-ups."""

    #: The listener, as the error callback's first argument.
    _owner: object
    _lsock: ListeningSocket
    _state: ListenerState
    #: Takes a connection just accepted (and admitted) to its handler.
    _start: StartHandler
    _log: GroupedLog = attrs.field(init=False)
    _where: object = attrs.field(init=False)
    accepted: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    retried: int = attrs.field(default=0, init=False)
    backoff: Backoff = attrs.field(factory=Backoff, init=False)
    _waiter: trio.CancelScope | None = attrs.field(default=None, init=False)
    #: Counts (and logs) each time accepting stops for capacity or rate.
    _shed: Shedding | None = attrs.field(default=None, kw_only=True)
    # Why the accept task last stopped (None: it accepted since).
    _stopped: Verdict | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._where = where = self._lsock.std.getsockname()
        self._log = GroupedLog(logger, f"accept() on {where!r} failed", "accept_errors")

    def wake(self) -> None:
        """Make a parked accept task re-read the state (Trio thread only)."""
        if self._waiter is not None:
            self._waiter.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The task: loop until the listener closes.

        Resource handling:
            The caller closes the listener when this returns or raises (it
            owns the socket); errors not yet reported are logged here.
        """
        lsock, state = self._lsock, self._state
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                with state.lock:
                    state.pause_over(now)
                    verdict = state.may_accept(now)
                    deadline = state.deadline(verdict, now)
                if verdict is Verdict.CLOSED:
                    return
                if verdict is not ACCEPT:
                    if verdict is not self._stopped:
                        self._stopped = verdict
                        self._count_stop(verdict)
                    # Shut, full, loaded, rate-limited or paused: wait to be
                    # woken; a pause and a rate limit also end by themselves
                    # (then the state forgets the pause, so that
                    # statistics() from any thread sees it over).
                    await self._park(deadline)
                elif lsock.closed_underfoot():
                    self._on_error(
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
                        self._on_error(exc)
                    else:
                        if readable:
                            self._stopped = None
                            self._accept_batch(ACCEPT_BATCH)
        finally:
            self._log.flush(trio.current_time(), final="; listener closed")
            if self._shed is not None:
                self._shed.flush_log("; listener closed")

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

    def _accept_batch(self, limit: int, *, sweeping: bool = False) -> bool:
        """Accept up to ``limit`` connections; return whether the queue emptied.

        Stops early when the state says no, or after an error that pauses.
        """
        std = self._lsock.std
        state, start = self._state, self._start
        now = trio.current_time()
        for _ in range(limit):
            with state.lock:
                if state.may_accept(now, sweeping=sweeping) is not ACCEPT:
                    return False
                try:
                    conn, addr = std.accept()
                except BlockingIOError:
                    return True
                except OSError as exc:
                    error: OSError | None = exc
                else:
                    error = None
                    self.accepted += 1
                    state.admit()
                    cb, args = state.cb, state.args
            if error is not None:
                if self._on_error(error, raising=not sweeping):
                    continue
                return False
            self.backoff.reset()
            assert cb is not None
            start(conn, addr, cb, args)
        return False

    def sweep(self) -> int:
        """Accept, now, what the kernel has queued (for a drain); return how many.

        Synchronous, so that the caller closes the socket in the same step,
        with no checkpoint in between: only a connection that lands in those
        microseconds can be reset. Takes connections until ``accept()``
        finds the queue empty, even on a disabled listener and past
        ``max_connections`` (the state's rules), bounded by ``max_pending``
        and by one queue's worth, so a flood of new arrivals cannot hold the
        drain open. Takes nothing once the socket was handed to a successor
        (:func:`hand_off`: the queue is the successor's then) or closed.
        """
        lsock = self._lsock
        if lsock.handed_off or lsock.closed_underfoot():
            return 0
        queue = accept_queue(lsock.std)
        if queue is None:
            limit = lsock.backlog or BACKLOG_MAX
        elif queue[0]:
            limit = queue[1]
        else:
            # The kernel says the queue is empty: as good an answer as an
            # accept() failing with EAGAIN, and as instant.
            return 0
        before = self.accepted
        self._accept_batch(max(limit, ACCEPT_BATCH), sweeping=True)
        return self.accepted - before

    def _count_stop(self, verdict: Verdict) -> None:
        """Count and log accepting stopping for capacity or the rate limit
        (a pause for load is the load monitor's to count)."""
        shed = self._shed
        if shed is None:
            return
        state = self._state
        if verdict is Verdict.FULL:
            if state.pending >= state.max_pending:
                why = f"{state.pending} pending, max_pending={state.max_pending}"
            else:
                cap = state.max_connections
                why = f"{state.active} handlers running, max_connections={cap}"
            shed.paused(CAPACITY, why)
        elif verdict is Verdict.RATE:
            bucket = state.bucket
            assert bucket is not None
            shed.paused(
                RATE, f"max_accept_rate={bucket.rate:g}/s, accept_burst={bucket.burst}"
            )

    def _on_error(self, exc: OSError, *, raising: bool = True) -> bool:
        """Deal with one failed ``accept()``; return whether to go on at once.

        ``raising=False`` (a drain's sweep, which closes the listener next)
        logs a fatal error instead of raising it.
        """
        kind = classify(exc)
        if kind is ErrorClass.RETRY:
            self.retried += 1
            return True
        self.errors += 1
        delay = self.backoff.next_delay()
        now = trio.current_time()
        state = self._state
        with state.lock:
            # Out of fds: a connection that ends frees one, and ends the pause.
            state.pause(now + delay, fd_wait=exc.errno in FD_ERRNOS)
            error_cb, error_args = state.error_cb, state.error_args
        if error_cb is not None:
            error_cb(self._owner, exc, *error_args)
        elif kind is ErrorClass.RESOURCES or not raising:
            self._log_error(exc, delay, now)
        else:
            raise exc
        return False

    def _log_error(self, exc: OSError, delay: float, now: float) -> None:
        last = f"{exc}, then a {delay:.3f} s pause"
        if self._log.record(errno_name(exc.errno), last, now):
            logger.error(
                "accept() on %r failed: %s; pausing accepts for %.3f s",
                self._where,
                exc,
                delay,
                extra={"accept_errors": 1},
            )
