"""The accept task: wait for the listening socket, accept, hand connections on.

Owns: parking (until readable, woken, or a deadline), accepting in batches,
sorting ``accept()`` errors (with :mod:`._errors`) into retry / back off /
raise, the backoff pause, the grouped error log, and the counters of what it
accepted and what failed.

May not touch: the listener's state (it only *reads* the gate,
:meth:`._gate.Gate.is_open`, under the gate's lock) and what happens
to a connection once accepted (:meth:`._handlers.Handlers.start` takes it).
"""

from __future__ import annotations

import errno
import math
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._errors import FD_ERRNOS, Backoff, ErrorClass, ErrorLog, classify

if TYPE_CHECKING:
    from ._listener import ConnListener

#: How many connections one wake-up of the accept task takes at most before
#: it goes back to the scheduler, so a flood of connects cannot starve the
#: handlers that serve them.
ACCEPT_BATCH: Final = 64


@attrs.define(eq=False)
class Acceptor:
    """The accept task of one listener, and what it keeps between wake-ups."""

    _listener: ConnListener
    _error_log: ErrorLog
    accepted: int = attrs.field(default=0, init=False)
    errors: int = attrs.field(default=0, init=False)
    retried: int = attrs.field(default=0, init=False)
    backoff: Backoff = attrs.field(factory=Backoff, init=False)
    #: When the pause after an error ends (``-inf``: no pause).
    resume_at: float = attrs.field(default=-math.inf, init=False)
    # Paused by EMFILE/ENFILE: a handler that finishes ends the pause.
    _fd_wait: bool = attrs.field(default=False, init=False)
    _waiter: trio.CancelScope | None = attrs.field(default=None, init=False)

    def wake(self) -> None:
        """Make a parked accept task re-read the state (Trio thread only)."""
        if self._waiter is not None:
            self._waiter.cancel()

    def slot_freed(self) -> bool:
        """A handler finished: end an out-of-fds pause; return whether one ended.

        Called under the listener's lock.
        """
        if not self._fd_wait:
            return False
        self._fd_wait = False
        self.resume_at = -math.inf
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The task: loop until the listener closes (closing it on the way out)."""
        listener = self._listener
        lsock, gate, handlers = listener._lsock, listener._gate, listener._handlers
        task_status.started()
        try:
            while True:
                with gate.lock:
                    if gate.closed:
                        return
                    gate_open = gate.is_open(handlers.active)
                now = trio.current_time()
                # A grouped error line falls due: log it (no-op otherwise).
                self._error_log.flush(now)
                log_due = self._error_log.due
                if not gate_open:
                    await self._park(log_due)
                elif self.resume_at > now:
                    await self._park(min(self.resume_at, log_due))
                elif lsock.closed_underfoot():
                    self._on_error(
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
                        self._on_error(exc)
                    else:
                        if readable:
                            self._accept_batch()
        finally:
            # However the accept task ends (closed, an error, cancelled), the
            # listener is closed with it, and errors not yet reported are.
            listener.close()
            self._error_log.flush(trio.current_time(), final=True)

    async def _park(self, deadline: float, *, readable: bool = False) -> bool:
        """Wait until woken, ``deadline``, or (if asked) the socket is readable.

        Returns whether the socket became readable.
        """
        with trio.CancelScope(deadline=deadline) as scope:
            self._waiter = scope
            try:
                if readable:
                    await trio.lowlevel.wait_readable(self._listener._lsock.std)
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
        listener = self._listener
        std = listener._lsock.std
        gate, handlers = listener._gate, listener._handlers
        for _ in range(ACCEPT_BATCH):
            with gate.lock:
                if not gate.is_open(handlers.active):
                    return
                try:
                    conn, addr = std.accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    error: OSError | None = exc
                else:
                    error = None
                    self.accepted += 1
                    handlers.active += 1
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
        listener = self._listener
        error_cb, error_args = listener._gate.error_cb, listener._gate.error_args
        if error_cb is not None:
            error_cb(listener, exc, *error_args)
        elif kind is ErrorClass.RESOURCES:
            self._error_log.error(exc, delay, now)
        else:
            raise exc
        return False
