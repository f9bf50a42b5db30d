"""The listener's state, every transition of it, and the gate it makes.

Owns: enabled, closed, the callbacks and their arguments, the cap on running
handlers, and the thread rules (``THREADSAFE``'s lock and the wake-ups sent
to the accept task). :class:`ConnListener` is the public face of this object;
the accept task only reads :meth:`Gate.is_open`, under :attr:`Gate.lock`.

May not touch: sockets, tasks or counters: closing calls ``release`` (which
the listener supplies) and waking calls ``wake`` (the accept task's).

State rules, all kept here and nowhere else:

* ``closed`` is terminal; :meth:`Gate.close` reaches it from any state, from
  any task, callback, or (with ``THREADSAFE``) thread.
* The gate is open, and ``accept()`` may be called, exactly when the
  listener is not closed, is enabled (or a drain is sweeping the queue), has
  a callback, has room (:meth:`._handlers.Handlers.has_room`: fewer
  handlers than ``max_connections``, or with a preamble, fewer pending
  connections than ``max_pending``), and (the accept task's own rule) is
  not pausing after an error.
* Capacity is one gate: ``max_connections`` and running out of file
  descriptors (``EMFILE``/``ENFILE``) both wait for a handler to finish. A
  handler that ends wakes the accept task when either held the gate shut;
  after ``EMFILE``/``ENFILE`` the backoff timer is only the upper bound.
* Every change that can open the gate or close the listener wakes the accept
  task, which re-reads the state; a change that shuts the gate needs no wake:
  the gate is re-checked under the lock before every single ``accept()``.
* With ``THREADSAFE`` the state, and each check-then-``accept()``, is guarded
  by one lock, so a ``disable()`` or ``close()`` that returned in any thread
  is obeyed by the very next ``accept()``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._flags import Flag

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    AcceptCallback = Callable[..., Awaitable[object]]
    ErrorCallback = Callable[..., object]


@attrs.define(eq=False)
class Gate:
    """One listener's state; see the module's rules."""

    flags: Flag
    cb: AcceptCallback | None
    args: tuple[Any, ...]
    error_cb: ErrorCallback | None
    error_args: tuple[Any, ...]
    max_connections: int | None
    #: Releases the listening socket (called once, on the Trio thread).
    release: Callable[[], None]
    #: Wakes the accept task (Trio thread only).
    wake: Callable[[], None]
    enabled: bool = attrs.field(init=False)
    closed: bool = attrs.field(default=False, init=False)
    closed_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    lock: contextlib.AbstractContextManager[object] = attrs.field(init=False)
    task_name: str = attrs.field(init=False)
    _thread: int = attrs.field(factory=threading.get_ident, init=False)
    _token: trio.lowlevel.TrioToken = attrs.field(
        factory=trio.lowlevel.current_trio_token, init=False
    )

    def __attrs_post_init__(self) -> None:
        self.enabled = not self.flags & Flag.DISABLED
        self.lock = (
            threading.RLock()
            if self.flags & Flag.THREADSAFE
            else contextlib.nullcontext()
        )
        self.task_name = task_name(self.cb)

    def is_open(self, *, sweeping: bool = False) -> bool:
        """Whether the state lets ``accept()`` be called (capacity aside).

        ``sweeping``: a drain is taking what the kernel queued, which a
        disabled listener does too. Called under :attr:`lock`.
        """
        return not self.closed and (self.enabled or sweeping) and self.cb is not None

    # ------------------------------------------------------------------
    # Transitions: each checks the thread, changes state under the lock,
    # and wakes the accept task if the gate may have opened.

    def set_enabled(self, enabled: bool) -> None:
        method = "enable" if enabled else "disable"
        self.check_thread(method)
        with self.lock:
            self.check_open(method)
            self.enabled = enabled
        # Disabling needs no wake: the gate is checked before every accept(),
        # and a task parked in wait_readable will find it shut when it wakes.
        if enabled:
            self._wake_threadsafe()

    def set_cb(self, cb: AcceptCallback | None, args: tuple[Any, ...]) -> None:
        self.check_thread("set_cb")
        with self.lock:
            self.check_open("set_cb")
            self.cb, self.args = cb, args
            self.task_name = task_name(cb)
        if cb is not None:
            self._wake_threadsafe()

    def set_error_cb(
        self, error_cb: ErrorCallback | None, args: tuple[Any, ...]
    ) -> None:
        self.check_thread("set_error_cb")
        with self.lock:
            self.check_open("set_error_cb")
            self.error_cb, self.error_args = error_cb, args

    def set_max_connections(self, max_connections: int | None) -> None:
        self.check_thread("set_max_connections")
        with self.lock:
            self.check_open("set_max_connections")
            self.max_connections = max_connections
        self._wake_threadsafe()

    def close(self) -> None:
        on_trio_thread = self.check_thread("close")
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if on_trio_thread:
            self._release()
        else:
            self._run_on_trio_thread(self._release)

    def _release(self) -> None:
        self.wake()
        self.release()
        self.closed_event.set()

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

    def check_open(self, method: str) -> None:
        if self.closed:
            raise trio.ClosedResourceError(
                f"ConnListener.{method}() called on a closed listener"
            )

    def _run_on_trio_thread(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn)

    def _wake_threadsafe(self) -> None:
        if threading.get_ident() == self._thread:
            self.wake()
        else:
            self._run_on_trio_thread(self.wake)


def task_name(cb: object) -> str:
    """The name handler tasks get, for trio's task tree and tracebacks."""
    name = getattr(cb, "__qualname__", None) or type(cb).__qualname__
    return f"trio_evlisten handler {name}"
