"""The overload workload: do the connections a server took stay fast when
more arrive than it can serve?

    python benchmarks/overload.py serve KIND PORT
    python benchmarks/overload.py client PORT [--duration 4] [--flood 64]

The server (one process) serves one handler: every byte it reads is echoed
back, and a ``b`` first burns 20 ms of CPU (a request that costs real work).
KIND is ``ours`` (trio_evlisten, no bound), ``ours-lag`` (the same with
``max_loop_lag=0.05``), ``trio`` (:func:`trio.serve_tcp`) or
``asyncio-streams`` (:func:`asyncio.start_server`), all the same handler.

The client (run in its own process, pinned by ``python -m benchmarks`` to
the CPUs the server does not use, so its CPU is not the server's):

1. opens 10 *established* connections and does one round trip on each
   (accepted and served before the flood);
2. then, for ``--duration`` seconds: each established connection pings
   (``p``) in a loop, timing each round trip; and ``--flood`` tasks each
   open a new connection, ask for a burn (``b``), wait for it, close,
   and start over, as fast as the server lets them.

It prints one JSON line: the established connections' round trips (count,
p50, p99, max; a ping still unanswered at the end counts with the time it
has waited, so a server that starves them cannot look good by answering
few), and the burns completed per second. Loopback only; bounded in count
(``--flood`` connections at once, at most 256) and time (``--duration``,
at most 60 s, plus a 10 s grace to close).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

import trio

if __package__ in (None, ""):  # ``python benchmarks/overload.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOST: Final = "127.0.0.1"
#: CPU seconds a ``b`` request burns.
BURN: Final = 0.020
#: The bound ``ours-lag`` runs with.
MAX_LOOP_LAG: Final = 0.05
ESTABLISHED: Final = 10
FLOOD_MAX: Final = 256
KINDS: Final = ("ours", "ours-lag", "trio", "asyncio-streams")


def burn(seconds: float = BURN) -> None:
    """Spend ``seconds`` of this thread's CPU time (not wall time: a busy
    machine must not make the request cheaper)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def answer(data: bytes | bytearray) -> bytes | bytearray:
    """The handler's work for one chunk: burn for each ``b``, then echo."""
    for _ in range(data.count(b"b")):
        burn()
    return data


async def trio_handler(stream: trio.abc.Stream) -> None:
    try:
        async for data in stream:
            await stream.send_all(answer(data))
    except trio.BrokenResourceError:
        pass


async def serve_ours(port: int, max_loop_lag: float | None) -> None:
    import trio_evlisten

    async def handler(listener: object, stream: trio.abc.Stream, addr: Any) -> None:
        await trio_handler(stream)

    async with trio_evlisten.open_listener(
        handler,
        address=(HOST, port),
        flags=trio_evlisten.Flag.CLOSE_ON_FREE | trio_evlisten.Flag.REUSEABLE,
        max_loop_lag=max_loop_lag,
    ):
        await trio.sleep_forever()


async def serve_trio(port: int) -> None:
    await trio.serve_tcp(trio_handler, port, host=HOST)


async def serve_asyncio(port: int) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(answer(data))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def serve(kind: str, port: int) -> None:
    if kind == "ours":
        trio.run(serve_ours, port, None)
    elif kind == "ours-lag":
        trio.run(serve_ours, port, MAX_LOOP_LAG)
    elif kind == "trio":
        trio.run(serve_trio, port)
    elif kind == "asyncio-streams":
        asyncio.run(serve_asyncio(port))
    else:
        raise SystemExit(f"unknown server kind {kind!r}; choose from {KINDS}")


async def round_trip(stream: trio.SocketStream, what: bytes) -> None:
    await stream.send_all(what)
    got = await stream.receive_some(1)
    if got != what:
        raise RuntimeError(f"sent {what!r}, got {got!r}")


async def client(port: int, duration: float, flood: int) -> dict[str, Any]:
    """The measurement (see the module's docstring)."""
    established = [await trio.open_tcp_stream(HOST, port) for _ in range(ESTABLISHED)]
    rtts: list[float] = []
    waiting: dict[int, float] = {}
    burns = 0
    errors = 0
    try:
        for stream in established:
            await round_trip(stream, b"p")

        async def ping(i: int, stream: trio.SocketStream) -> None:
            while True:
                sent = waiting[i] = trio.current_time()
                await round_trip(stream, b"p")
                del waiting[i]
                rtts.append(trio.current_time() - sent)

        async def flooder() -> None:
            nonlocal burns, errors
            while True:
                try:
                    async with await trio.open_tcp_stream(HOST, port) as stream:
                        await round_trip(stream, b"b")
                    burns += 1
                except OSError:
                    # Refused or reset: the server's choice under load; try
                    # again, but never spin.
                    errors += 1
                    await trio.sleep(0.01)

        started = trio.current_time()
        with trio.move_on_after(duration):
            async with trio.open_nursery() as nursery:
                for i, stream in enumerate(established):
                    nursery.start_soon(ping, i, stream)
                for _ in range(flood):
                    nursery.start_soon(flooder)
        ended = trio.current_time()
    finally:
        with trio.move_on_after(10):
            for stream in established:
                await stream.aclose()
    # A ping still unanswered has waited at least this long.
    samples = rtts + [ended - sent for sent in waiting.values()]
    samples.sort()
    elapsed = ended - started
    return {
        "pings": len(rtts),
        "unanswered": len(waiting),
        "ping_p50_ms": statistics.median(samples) * 1e3,
        "ping_p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3,
        "ping_max_ms": samples[-1] * 1e3,
        "burns": burns,
        "burns_per_s": burns / elapsed,
        "flood_errors": errors,
        "elapsed": elapsed,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/overload.py", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("kind", choices=KINDS)
    s.add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("port", type=int)
    c.add_argument("--duration", type=float, default=4.0)
    c.add_argument("--flood", type=int, default=64)
    ns = p.parse_args(argv)
    if ns.cmd == "serve":
        serve(ns.kind, ns.port)
        return 0
    duration = max(0.1, min(ns.duration, 60.0))
    flood = max(1, min(ns.flood, FLOOD_MAX))
    print(json.dumps(trio.run(client, ns.port, duration, flood)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
