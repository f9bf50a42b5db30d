"""The workers' supervisor: keep N worker processes running, stop them on a signal.

Owns: starting the workers, restarting one that exits (at a bounded rate),
forwarding SIGINT/SIGTERM as SIGTERM (also during start-up) and SIGKILLing
stragglers, reaping every process it started, and holding the port
(:func:`reserve_port`) so it stays ours while a worker restarts. It does no
I/O on the port and knows nothing of listeners: a worker is just a command
line (see :mod:`.workers`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

logger: Final = logging.getLogger("trio_evlisten.workers")


#: The signals that stop the supervisor; each worker then gets SIGTERM.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[list[int]]:
    """Keep SIGINT and SIGTERM, from now until :meth:`Supervisor.run` listens.

    Python's own dispositions would turn a stop that comes while the
    supervisor gets ready (loading the handler's module, starting Trio) into
    a ``KeyboardInterrupt`` traceback or a death by SIGTERM; held, it stops
    the supervisor as a later one would, before it starts any worker.

    Yields:
        The list the held signal numbers are appended to; give it to
        :class:`Supervisor` as ``held_signals``.

    Error handling:
        A second signal while held is taken as "stop now": it gets Python's
        own disposition (``KeyboardInterrupt``, or death by SIGTERM), so a
        start-up that hangs can still be interrupted.

    Resource handling:
        The previous handlers are back on leaving the block.
    """
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if held:
            signal.signal(signum, _python_default(signum))
            signal.raise_signal(signum)
            return
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS}
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _python_default(signum: int) -> Callable[[int, Any], Any] | int:
    if signum == signal.SIGINT:
        return signal.default_int_handler
    return signal.SIG_DFL


@attrs.define(eq=False)
class Supervisor:
    """Keep ``workers`` copies of ``command`` running; stop them on a signal.

    Each slot runs one worker at a time and starts it again when it exits.
    Workers are started in a session of their own: a terminal's Ctrl-C
    reaches the supervisor only, which passes the stop on as SIGTERM (a
    worker still importing would otherwise die of the SIGINT with a
    ``KeyboardInterrupt`` traceback).

    A stop (SIGINT or SIGTERM, or a crash loop) may come at any moment, also
    while workers are being started: every worker that exists then gets
    SIGTERM at once, one whose start was under way gets it as soon as it
    exists, and no slot starts another.

    Error handling:
        A worker that exits, or cannot be started, is restarted, at most
        ``max_restarts`` times in any ``restart_window`` seconds; one more
        makes :meth:`run` stop all workers and return 1. A second signal
        SIGKILLs the workers at once, as does ``shutdown_timeout`` seconds
        after the stop.

    Resource handling:
        :meth:`run` returns (or raises) only after every worker it started
        was reaped.
    """

    command: list[str]
    workers: int
    max_restarts: int
    restart_window: float
    shutdown_timeout: float
    #: SIGINT/SIGTERM received before :meth:`run` listened (see
    #: :func:`hold_stop_signals`); run acts on them once it listens.
    held_signals: Sequence[int] = ()
    _procs: dict[int, trio.Process] = attrs.field(factory=dict, init=False)
    _restarts: collections.deque[float] = attrs.field(
        factory=collections.deque, init=False
    )
    _stop: trio.Event = attrs.field(factory=trio.Event, init=False)
    _killing: bool = attrs.field(default=False, init=False)
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
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in self.held_signals:
                self._on_signal(signum)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals)
                nursery.start_soon(self._kill_after_timeout)
                # A slot returns once the stop came and its worker was
                # reaped, so leaving this nursery means every worker was.
                async with trio.open_nursery() as slots:
                    for slot in range(self.workers):
                        slots.start_soon(self._keep_running, slot)
                nursery.cancel_scope.cancel()
        return 1 if self._failed else 0

    def stop(self) -> None:
        """Stop every worker: SIGTERM now (and to one still being started).

        Idempotent. The workers are SIGKILLed ``shutdown_timeout`` seconds
        later if still there.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        for proc in self._procs.values():
            _signal(proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every worker now, and each one still being started."""
        self.stop()
        if self._killing:
            return
        self._killing = True
        for proc in self._procs.values():
            if proc.returncode is None:
                logger.warning("worker pid %d did not stop: SIGKILL", proc.pid)
                _signal(proc, signal.SIGKILL)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            logger.warning("got %s again: killing the workers now", name)
            self.kill()
        else:
            logger.info("got %s: stopping the workers", name)
            self.stop()

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self._on_signal(signum)

    async def _kill_after_timeout(self) -> None:
        await self._stop.wait()
        await trio.sleep(self.shutdown_timeout)
        self.kill()

    async def _keep_running(self, slot: int) -> None:
        while not self._stop.is_set():
            await self._run_one(slot)
            if self._stop.is_set():
                return
            if not self._may_restart():
                logger.error(
                    "more than %d worker restarts within %g s: giving up",
                    self.max_restarts,
                    self.restart_window,
                )
                self._failed = True
                self.stop()
                return

    async def _run_one(self, slot: int) -> None:
        """Start the slot's worker and wait until it was reaped."""
        try:
            # Not cancellable once the fork began: it returns the process.
            proc = await trio.lowlevel.open_process(
                self.command, start_new_session=True
            )
        except OSError as exc:
            logger.error("worker %d could not be started: %s", slot, exc)
            return
        self._procs[slot] = proc
        logger.info("worker %d started, pid %d", slot, proc.pid)
        # A stop that came while it was being started did not reach it.
        if self._killing:
            _signal(proc, signal.SIGKILL)
        elif self._stop.is_set():
            _signal(proc, signal.SIGTERM)
        try:
            status = await proc.wait()
        finally:
            if proc.returncode is None:
                # Cancelled, which only an error elsewhere in run() does:
                # leave no worker behind, nor a zombie.
                _signal(proc, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await proc.wait()
            del self._procs[slot]
        if self._stop.is_set():
            logger.info(
                "worker %d (pid %d) exited: %s", slot, proc.pid, _describe(status)
            )
        else:
            logger.warning(
                "worker %d (pid %d) died: %s", slot, proc.pid, _describe(status)
            )

    def _may_restart(self) -> bool:
        now = trio.current_time()
        while self._restarts and self._restarts[0] <= now - self.restart_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True


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
