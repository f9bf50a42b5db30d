"""The workers' supervisor: keep N worker processes running, stop them on a signal.

Owns: starting the workers, restarting one that exits (at a bounded rate),
forwarding SIGINT/SIGTERM as SIGTERM and SIGKILLing stragglers, reaping every
process it started, and holding the port (:func:`reserve_port`) so it stays
ours while a worker restarts. It does no I/O on the port and knows nothing
of listeners: a worker is just a command line (see :mod:`.workers`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import socket
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

logger: Final = logging.getLogger("trio_evlisten.workers")


@attrs.define(eq=False)
class Supervisor:
    """Keep ``workers`` copies of ``command`` running; stop them on a signal.

    Error handling:
        A worker that exits is restarted, at most ``max_restarts`` times in
        any ``restart_window`` seconds; one more makes :meth:`run` stop all
        workers and return 1.

    Resource handling:
        :meth:`run` returns only after every worker it started was reaped.
    """

    command: list[str]
    workers: int
    max_restarts: int
    restart_window: float
    shutdown_timeout: float
    _procs: dict[int, trio.Process] = attrs.field(factory=dict, init=False)
    _restarts: collections.deque[float] = attrs.field(
        factory=collections.deque, init=False
    )
    _stop: trio.Event = attrs.field(factory=trio.Event, init=False)
    _kill_now: trio.Event = attrs.field(factory=trio.Event, init=False)
    _failed: bool = attrs.field(default=False, init=False)

    def worker_pids(self) -> dict[int, int]:
        """The pid running in each slot now (any thread may call it)."""
        return {slot: proc.pid for slot, proc in list(self._procs.items())}

    @property
    def stopping(self) -> bool:
        """Whether the workers are being stopped (a signal, or a crash loop)."""
        return self._stop.is_set()

    async def run(self) -> int:
        """Supervise until a signal (returns 0) or a crash loop (returns 1)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals)
                async with trio.open_nursery() as slots:
                    for slot in range(self.workers):
                        await slots.start(self._keep_running, slot)
                    await self._stop.wait()
                    await self._shut_down()
                nursery.cancel_scope.cancel()
        return 1 if self._failed else 0

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                logger.warning("got %s again: killing the workers now", name)
                self._kill_now.set()
            else:
                logger.info("got %s: stopping the workers", name)
                self._stop.set()

    async def _keep_running(
        self,
        slot: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        while not self._stop.is_set():
            proc = await trio.lowlevel.open_process(self.command)
            self._procs[slot] = proc
            logger.info("worker %d started, pid %d", slot, proc.pid)
            if self._stop.is_set():  # the signal came while we spawned it
                _signal(proc, signal.SIGTERM)
            if not started:
                task_status.started()
                started = True
            status = await proc.wait()
            del self._procs[slot]
            if self._stop.is_set():
                logger.info(
                    "worker %d (pid %d) exited: %s", slot, proc.pid, _describe(status)
                )
                return
            logger.warning(
                "worker %d (pid %d) died: %s", slot, proc.pid, _describe(status)
            )
            if not self._may_restart():
                logger.error(
                    "more than %d worker restarts within %g s: giving up",
                    self.max_restarts,
                    self.restart_window,
                )
                self._failed = True
                self._stop.set()
                return

    def _may_restart(self) -> bool:
        now = trio.current_time()
        while self._restarts and self._restarts[0] <= now - self.restart_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True

    async def _shut_down(self) -> None:
        for proc in list(self._procs.values()):
            _signal(proc, signal.SIGTERM)
        with trio.move_on_after(self.shutdown_timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _wait_all, list(self._procs.values()), nursery.cancel_scope
                )
                nursery.start_soon(_cancel_on, self._kill_now, nursery.cancel_scope)
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                logger.warning("worker pid %d did not stop: SIGKILL", proc.pid)
                _signal(proc, signal.SIGKILL)
        # The slot tasks reap them (they are waiting on each proc).


async def _wait_all(procs: list[trio.Process], scope: trio.CancelScope) -> None:
    for proc in procs:
        await proc.wait()
    scope.cancel()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _signal(proc: trio.Process, signum: int) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            proc.send_signal(signum)


def _describe(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a ``SO_REUSEPORT`` socket to hold the address.

    Connections are not queued on it (it does not listen), but it keeps the
    port for the workers, and turns port 0 into a real port.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock
