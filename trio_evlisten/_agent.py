"""HAProxy's agent check: what the listener tells its balancer, and the lame duck.

Owns: the reply to an agent check, as a pure function of a snapshot of the
listener (:func:`agent_reply`, :func:`weight`); the agent's own small TCP
server (:class:`AgentServer`), which answers every connection with that one
line; and the lame duck (:func:`lame_duck`), the first phase of a drain,
during which the agent says ``drain`` while the listener goes on accepting.

May not touch: the listener's state, except by reading a snapshot of it and
telling it :meth:`._state.ListenerState.begin_lameduck` (through the
listener), nor the accept task (the lame duck only watches its count).

The protocol is HAProxy's (configuration manual, ``agent-check``): HAProxy
connects to ``agent-port``, reads one ASCII line, and applies each word in
it: a weight ``NN%`` (relative to the server's configured weight), ``ready``
/ ``drain`` / ``maint`` (the administrative state), ``up`` / ``down`` /
``fail`` / ``stopped`` (the operational state, the last three optionally
with ``#description``), ``maxconn:N``. A word not sent leaves that setting
as it was, and only the agent can undo what the agent did, so every reply
here states the administrative state in full:

============================  =========================  =====================
the listener                  reply                      HAProxy then
============================  =========================  =====================
serving                       ``up ready NN%``           routes new
                                                         connections, by
                                                         weight
lame duck, draining,          ``drain``                  sends no new
disabled, or no callback                                 connection (except
                                                         persistent ones)
closed (its drain finishing)  ``drain stopped#closed``   marks it DOWN, and
                                                         says it was on
                                                         purpose
============================  =========================  =====================

``NN%`` is the free capacity (:func:`weight`): ``max_connections`` headroom,
and the event loop's lag against ``max_loop_lag`` when that is known, never
below ``1%`` while serving: a weight of 0 is HAProxy's DRAIN, and a listener
that is only full should still get its share when every server is full
(its connections then wait in its backlog, not in a refusal). ``maxconn:N``
is not sent: HAProxy multiplies it by every balancer and backend that checks
the port, the listener already holds what it cannot take in its backlog,
and a value once sent cannot be withdrawn when ``max_connections`` is
removed.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._state import ListenerState

logger: Final = logging.getLogger("trio_evlisten")

#: How long one agent check may take before the agent hangs up on it.
AGENT_TIMEOUT: Final = 2.0
#: Agent checks answered at once; more wait in the agent port's backlog.
AGENT_CONCURRENCY: Final = 16
#: The lame duck ends early once the balancer was told ``drain`` and no
#: connection arrived for this long: what was already on its way has come.
LAMEDUCK_QUIET: Final = 1.0

#: The replies other than a serving one (the module's table).
DRAIN: Final = "drain"
CLOSED: Final = "drain stopped#closed"


@attrs.frozen
class AgentSnapshot:
    """What an agent reply depends on: the listener's state at one moment.

    Attributes:
        closed: the listener is closed (its drain may still be finishing).
        accepting: enabled, with a callback set.
        lameduck: a drain's lame duck has begun.
        draining: a drain has begun (past its lame duck).
        active: handlers running.
        pending: connections accepted whose handler has not started.
        max_connections: the cap on running handlers, or ``None``.
        paused: accepting is paused after an ``accept()`` error.
        loop_lag: how late the event loop runs now, in seconds, if measured.
        max_loop_lag: the lag at which the listener stops accepting, if set.
    """

    closed: bool
    accepting: bool
    lameduck: bool
    draining: bool
    active: int
    pending: int
    max_connections: int | None
    paused: bool = False
    loop_lag: float | None = None
    max_loop_lag: float | None = None


def weight(snapshot: AgentSnapshot) -> int:
    """The free capacity, as HAProxy's weight percentage, 1 to 100.

    The smaller of the ``max_connections`` headroom (running and pending
    connections against the cap) and the loop-lag headroom (lag against
    ``max_loop_lag``); 1 while accepting is paused after an error.
    """
    free = 1.0
    cap = snapshot.max_connections
    if cap is not None:
        free = min(free, 1.0 - (snapshot.active + snapshot.pending) / cap)
    lag, max_lag = snapshot.loop_lag, snapshot.max_loop_lag
    if lag is not None and max_lag is not None and max_lag > 0:
        free = min(free, 1.0 - lag / max_lag)
    if snapshot.paused:
        free = 0.0
    # Rounded down, but not by float noise: 1 - 9/10 is 0.0999...
    return max(1, min(100, math.floor(free * 100 + 1e-9)))


def agent_reply(snapshot: AgentSnapshot) -> str:
    """The agent-check line for ``snapshot`` (without its newline); see the module."""
    if snapshot.closed:
        return CLOSED
    if snapshot.lameduck or snapshot.draining or not snapshot.accepting:
        return DRAIN
    return f"up ready {weight(snapshot)}%"


def snapshot_of(
    state: ListenerState,
    loop_lag: float | None = None,
    max_loop_lag: float | None = None,
) -> AgentSnapshot:
    """Read ``state`` into an :class:`AgentSnapshot` (under its lock)."""
    with state.lock:
        return AgentSnapshot(
            closed=state.closed,
            accepting=state.enabled and state.cb is not None,
            lameduck=state.lameduck,
            draining=state.draining.is_set(),
            active=state.active,
            pending=state.pending,
            max_connections=state.max_connections,
            paused=state.paused,
            loop_lag=loop_lag,
            max_loop_lag=max_loop_lag,
        )


@attrs.define(eq=False)
class AgentServer:
    """A TCP port that answers each connection with :func:`agent_reply`'s line.

    Error handling:
        A check that fails (the balancer hangs up, a reset) or that takes
        over :data:`AGENT_TIMEOUT` is dropped, logged at DEBUG; it never
        affects the listener.

    Resource handling:
        :meth:`bind` makes the socket; :meth:`serve` closes it when it ends
        (cancelled), and :meth:`close` closes a socket never served.
    """

    #: Called for each check: the snapshot to answer from.
    snapshot: Callable[[], AgentSnapshot]
    #: Checks answered with something other than ``up``: the balancer was told.
    told_drain: int = attrs.field(default=0, init=False)
    #: Checks answered in all.
    answered: int = attrs.field(default=0, init=False)
    _sock: socket.socket | None = attrs.field(default=None, init=False)
    _told: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False
    )
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    def stop(self) -> None:
        """End :meth:`serve` (it closes the socket)."""
        self._scope.cancel()

    async def wait_told(self) -> None:
        """Wait until the agent next answers a check with something but ``up``."""
        await self._told.park()

    def bind(self, host: str, port: int) -> None:
        """Bind and listen on ``(host, port)`` (``port=0``: a free one).

        Raises:
            OSError: the bind failed (``EADDRINUSE``, ...); its message
                names the agent port.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(AGENT_CONCURRENCY)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno or errno.EINVAL,
                f"cannot listen on the agent port {host!r}:{port}: "
                f"{exc.strerror or exc}",
            ) from exc
        self._sock = sock

    @property
    def port(self) -> int:
        """The agent's TCP port (the real one after ``port=0``)."""
        assert self._sock is not None
        port: int = self._sock.getsockname()[1]
        return port

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer checks until cancelled; then close the socket."""
        assert self._sock is not None
        listening = trio.socket.from_stdlib_socket(self._sock)
        limiter = trio.Semaphore(AGENT_CONCURRENCY)
        with listening, self._scope:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await limiter.acquire()
                    try:
                        conn, _ = await listening.accept()
                    except OSError as exc:
                        limiter.release()
                        # EMFILE and the like: the agent is best effort, and
                        # a balancer retries at its next interval.
                        logger.debug("agent accept() failed: %s", exc)
                        await trio.sleep(AGENT_TIMEOUT / 10)
                        continue
                    nursery.start_soon(self._answer, conn, limiter)

    async def _answer(
        self, conn: trio.socket.SocketType, limiter: trio.Semaphore
    ) -> None:
        line = agent_reply(self.snapshot())
        try:
            with conn, trio.move_on_after(AGENT_TIMEOUT):
                await conn.send((line + "\n").encode("ascii"))
                self.answered += 1
                if not line.startswith("up"):
                    self.told_drain += 1
                    self._told.unpark_all()
                conn.shutdown(socket.SHUT_WR)
                # Read what the balancer sends (agent-send) until it hangs
                # up: closing with unread bytes would reset the connection,
                # and the reset could overtake the reply.
                while await conn.recv(512):
                    pass
        except OSError as exc:
            logger.debug("agent check failed: %s", exc)
        finally:
            limiter.release()


async def lame_duck(
    arrivals: Callable[[], int],
    seconds: float,
    wait_told: Callable[[], Awaitable[None]] | None,
) -> None:
    """The lame duck's wait: the caller said ``drain``; accepting goes on.

    Ends after ``seconds``, or earlier once the balancer has heard and gone
    quiet: with an agent port, once the agent has answered ``drain``
    (``wait_told`` returns at its next such answer) and then no connection
    arrived (``arrivals``, the accept task's count) for
    :data:`LAMEDUCK_QUIET` seconds. Without an agent port nobody is known to
    have heard (a Kubernetes endpoint update, say, cannot be observed from
    here), so it runs its full length.

    Handlers are not told (``listener.draining`` is set by the drain that
    follows): a connection accepted now is served as any other.
    """
    with trio.move_on_after(seconds):
        if wait_told is None:
            await trio.sleep_forever()
        assert wait_told is not None
        await wait_told()
        seen, quiet_since = arrivals(), trio.current_time()
        while True:
            await trio.sleep_until(quiet_since + LAMEDUCK_QUIET)
            count = arrivals()
            if count == seen:
                return
            # A connection arrived within the last wait: quiet from now on
            # (at most one wait longer than exact, and no timer per accept).
            seen, quiet_since = count, trio.current_time()
