"""The accept task: wait for the listening socket, accept, hand connections on.

Owns: parking (until readable, woken, or a deadline), accepting in batches,
sorting ``accept()`` errors (with :mod:`._errors`) into retry / back off /
raise, the backoff pause, the grouped error logs (it flushes them when they
fall due), the drain's final sweep of the kernel's queue, and the counters of
what it accepted and what failed.

May not touch: the listener's state (it only *reads* the gate,
:meth:`._gate.Gate.is_open`, and the room for one more connection,
:meth:`._handlers.Handlers.has_room`, under the gate's lock) and what happens
to a connection once accepted (:meth:`._handlers.Handlers.start` takes it).
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._backlog import BACKLOG_MAX, accept_queue
from ._errors import FD_ERRNOS, Backoff, ErrorClass, GroupedLog, classify, errno_name

if TYPE_CHECKING:
    from ._gate import Gate
    from ._handlers import Handlers
    from ._socket import ListeningSocket

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
    _gate: Gate
    _handlers: Handlers
    #: The handlers' grouped error log: flushed by this task when due.
    _handler_log: GroupedLog
    _log: GroupedLog = attrs.field(init=False)
    _where: object = attrs.field(init=False)
    accepted: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    retried: int = attrs.field(default=0, init=False)
    backoff: Backoff = attrs.field(factory=Backoff, init=False)
    #: When the pause after an error ends (``-inf``: no pause).
    resume_at: float = attrs.field(default=-math.inf, init=False)
    # Paused by EMFILE/ENFILE: a handler that finishes ends the pause.
    _fd_wait: bool = attrs.field(default=False, init=False)
    _waiter: trio.CancelScope | None = attrs.field(default=None, init=False)
    # While drain() sweeps the queue: set when the queue was found empty.
    _sweep: trio.Event | None = attrs.field(default=None, init=False)
    _sweep_left: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._where = where = self._lsock.std.getsockname()
        self._log = GroupedLog(logger, f"accept() on {where!r} failed", "accept_errors")

    def wake(self) -> None:
        """Make a parked accept task re-read the state (Trio thread only)."""
        if self._waiter is not None:
            self._waiter.cancel()

    def slot_freed(self) -> bool:
        """A handler finished: end an out-of-fds pause; return whether one ended.

        Called under the gate's lock.
        """
        if not self._fd_wait:
            return False
        self._fd_wait = False
        self.resume_at = -math.inf
        return True

    async def sweep(self, limit: int) -> None:
        """Accept what the kernel has queued (for ``drain()``), then return.

        Takes connections until ``accept()`` finds the queue empty, or after
        ``limit`` of them (so a flood cannot keep a draining listener open),
        even from a disabled listener; the capacity gate still applies, so
        the caller bounds the wait. Returns at once if the listener is
        closed or the accept task is not running.
        """
        with self._gate.lock:
            if self._gate.closed or self._gate.cb is None:
                return
        if self._sweep is None:
            self._sweep = trio.Event()
            self._sweep_left = limit
            self.wake()
        await self._sweep.wait()

    def queued(self) -> int:
        """How many queued connections a drain takes: those queued now.

        Read from ``TCP_INFO``; where that is unknown (a Unix socket), up to
        one full queue. None once the socket was handed to a successor
        (:func:`hand_off`: the queue is the successor's then) or closed.
        """
        lsock = self._lsock
        if lsock.handed_off or lsock.closed_underfoot():
            return 0
        queue = accept_queue(lsock.std)
        if queue is not None:
            return queue[0]
        return lsock.backlog or BACKLOG_MAX

    def _end_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.set()
            self._sweep = None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The task: loop until the listener closes (closing it on the way out)."""
        lsock, gate, handlers = self._lsock, self._gate, self._handlers
        task_status.started()
        try:
            while True:
                with gate.lock:
                    if gate.closed:
                        return
                    if gate.cb is None:
                        # Nothing could serve what is queued: a drain's sweep
                        # ends here (the connections wait for the close).
                        self._end_sweep()
                    sweeping = self._sweep is not None
                    gate_open = gate.is_open(sweeping=sweeping) and handlers.has_room()
                now = trio.current_time()
                # A grouped error line falls due: log it (no-op otherwise).
                self._log.flush(now)
                self._handler_log.flush(now)
                log_due = min(self._log.due, self._handler_log.due)
                if not gate_open:
                    await self._park(log_due)
                elif self.resume_at > now:
                    await self._park(min(self.resume_at, log_due))
                elif lsock.closed_underfoot():
                    self._end_sweep()  # nothing is queued on a closed socket
                    self._on_error(
                        OSError(
                            errno.EBADF,
                            "the listening socket was closed under the listener",
                        )
                    )
                elif sweeping:
                    # Draining: take what is queued now, without waiting for
                    # readability (an empty queue ends the sweep).
                    self._accept_batch()
                    await trio.lowlevel.checkpoint()
                else:
                    try:
                        readable = await self._park(log_due, readable=True)
                    except OSError as exc:
                        # epoll refused the fd (EBADF: closed behind trio's
                        # back): an accept error like any other.
                        self._on_error(exc)
                    else:
                        if readable:
                            self._accept_batch()
        finally:
            # However the accept task ends (closed, an error, cancelled), the
            # listener is closed with it, and errors not yet reported are.
            gate.close()
            self._end_sweep()
            self._log.flush(trio.current_time(), final="; listener closed")

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

    def _accept_batch(self) -> None:
        std = self._lsock.std
        gate, handlers = self._gate, self._handlers
        sweeping = self._sweep is not None
        for _ in range(ACCEPT_BATCH):
            with gate.lock:
                if not (gate.is_open(sweeping=sweeping) and handlers.has_room()):
                    return
                try:
                    conn, addr = std.accept()
                except BlockingIOError:
                    if sweeping:
                        self._end_sweep()
                    return
                except OSError as exc:
                    error: OSError | None = exc
                else:
                    error = None
                    self.accepted += 1
                    handlers.admit()
                    cb, args = gate.cb, gate.args
            if error is not None:
                if self._on_error(error):
                    continue
                return
            self.backoff.reset()
            self.resume_at = -math.inf
            self._fd_wait = False
            assert cb is not None
            handlers.start(conn, addr, cb, args)
            if sweeping:
                self._sweep_left -= 1
                if not self._sweep_left:
                    self._end_sweep()
                    return

    def _on_error(self, exc: OSError) -> bool:
        """Deal with one failed ``accept()``; return whether to go on at once."""
        kind = classify(exc)
        if kind is ErrorClass.RETRY:
            self.retried += 1
            return True
        self.errors += 1
        delay = self.backoff.next_delay()
        now = trio.current_time()
        self.resume_at = now + delay
        # Out of fds: a handler that finishes frees one, and ends the pause.
        self._fd_wait = exc.errno in FD_ERRNOS
        gate = self._gate
        error_cb, error_args = gate.error_cb, gate.error_args
        if error_cb is not None:
            error_cb(self._owner, exc, *error_args)
        elif kind is ErrorClass.RESOURCES:
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
