"""Protocol mode's engine: one task per listener serves every connection.

Owns: the task that waits for the listener's connections in protocol mode
and calls their transports (:mod:`._transport`) when their sockets are
ready; each connection's start (the protocol factory, ``connection_made``)
and end (``connection_lost``, closing the socket, the counts the host and
the runner keep); what a protocol's exception means (the connection is
aborted, the error counted and logged, or raised with
``handler_errors="raise"``); aborting every connection when the task is
cancelled (the end of a drain's grace, the listener's nursery cancelled);
the tasks a connection starts (``Transport.start_task``) or is handed to
(``Transport.hand_over``), which hold its slot until the last one ends.

Two engines, one behaviour:

* :class:`EpollEngine`, where ``select.epoll`` exists: an epoll fd of its own,
  which the task awaits with :func:`trio.lowlevel.wait_readable` (an epoll
  fd is readable while any fd in it is ready). Each wake takes up to
  :data:`BATCH` ready connections from ``epoll.poll(0)``, serves each with
  plain calls (one read, the protocol's callback, the writes it makes), and
  checkpoints: ``wait_readable`` when nothing is ready, a bare
  :func:`trio.lowlevel.checkpoint` when a look (``poll(0)``) found more work.
  Either way other tasks run between batches, and a cancellation lands
  there. Level-triggered, as
  asyncio's selectors and libevent by default: a connection with more
  data than one read takes stays ready and is served again next wake, with
  no list of our own to keep (edge-triggered would need one, to be fair
  under a bounded batch); ``pause_reading`` is removing ``EPOLLIN``.
* :class:`TaskEngine`, the fallback where there is no epoll (kqueue is not
  done yet): a task per connection waits on its socket with Trio's own
  ``wait_readable``/``wait_writable`` and calls the same transport methods.
  It costs a task per connection, which is what protocol mode saves, but
  the protocol sees the same calls in the same order; the tests run under
  both (the ``engine`` fixture in tests/test_protocol.py).

May not touch: the listener's counts (it tells the host a connection ended
through ``done``, and bumps the runner's public counters as a handler's end
would), the accept decision, or the transport's own state (it calls the
transport's methods).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._connection import close
from ._tls_transport import TLSTransport
from ._transport import READ, WRITE, Transport

if TYPE_CHECKING:
    from collections.abc import Callable
    from socket import socket as StdSocket

    from ._connection import ConnectionRunner
    from ._state import ListenerState
    from ._tls_transport import TLSSession

logger: Final = logging.getLogger("trio_evlisten")

#: At most this many ready connections are served per wake of the engine
#: before it checkpoints, so one listener's burst cannot starve other tasks.
BATCH: Final = 64

#: Serving one connection's events for longer than this logs a WARNING, as
#: asyncio's debug mode reports a slow callback (``slow_callback_duration``).
SLOW_CALLBACK: Final = 0.1

#: Which engine a listener gets: ``"epoll"`` where ``select.epoll`` exists,
#: else ``"tasks"``. The tests set it to run under both.
ENGINE: str = "epoll" if hasattr(select, "epoll") else "tasks"

_EPOLLIN: Final = getattr(select, "EPOLLIN", READ)
_EPOLLOUT: Final = getattr(select, "EPOLLOUT", WRITE)
_EPOLLERR: Final = getattr(select, "EPOLLERR", 8)
_EPOLLHUP: Final = getattr(select, "EPOLLHUP", 16)
# The events that mean "call the reader" and "call the writer": an error or
# a hang-up goes to whichever is registered, which then meets it in its
# system call.
_READ_EVENTS: Final = _EPOLLIN | _EPOLLERR | _EPOLLHUP
_WRITE_EVENTS: Final = _EPOLLOUT | _EPOLLERR | _EPOLLHUP
assert (_EPOLLIN, _EPOLLOUT) == (READ, WRITE), "the transport speaks epoll's values"


def _check_slow(transport: Transport, took: float) -> None:
    """Warn if serving ``transport`` took longer than :data:`SLOW_CALLBACK`."""
    if took > SLOW_CALLBACK:
        logger.warning(
            "serving %r took %.3f seconds: protocol callbacks run one after "
            "another in the listener's task, so every other connection "
            "waited that long; move slow work to a task",
            transport,
            took,
        )


@attrs.define(eq=False)
class Engine:
    """What both engines share: starting, finishing and aborting connections."""

    #: The listener, for :attr:`Transport.listener`.
    listener: Any
    _state: ListenerState
    _runner: ConnectionRunner
    _raise_errors: bool
    #: Tells the host a connection (holding a slot) ended; set by the host.
    done: Callable[[], None] = attrs.field(default=lambda: None, init=False)
    #: The live connections, by fd.
    transports: dict[int, Transport] = attrs.field(factory=dict, init=False)
    # What to call, by fd, when a connection is lost, besides done(): its
    # client's count (max_connections_per_client). Empty without that option.
    _on_lost: dict[int, Callable[[], None]] = attrs.field(factory=dict, init=False)
    # An error to raise out of the engine's task (handler_errors="raise"),
    # met where it could not be raised (in the accept task).
    _error: BaseException | None = attrs.field(default=None, init=False)
    #: Starts ``async_fn(*args)`` where the listener's handlers run (the
    #: host's nursery); set by the host. For start_task and hand_over.
    spawn: Callable[..., None] | None = attrs.field(default=None, init=False)
    # Connections whose slot something besides the engine holds (tasks of
    # start_task, a handed-over handler): how many such holders each has.
    _holders: dict[Transport, int] = attrs.field(factory=dict, init=False)
    # Lost connections whose slot waits for their holders: the on_lost to
    # call then (None without max_connections_per_client).
    _parked: dict[Transport, Callable[[], None] | None] = attrs.field(
        factory=dict, init=False
    )
    # Connections being handed over: (async_fn, args, data, unsent bytes).
    _handing: dict[Transport, tuple[Any, tuple[Any, ...], bytes, bytes]] = attrs.field(
        factory=dict, init=False
    )

    def register(
        self,
        sock: StdSocket,
        addr: Any,
        factory: Callable[[], Any],
        on_lost: Callable[[], None] | None = None,
        tls: TLSSession | None = None,
    ) -> None:
        """Serve ``sock`` with a new protocol from ``factory`` (a slot is held).

        ``on_lost`` is called once when the connection ends, before the slot
        is given back (the host's per-client count). ``tls``: the session
        of a handshake done in the preamble; the protocol then speaks
        through a :class:`~._tls_transport.TLSTransport`.

        Error handling:
            A factory or ``connection_made`` that raises ends this connection
            only (counted and logged as a handler error, or raised from the
            engine's task with ``handler_errors="raise"``).

        Resource handling:
            From here on the engine owns ``sock`` and the slot: both are
            given back when the connection is lost.
        """
        try:
            sock.setblocking(False)
            protocol = factory()
        except Exception as exc:
            close(sock)
            try:
                self._count(exc, True, addr)
            except Exception as to_raise:
                self._error = to_raise
                self.wake()
            finally:
                if on_lost is not None:
                    on_lost()
                self.done()
            return
        if tls is None:
            transport = Transport(self, sock, addr, protocol)
        else:
            transport = TLSTransport(self, sock, addr, protocol, tls)
        self.transports[transport._fd] = transport
        if on_lost is not None:
            self._on_lost[transport._fd] = on_lost
        self._start(transport)
        try:
            protocol.connection_made(transport)
        except Exception as exc:
            transport._failed(exc)
            return
        if isinstance(transport, TLSTransport):
            transport._started()

    def _start(self, transport: Transport) -> None:
        transport._update()

    def set_events(self, transport: Transport, want: int) -> None:
        """Wait for ``want`` (READ, WRITE) on ``transport``'s socket from now on."""
        raise NotImplementedError

    def lose_soon(self, transport: Transport) -> None:
        """``transport`` is lost: finish it soon, outside the current callback."""
        raise NotImplementedError

    def wake(self) -> None:
        """Make the engine's task look again (at its errors, and whether to end)."""
        raise NotImplementedError

    def _done_serving(self) -> bool:
        state = self._state
        return state.closed and state.idle and not self.transports

    def _serve_one(self, transport: Transport, ready: int) -> None:
        """Call ``transport``'s reader and writer for the events ``ready``."""
        began = time.monotonic()
        if ready & _READ_EVENTS and transport._mask & READ:
            transport._read_ready()
        if ready & _WRITE_EVENTS and transport._mask & WRITE:
            transport._write_ready()
        _check_slow(transport, time.monotonic() - began)

    def _finish(self, transport: Transport, *, counted: bool = True) -> None:
        """Close a lost connection, tell its protocol, count it, free its slot.

        Raises:
            Exception: the protocol's error, with ``handler_errors="raise"``
                (``counted`` only).
        """
        exc, error, protocol = transport._finish()
        fd = transport._fd
        on_lost = None
        transports = self.transports
        if transports.get(fd) is transport:
            del transports[fd]
            on_lost = self._on_lost.pop(fd, None)
            if not transports:
                # A dict never shrinks by deleting: give back the table a
                # burst of connections grew (the soak test measures it).
                transports.clear()
                self._on_lost.clear()
        handing = self._handing.pop(transport, None)
        if handing is None or not counted:
            self._close(transport._sock)
            handing = None
        try:
            try:
                protocol.connection_lost(exc)
            except Exception as lost_error:
                if error:
                    logger.debug(
                        "connection_lost of %r raised too", protocol, exc_info=True
                    )
                else:
                    exc, error = lost_error, True
            if handing is not None and not error:
                # The handler's end is the connection's end, counted there.
                self._start_handed(transport, *handing)
                handing = None
            elif counted:
                self._count(exc, error, transport._addr)
        finally:
            if handing is not None:
                # connection_lost raised: counted above, the handler never runs.
                close(transport._sock)
            self._give_back(transport, on_lost)

    def _give_back(
        self, transport: Transport, on_lost: Callable[[], None] | None
    ) -> None:
        """Give back a lost connection's slot, or park it for its holders."""
        if transport in self._holders:
            self._parked[transport] = on_lost
            return
        try:
            if on_lost is not None:
                on_lost()
        finally:
            self.done()

    # ------------------------------------------------------------------
    # Tasks beside the connection (Transport.start_task, hand_over)

    def _hold(self, transport: Transport) -> None:
        self._holders[transport] = self._holders.get(transport, 0) + 1

    def _release(self, transport: Transport) -> None:
        """One holder of ``transport``'s slot is done; the last gives it back."""
        left = self._holders[transport] - 1
        if left:
            self._holders[transport] = left
            return
        del self._holders[transport]
        if transport in self._parked:
            self._give_back(transport, self._parked.pop(transport))

    def start_task(
        self, transport: Transport, async_fn: Any, args: tuple[Any, ...]
    ) -> None:
        """Run ``async_fn(*args)`` beside the handlers, holding ``transport``'s slot."""
        assert self.spawn is not None
        self._hold(transport)
        try:
            self.spawn(self._run_task, transport, async_fn, args)
        except BaseException:
            self._release(transport)
            raise

    async def _run_task(
        self, transport: Transport, async_fn: Any, args: tuple[Any, ...]
    ) -> None:
        try:
            await async_fn(*args)
        except Exception as exc:
            if self._state.cancelling:
                # It failed while a drain cancelled it: the drain's doing.
                logger.debug("task of %r raised once drained", transport, exc_info=True)
            elif transport._lost is None:
                # Its connection ends with the error: counted (or raised)
                # once, as the connection's end, by _finish.
                transport._failed(exc)
            else:
                self._runner.count_error(exc, transport._addr)
                if self._raise_errors:
                    raise
        finally:
            self._release(transport)

    def hand_over(
        self,
        transport: Transport,
        async_fn: Any,
        args: tuple[Any, ...],
        data: bytes,
        unsent: bytes,
    ) -> None:
        """Note that ``transport``, about to be lost, goes to a handler instead."""
        self._handing[transport] = (async_fn, args, data, unsent)

    def _start_handed(
        self,
        transport: Transport,
        async_fn: Any,
        args: tuple[Any, ...],
        data: bytes,
        unsent: bytes,
    ) -> None:
        assert self.spawn is not None
        sock = transport._sock
        self._hold(transport)
        try:
            self.spawn(self._run_handed, transport, async_fn, args, data, unsent)
        except BaseException:
            close(sock)
            self._release(transport)
            raise

    async def _run_handed(
        self,
        transport: Transport,
        async_fn: Any,
        args: tuple[Any, ...],
        data: bytes,
        unsent: bytes,
    ) -> None:
        runner = self._runner
        sock = transport._sock
        try:
            await runner.run(
                sock,
                None,
                transport._addr,
                _call_handed,
                (async_fn, data, unsent, *args),
            )
        finally:
            self._release(transport)

    def _close(self, sock: StdSocket) -> None:
        """Close a lost connection's socket; never raises."""
        close(sock)

    def _count(self, exc: BaseException | None, error: bool, addr: Any) -> None:
        """Count how a connection ended, as a handler's end is counted."""
        runner = self._runner
        if not error:
            runner.finished += 1
        elif self._state.cancelling:
            logger.debug("protocol for %r raised once drained", addr, exc_info=exc)
        else:
            assert isinstance(exc, Exception)
            runner.count_error(exc, addr)
            if self._raise_errors:
                raise exc

    def _abort(self, transport: Transport) -> None:
        """Abort one connection because the engine's task is ending (cancelled)."""
        if transport._lost is None:
            transport._lost = (None, False)
            transport._closing = True
        try:
            self._finish(transport, counted=False)
        except Exception:
            logger.debug("aborting %r raised", transport, exc_info=True)


@attrs.define(eq=False)
class EpollEngine(Engine):
    """One task, one epoll fd, every connection of the listener."""

    _epoll: Any = attrs.field(default=None, init=False)
    # An eventfd in the epoll set: how a call from outside a callback (the
    # accept task, another task) wakes the engine to finish a connection.
    _wake_fd: int = attrs.field(default=-1, init=False)
    _woken: bool = attrs.field(default=False, init=False)
    # Inside _serve: lost connections are finished before it returns.
    _serving: bool = attrs.field(default=False, init=False)
    _soon: collections.deque[Transport] = attrs.field(
        factory=collections.deque, init=False
    )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the listener's connections until it is closed and idle.

        Resource handling:
            Makes and closes the epoll fd and the eventfd. Cancelled (a
            drain's grace is over, the nursery is cancelled), it aborts every
            connection: each protocol gets ``connection_lost(None)``, each
            socket is closed, each slot given back.
        """
        epoll = self._epoll = select.epoll()
        try:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            epoll.register(self._wake_fd, select.EPOLLIN)
            task_status.started()
            poll = epoll.poll
            # Connections found ready after the last batch was served.
            ready: list[tuple[int, int]] = []
            while True:
                if self._soon:
                    self._serving = True
                    try:
                        self._finish_soon()
                    finally:
                        self._serving = False
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._done_serving():
                    return
                # HOT PATH (rt, bulk): when a look after the last batch
                # found connections ready, a bare checkpoint is enough:
                # wait_readable would cost Trio an epoll_ctl (its one-shot
                # re-arm), a wait and its bookkeeping on top of the same
                # scheduler pass. The look is one epoll_wait(0), wasted only
                # when nothing is ready.
                if ready:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(epoll)
                # Polled again after the checkpoint: other tasks ran and may
                # have closed connections whose fds are now reused.
                self._serve(poll(0, BATCH))
                ready = poll(0, 1)
        except BaseException:
            self._serving = True  # no more wakes: the eventfd is closing
            for transport in list(self.transports.values()):
                self._abort(transport)
            self._soon.clear()
            raise
        finally:
            self._epoll = None
            trio.lowlevel.notify_closing(epoll)
            epoll.close()
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1

    def _serve(self, events: list[tuple[int, int]]) -> None:
        # HOT PATH (rt): _serve_one inlined, and one clock read per
        # connection: each one's time runs from the previous one's end.
        transports = self.transports
        clock = time.monotonic
        self._serving = True
        try:
            began = clock()
            for fd, ready in events:
                transport = transports.get(fd)
                if transport is None:
                    if fd == self._wake_fd:
                        self._woken = False
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                    continue
                if ready & _READ_EVENTS and transport._mask & READ:
                    transport._read_ready()
                if ready & _WRITE_EVENTS and transport._mask & WRITE:
                    transport._write_ready()
                if self._soon:
                    self._finish_soon()
                now = clock()
                if now - began > SLOW_CALLBACK:
                    _check_slow(transport, now - began)
                began = now
        finally:
            self._serving = False

    def _finish_soon(self) -> None:
        soon = self._soon
        while soon:
            self._finish(soon.popleft())

    def _close(self, sock: StdSocket) -> None:
        if self._state.preamble:
            # Its preamble's task waited on it through Trio's own epoll.
            close(sock)
            return
        # HOT PATH (rate): Trio never waited on this socket, which lives in
        # our epoll only, so trio.lowlevel.notify_closing is skipped: it
        # would cost Trio a failing epoll_ctl and an exception per
        # connection (python -m benchmarks --workloads rate --py-spy DIR).
        try:
            sock.close()
        except OSError:
            logger.debug("closing %r failed", sock, exc_info=True)

    def set_events(self, transport: Transport, want: int) -> None:
        epoll = self._epoll
        old, transport._mask = transport._mask, want
        if epoll is None:
            return
        try:
            if not old:
                epoll.register(transport._fd, want)
            elif not want:
                epoll.unregister(transport._fd)
            else:
                epoll.modify(transport._fd, want)
        except OSError as exc:
            # The fd was closed behind the socket's back (EBADF, ENOENT).
            transport._mask = 0
            transport._lose(exc)

    def lose_soon(self, transport: Transport) -> None:
        self._soon.append(transport)
        if not self._serving:
            self.wake()

    def wake(self) -> None:
        if not self._woken and self._wake_fd >= 0:
            self._woken = True
            os.eventfd_write(self._wake_fd, 1)


@attrs.define(eq=False)
class TaskEngine(Engine):
    """The fallback: a task per connection drives the same transport."""

    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the connections' tasks until the listener is closed and idle."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._done_serving():
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()

    def _start(self, transport: Transport) -> None:
        assert self._nursery is not None
        transport._update()
        self._nursery.start_soon(self._drive, transport)

    async def _drive(self, transport: Transport) -> None:
        sock = transport._sock
        try:
            while transport._lost is None:
                mask = transport._mask
                ready = 0
                with trio.CancelScope() as scope:
                    transport._driver = scope
                    try:
                        if mask == READ:
                            await trio.lowlevel.wait_readable(sock)
                            ready = _EPOLLIN
                        elif mask == WRITE:
                            await trio.lowlevel.wait_writable(sock)
                            ready = _EPOLLOUT
                        elif mask:
                            ready = await _wait_either(sock)
                        else:
                            await trio.sleep_forever()
                    finally:
                        transport._driver = None
                if ready:
                    self._serve_one(transport, ready)
            self._finish(transport)
        except BaseException:
            if self.transports.get(transport._fd) is transport:
                self._abort(transport)
            raise

    def set_events(self, transport: Transport, want: int) -> None:
        transport._mask = want
        if transport._driver is not None:
            transport._driver.cancel()

    def lose_soon(self, transport: Transport) -> None:
        if transport._driver is not None:
            transport._driver.cancel()

    def wake(self) -> None:
        self._wakeup.set()


async def _call_handed(
    listener: object,
    stream: Any,
    addr: object,
    async_fn: Any,
    data: bytes,
    unsent: bytes,
    *args: Any,
) -> None:
    """A handed-over connection's handler: the protocol's unsent bytes, then
    ``async_fn``."""
    if unsent:
        await stream.send_all(unsent)
    await async_fn(stream, data, *args)


async def _wait_either(sock: StdSocket) -> int:
    """Wait until ``sock`` is readable or writable; return which (epoll bits)."""
    ready = 0

    async with trio.open_nursery() as nursery:

        async def wait(fn: Callable[[StdSocket], Any], bit: int) -> None:
            nonlocal ready
            await fn(sock)
            ready |= bit
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, trio.lowlevel.wait_readable, _EPOLLIN)
        nursery.start_soon(wait, trio.lowlevel.wait_writable, _EPOLLOUT)
    return ready


def make_engine(
    listener: Any,
    state: ListenerState,
    runner: ConnectionRunner,
    raise_errors: bool,
) -> EpollEngine | TaskEngine:
    """The engine for one listener in protocol mode (see :data:`ENGINE`)."""
    if ENGINE == "epoll":
        return EpollEngine(listener, state, runner, raise_errors)
    if ENGINE == "tasks":
        return TaskEngine(listener, state, runner, raise_errors)
    raise ValueError(f"ENGINE must be 'epoll' or 'tasks', not {ENGINE!r}")


def prepare_for_protocols(listening: StdSocket) -> None:
    """Set ``TCP_NODELAY`` on the listening socket, for accepted ones to inherit.

    As asyncio's transports set it on every TCP connection (Linux copies it
    from the listening socket, sparing a system call per connection; where
    it does not, Nagle stays on, which costs latency, not correctness). Not
    ``TCP_NOTSENT_LOWAT``, which task mode's stream sets: it makes the kernel
    refuse a non-blocking ``send()`` past a few KiB of unsent data, so a bulk
    write would take many more system calls than asyncio's.
    """
    if listening.family in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
        try:
            listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            logger.debug("TCP_NODELAY refused on %r", listening, exc_info=True)
