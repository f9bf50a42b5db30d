"""THREADSAFE under contention: threads toggle everything while clients connect.

``tests/test_threads.py`` hammers enable/disable alone. Here several threads
call enable, disable, set_cb (two callbacks and None) and set_error_cb at
random while connections arrive; the whole run is bounded (threads are
abandoned on timeout, so a deadlock fails rather than hangs), and the final
state is whatever the last call said.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from typing import Any

import pytest
import trio
import trio.testing

from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import open_stream_to

SAFE = Flag.THREADSAFE | Flag.CLOSE_ON_FREE
THREADS = 4
CALLS = 1500
CLIENTS = 40


class Served:
    def __init__(self, name: str) -> None:
        self.name = name
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: Any
    ) -> None:
        self.send.send_nowait((self.name, addr, args))


def noop_error_cb(listener: ConnListener, exc: OSError) -> None:
    pass


def hammer(
    listener: ConnListener, seed: int, a: Served, b: Served, go: threading.Barrier
) -> int:
    rng = random.Random(seed)
    go.wait()
    for _ in range(CALLS):
        op = rng.randrange(6)
        if op == 0:
            listener.enable()
        elif op == 1:
            listener.disable()
        elif op == 2:
            listener.set_cb(a, "a")
        elif op == 3:
            listener.set_cb(b, "b")
        elif op == 4:
            listener.set_cb(None)
        else:
            listener.set_error_cb(noop_error_cb if rng.random() < 0.5 else None)
    return CALLS


@pytest.mark.parametrize("final", ["enable_b", "disable", "set_cb_none", "close"])
async def test_threads_toggling_while_clients_connect(final: str) -> None:
    a, b = Served("a"), Served("b")
    with trio.fail_after(20):
        async with (
            open_listener(a, "a", address=("127.0.0.1", 0), flags=SAFE) as lst,
            contextlib.AsyncExitStack() as stack,
        ):
            go = threading.Barrier(THREADS)
            clients: list[trio.SocketStream] = []

            async def connect_all() -> None:
                for _ in range(CLIENTS):
                    client = await open_stream_to(lst)
                    stack.push_async_callback(client.aclose)
                    clients.append(client)
                    await trio.lowlevel.checkpoint()

            done: list[int] = []

            async def run_thread(seed: int) -> None:
                done.append(
                    await trio.to_thread.run_sync(
                        hammer, lst, seed, a, b, go, abandon_on_cancel=True
                    )
                )

            async with trio.open_nursery() as nursery:
                for seed in range(THREADS):
                    nursery.start_soon(run_thread, seed)
                nursery.start_soon(connect_all)
            assert done == [CALLS] * THREADS

            # The last word, from a thread.
            def last_word() -> None:
                if final == "enable_b":
                    lst.set_cb(b, "final")
                    lst.enable()
                elif final == "disable":
                    lst.set_cb(b, "final")
                    lst.disable()
                elif final == "set_cb_none":
                    lst.enable()
                    lst.set_cb(None)
                else:
                    lst.close()

            await trio.to_thread.run_sync(last_word, abandon_on_cancel=True)
            await trio.testing.wait_all_tasks_blocked()
            before = lst.statistics().accepted
            drained: list[Any] = []
            for chan in (a.receive, b.receive):
                while True:
                    try:
                        drained.append(chan.receive_nowait())
                    except trio.WouldBlock:
                        break
            assert len(drained) == before  # every accepted one reached a handler

            if final == "close":
                assert lst.closed
                assert lst.fd == -1
                with pytest.raises(OSError, match="all attempts to connect"):
                    await open_stream_to(lst)
                return
            assert lst.enabled == (final != "disable")
            late = await open_stream_to(lst)
            stack.push_async_callback(late.aclose)
            if final == "enable_b":
                # Every client queued during the hammering, and the late one,
                # now goes to b with the final args.
                total = CLIENTS + 1
                while len(drained) < total:
                    drained.append(await b.receive.receive())
                assert all(d[0] in ("a", "b") for d in drained)
                assert lst.statistics().accepted == total
                # Everything accepted after the last word went to b, "final".
                after = drained[before:]
                assert {(d[0], d[2]) for d in after} == {("b", ("final",))}
                assert late.socket.getsockname() in {d[1] for d in after}
            else:
                await trio.testing.wait_all_tasks_blocked()
                assert lst.statistics().accepted == before
                with pytest.raises(trio.WouldBlock):
                    a.receive.receive_nowait()
                with pytest.raises(trio.WouldBlock):
                    b.receive.receive_nowait()
