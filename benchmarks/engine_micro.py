"""Micro-benchmark of protocol mode's engine: what a wake and an event cost.

Run from the repository's root (a few seconds)::

    python -m benchmarks.engine_micro
    python -m benchmarks.engine_micro --rounds 3 --wakes 5000   # quick

Two parts, each the median (min-max) of ``--rounds`` rounds:

* **a wake**: one turn of a loop that waits for an epoll fd holding one
  always-readable pipe, then polls it, as the engine's task does between
  batches. ``wait_readable``: :func:`trio.lowlevel.wait_readable` on the
  epoll fd (Trio's ``epoll_ctl`` re-arm, its ``epoll_wait``, the waiter's
  bookkeeping and a scheduler pass), then ``poll(0)``; ``look+checkpoint``:
  what the engine does while connections stay ready, a ``poll(0)`` look,
  :func:`trio.lowlevel.checkpoint` and the ``poll(0)``; ``checkpoint``:
  Trio's scheduler pass alone, the part no engine built on Trio can drop;
  ``poll(0)``: one ``epoll_wait`` system call from Python;
  ``asyncio reader``: asyncio's loop pass calling an ``add_reader`` callback
  on the same pipe, for comparison.
* **an event**: the Python cost of serving one ready connection in
  :meth:`EpollEngine._serve <trio_evlisten._engine.EpollEngine._serve>`:
  real transports and an echo protocol, their sockets replaced by a fake
  whose ``recv``/``send`` return at once, so no system call hides the
  engine's own work; beside it the fake ``recv`` and ``send`` alone.

Time is wall time (:func:`time.perf_counter`) and CPU time
(:func:`time.process_time`) per turn. The machine's other load moves these
figures; compare the rows of one run.

Error handling: none needed beyond Python's; a failure is a traceback.
Resource handling: the pipe, the epoll fds, the event loop and the sockets
are closed before the function that made them returns.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if __package__ in (None, ""):  # ``python benchmarks/engine_micro.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_evlisten import _engine

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: (wall, cpu) seconds per turn.
Sample = tuple[float, float]


def _timed(turns: int, run: Callable[[], None]) -> Sample:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (
        (time.perf_counter() - wall) / turns,
        (time.process_time() - cpu) / turns,
    )


def wake_costs(turns: int) -> dict[str, Sample]:
    """One round of every wake: seconds per turn, by name."""
    out: dict[str, Sample] = {}
    r, w = os.pipe()
    epoll = select.epoll()
    try:
        os.write(w, b"x")  # never read: the pipe stays readable
        epoll.register(r, select.EPOLLIN)
        poll = epoll.poll

        async def waits() -> None:
            for _ in range(turns):
                await trio.lowlevel.wait_readable(epoll)
                poll(0, 64)

        async def looks() -> None:
            for _ in range(turns):
                if poll(0, 1):
                    await trio.lowlevel.checkpoint()
                else:  # pragma: no cover - the pipe stays readable
                    await trio.lowlevel.wait_readable(epoll)
                poll(0, 64)

        async def checkpoints() -> None:
            for _ in range(turns):
                await trio.lowlevel.checkpoint()

        def polls() -> None:
            for _ in range(turns):
                poll(0, 64)

        def in_trio(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
            return lambda: trio.run(fn)

        out["wait_readable"] = _timed(turns, in_trio(waits))
        out["look+checkpoint"] = _timed(turns, in_trio(looks))
        out["checkpoint"] = _timed(turns, in_trio(checkpoints))
        out["poll(0)"] = _timed(turns, polls)
        out["asyncio reader"] = _timed(turns, lambda: _asyncio_reader(r, turns))
    finally:
        epoll.close()
        os.close(r)
        os.close(w)
    return out


def _asyncio_reader(fd: int, turns: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        done = loop.create_future()
        left = turns

        def ready() -> None:
            nonlocal left
            left -= 1
            if not left:
                loop.remove_reader(fd)
                done.set_result(None)

        loop.add_reader(fd, ready)
        loop.run_until_complete(done)
    finally:
        loop.close()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _FakeSocket:
    """``recv`` and ``send`` that return at once: no system call."""

    message = b"x" * 64

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        return self.message

    def send(self, data: bytes) -> int:
        return len(data)


class _Runner:
    finished = 0


class _State:
    closed = idle = cancelling = False


def event_costs(turns: int, conns: int) -> dict[str, Sample]:
    """One round: seconds per event served, and per fake recv+send alone."""
    engine = _engine.EpollEngine(None, _State(), _Runner(), False)  # type: ignore[arg-type]
    socks = [socket.socket() for _ in range(conns)]
    try:
        for sock in socks:
            engine.register(sock, None, _Echo)
        for transport in engine.transports.values():
            transport._sock = _FakeSocket(transport._fd)  # type: ignore[assignment]
        events = [(sock.fileno(), select.EPOLLIN) for sock in socks]
        rounds = max(1, turns // conns)

        def serve() -> None:
            for _ in range(rounds):
                engine._serve(events)

        fake: Any = _FakeSocket(0)

        def bare() -> None:
            for _ in range(rounds):
                for _fd, _ready in events:
                    fake.send(fake.recv(262144))

        return {
            "engine._serve": _timed(rounds * conns, serve),
            "fake recv+send": _timed(rounds * conns, bare),
        }
    finally:
        for sock in socks:
            sock.close()


def _report(title: str, rows: dict[str, list[Sample]]) -> None:
    print(f"{title}: wall µs (min-max), CPU µs")
    for name, samples in rows.items():
        walls = [s[0] * 1e6 for s in samples]
        cpus = [s[1] * 1e6 for s in samples]
        print(
            f"  {name:16s} {statistics.median(walls):7.2f} "
            f"({min(walls):.2f}-{max(walls):.2f})  {statistics.median(cpus):7.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_micro", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--wakes", type=int, default=20000, help="turns per wake round")
    p.add_argument("--events", type=int, default=100000, help="events per round")
    p.add_argument("--conns", type=int, default=64, help="connections per batch")
    ns = p.parse_args(argv)
    wakes: dict[str, list[Sample]] = {}
    events: dict[str, list[Sample]] = {}
    for _ in range(ns.rounds):
        for name, sample in wake_costs(ns.wakes).items():
            wakes.setdefault(name, []).append(sample)
        for name, sample in event_costs(ns.events, ns.conns).items():
            events.setdefault(name, []).append(sample)
    _report("a wake (per turn)", wakes)
    _report(f"an event ({ns.conns} per batch)", events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
