"""One listener's state, its counts, and the one decision: may I accept?

Owns: enabled, closed, draining, the callbacks and their arguments, the caps
(``max_connections``, ``max_pending``), the counts the decision reads
(``active`` handlers, ``pending`` connections), the pause after an
``accept()`` error, and the thread rules (``THREADSAFE``'s lock, which
thread may call what).

Knows nothing of its owner (as h11's ``_state.py``): the other parts ask it
(:meth:`ListenerState.may_accept`) and tell it (:meth:`~ListenerState.admit`,
:meth:`~ListenerState.finished`, :meth:`~ListenerState.pause`, the setters);
it calls none of them back. A transition returns what the caller must do
next (wake the accept task, hand out slots, release the socket), and the
caller does it.

State rules, all kept here and nowhere else, and true:

* ``closed`` is terminal; :meth:`ListenerState.close` reaches it from any
  state, any task, any callback, or (with ``THREADSAFE``) any thread.
* :meth:`ListenerState.may_accept` is the one place that decides whether
  ``accept()`` may be called now. The verdicts, in the order they are
  checked:

  ===========  ==========================================  ==================
  verdict      when                                        the accept task
  ===========  ==========================================  ==================
  ``CLOSED``   closed                                      ends
  ``SHUT``     disabled, or no callback                    waits to be woken
  ``PAUSED``   within the pause after an ``accept()``      waits for
               error                                       ``resume_at``
  ``FULL``     no room: ``pending`` at ``max_pending``, or  waits to be woken
               (without a preamble) ``active`` at
               ``max_connections``
  ``LOADED``   the event loop runs later than              waits to be woken
               ``max_loop_lag`` (``loaded``), or the
               ``allowance`` until the monitor's next
               tick is spent (both kept by
               :class:`._overload.LoopLag`)
  ``RATE``     ``max_accept_rate``'s bucket is empty       waits for the next
                                                           token
                                                           (:meth:`deadline`)
  ``ACCEPT``   otherwise                                   accepts
  ===========  ==========================================  ==================

  A drain's sweep of the kernel's queue (``sweeping=True``) is let through
  a disabled listener, a pause, ``max_connections``, load and the rate
  limit: what completed its TCP handshake is served rather than reset. It
  is bounded instead by ``max_pending``, counting the connections past the
  cap.
* ``LOADED`` and ``RATE`` cost the accept decision one branch when neither
  ``max_loop_lag`` nor ``max_accept_rate`` is set (``throttled`` is False).
* Capacity is one gate: ``max_connections`` and running out of file
  descriptors (``EMFILE``/``ENFILE``) both wait for a handler to finish. A
  connection that ends ends an out-of-fds pause, and says to wake the
  accept task if either held the gate shut; the pause's timer is then only
  an upper bound.
* Every change that can open the gate or close the listener returns True
  ("wake the accept task"); a change that shuts the gate needs no wake: the
  decision is re-made under the lock before every single ``accept()``.
* With ``THREADSAFE`` every read and change of the state, and each
  decide-then-``accept()``, is under one lock, so a ``disable()`` or
  ``close()`` that returned in any thread is obeyed by the very next
  ``accept()``. Without it, a call from another thread is refused.
* ``lameduck`` (a drain's first phase, :mod:`._agent`) changes no verdict:
  the listener accepts as before, and only the agent's reply reads it.
* A connection with a preamble (PROXY header, TLS handshake) is ``pending``
  from accept until its handler may start; it then takes a slot of
  ``max_connections`` in FIFO order (:meth:`~ListenerState.take_slot`,
  :meth:`~ListenerState.slots_to_grant`). Once draining, a slot is never
  waited for: the drain serves what it accepted, past the cap.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._flags import Flag

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._overload import TokenBucket

    AcceptCallback = Callable[..., Awaitable[object]]
    ErrorCallback = Callable[..., object]


class Verdict(enum.Enum):
    """What :meth:`ListenerState.may_accept` decided (see the module's table)."""

    ACCEPT = "accept"
    CLOSED = "closed"
    SHUT = "shut"
    PAUSED = "paused"
    FULL = "full"
    LOADED = "loaded"
    RATE = "rate"


ACCEPT: Final = Verdict.ACCEPT


@attrs.define(eq=False)
class ListenerState:
    """One listener's state and counts; see the module's rules."""

    flags: Flag
    cb: AcceptCallback | None
    args: tuple[Any, ...]
    error_cb: ErrorCallback | None
    error_args: tuple[Any, ...]
    max_connections: int | None
    max_pending: int
    #: Connections have a preamble (PROXY header, TLS handshake), so they
    #: are pending until it is done and take a slot only then.
    preamble: bool
    enabled: bool = attrs.field(init=False)
    closed: bool = attrs.field(default=False, init=False)
    #: Handlers running, each holding a slot (counted from accept when there
    #: is no preamble, so the cap is exact even in a burst).
    active: int = attrs.field(default=0, init=False)
    #: Connections accepted whose handler has not started yet.
    pending: int = attrs.field(default=0, init=False)
    #: When the pause after an ``accept()`` error ends; ``-inf``: no pause.
    resume_at: float = attrs.field(default=-math.inf, init=False)
    # The pause was for EMFILE/ENFILE: a connection that ends frees an fd.
    _fd_pause: bool = attrs.field(default=False, init=False)
    #: Set when a drain's lame duck begins (never unset): the agent says
    #: ``drain``, accepting goes on (see :mod:`._agent`).
    lameduck: bool = attrs.field(default=False, init=False)
    #: Set when a drain begins (never unset).
    draining: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: Set once the drain's grace ran out and it cancels what is left: what
    #: fails from then on is the drain's doing, not a handler's bug.
    cancelling: bool = attrs.field(default=False, init=False)
    #: Set on the Trio thread once the socket is released after a close.
    closed_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    lock: contextlib.AbstractContextManager[object] = attrs.field(init=False)
    #: ``max_loop_lag`` or ``max_accept_rate`` is set: the decision looks
    #: at ``loaded`` and ``bucket`` (else it pays one branch for them).
    throttled: bool = attrs.field(default=False, init=False)
    #: The event loop runs later than ``max_loop_lag`` (set by the monitor).
    loaded: bool = attrs.field(default=False, init=False)
    #: ``max_accept_rate``'s token bucket, or None.
    bucket: TokenBucket | None = attrs.field(default=None, init=False)
    #: How many more connections may be admitted before the load
    #: monitor's next tick (``None``: no such limit); see
    #: :class:`._overload.LoopLag`.
    allowance: int | None = attrs.field(default=None, init=False)
    _thread: int = attrs.field(factory=threading.get_ident, init=False)

    def __attrs_post_init__(self) -> None:
        self.enabled = not self.flags & Flag.DISABLED
        self.lock = (
            threading.RLock()
            if self.flags & Flag.THREADSAFE
            else contextlib.nullcontext()
        )

    # ------------------------------------------------------------------
    # The decision (called under the lock)

    def may_accept(self, now: float, *, sweeping: bool = False) -> Verdict:
        """Whether ``accept()`` may be called now; see the module's table."""
        if self.closed:
            return Verdict.CLOSED
        if self.cb is None or not (self.enabled or sweeping):
            return Verdict.SHUT
        if sweeping:
            cap = self.max_connections
            over = 0 if cap is None else max(self.active - cap, 0)
            return ACCEPT if self.pending + over < self.max_pending else Verdict.FULL
        if self.resume_at > now:
            return Verdict.PAUSED
        if self.pending >= self.max_pending:
            return Verdict.FULL
        cap = self.max_connections
        if not (self.preamble or cap is None or self.active < cap):
            return Verdict.FULL
        if self.throttled:
            if self.loaded or self.allowance == 0:
                return Verdict.LOADED
            bucket = self.bucket
            if bucket is not None and bucket.ready_at(now) > now:
                return Verdict.RATE
        return ACCEPT

    def deadline(self, verdict: Verdict, now: float) -> float:
        """Until when the accept task parks for ``verdict`` if not woken."""
        resume_at = self.resume_at if self.resume_at > now else math.inf
        if verdict is Verdict.RATE and self.bucket is not None:
            return min(resume_at, self.bucket.ready_at(now))
        return resume_at

    def throttle(self, bucket: TokenBucket | None, *, lag: bool) -> None:
        """Turn on the load and rate verdicts (once, before accepting)."""
        self.bucket = bucket
        self.throttled = lag or bucket is not None

    # ------------------------------------------------------------------
    # A connection's counts (called under the lock)

    def admit(self) -> None:
        """Count a connection just accepted; ends any pause after an error."""
        if self.preamble:
            self.pending += 1
        else:
            self.active += 1
        self.resume_at = -math.inf
        self._fd_pause = False
        if self.throttled:
            if self.allowance:
                self.allowance -= 1
            if self.bucket is not None:
                # may_accept() just filled it, at this very ``now``.
                self.bucket.take()

    def take_slot(self, queued: int) -> bool | None:
        """A pending connection's preamble is done: may its handler start?

        ``queued`` connections are already waiting in line for a slot.
        Returns ``None`` if it must wait in line too (it stays pending until
        :meth:`slots_to_grant` counts it in), else True if the accept task
        must be woken (``pending`` was at its bound), else False.
        """
        cap = self.max_connections
        if not self.draining.is_set() and (
            queued or (cap is not None and self.active >= cap)
        ):
            return None
        wake = self.pending >= self.max_pending
        self.pending -= 1
        self.active += 1
        return wake

    def slots_to_grant(self, queued: int) -> int:
        """How many of the ``queued`` connections waiting in line get a slot now.

        They are moved from ``pending`` to ``active``; the caller wakes that
        many. Once draining, all of them (the drain serves them, past the
        cap).
        """
        cap = self.max_connections
        n = queued
        if cap is not None and not self.draining.is_set():
            n = max(min(n, cap - self.active), 0)
        self.active += n
        self.pending -= n
        return n

    def finished(self, *, slot: bool) -> bool:
        """A connection ended (holding a slot or not); return whether to wake.

        Wake the accept task when the connection's end may open the gate:
        it held the cap or the pending bound shut, or it ends a pause for
        want of file descriptors.
        """
        cap = self.max_connections
        wake = self.pending >= self.max_pending
        if slot:
            wake |= cap is not None and self.active >= cap
            self.active -= 1
        else:
            self.pending -= 1
        if self._fd_pause:
            self._fd_pause = False
            self.resume_at = -math.inf
            wake = True
        return wake

    @property
    def idle(self) -> bool:
        """No connection is left, running or pending."""
        return not (self.active or self.pending)

    # ------------------------------------------------------------------
    # The pause after an accept() error (the accept task's)

    def pause(self, until: float, *, fd_wait: bool) -> None:
        """Pause accepting until ``until``; ``fd_wait``: or a connection ends."""
        self.resume_at = until
        self._fd_pause = fd_wait

    def pause_over(self, now: float) -> None:
        """Forget a pause that has run out, so that every thread sees it over."""
        if self.resume_at <= now:
            self.resume_at = -math.inf
            self._fd_pause = False

    @property
    def paused(self) -> bool:
        """Whether accepting is paused after an error (the same on any thread)."""
        return self.resume_at != -math.inf

    # ------------------------------------------------------------------
    # Transitions the user asks for. Each runs under the lock and returns
    # whether the accept task must be woken (the gate may have opened).

    def set_enabled(self, enabled: bool) -> bool:
        self._check_open("enable" if enabled else "disable")
        self.enabled = enabled
        # Disabling needs no wake: the decision is re-made before every
        # accept(), and a task parked in wait_readable finds it shut.
        return enabled

    def set_cb(self, cb: AcceptCallback | None, args: tuple[Any, ...]) -> bool:
        self._check_open("set_cb")
        self.cb, self.args = cb, args
        return cb is not None

    def set_error_cb(
        self, error_cb: ErrorCallback | None, args: tuple[Any, ...]
    ) -> None:
        self._check_open("set_error_cb")
        self.error_cb, self.error_args = error_cb, args

    def set_max_connections(self, max_connections: int | None) -> bool:
        self._check_open("set_max_connections")
        self.max_connections = max_connections
        return True

    def close(self) -> bool:
        """Close; return True the first time (the caller then releases)."""
        if self.closed:
            return False
        self.closed = True
        return True

    def begin_drain(self) -> None:
        self.draining.set()

    def begin_lameduck(self) -> bool:
        """Enter the lame duck; return False if it is too late for one.

        Too late: closed, or a drain already began (its lame duck is over,
        or another drain is in it).
        """
        if self.closed or self.draining.is_set() or self.lameduck:
            return False
        self.lameduck = True
        return True

    # ------------------------------------------------------------------
    # Threads

    def check_thread(self, method: str) -> bool:
        """Return whether we are on the listener's thread, or raise."""
        if threading.get_ident() == self._thread:
            return True
        if self.flags & Flag.THREADSAFE:
            return False
        raise RuntimeError(
            f"ConnListener.{method}() was called from a thread other than the "
            "listener's; open the listener with Flag.THREADSAFE to allow that"
        )

    def _check_open(self, method: str) -> None:
        if self.closed:
            raise trio.ClosedResourceError(
                f"ConnListener.{method}() called on a closed listener"
            )
