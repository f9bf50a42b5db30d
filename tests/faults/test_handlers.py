"""Handlers misbehaving: raising, not closing, blocking, re-entrant calls.

And a handler nursery that is already closed when a connection arrives: the
accepted socket must be closed, not leaked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import count_fds, echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


async def echo_once(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    assert await recv_exactly(stream, len(data)) == data


async def test_raising_handlers_interleaved_with_good_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def sometimes_raises(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        data = await conn.receive_some()
        if data.startswith(b"bad"):
            raise ZeroDivisionError(data.decode())
        await conn.send_all(data)

    with trio.fail_after(10):
        async with open_listener(sometimes_raises, address=LOCAL, flags=FREE) as lst:
            for i in range(40):
                async with await open_stream_to(lst) as client:
                    if i % 2:
                        await client.send_all(b"bad%d" % i)
                        # Its connection is closed by the listener.
                        assert await client.receive_some() == b""
                    else:
                        await echo_once(client, b"good%d" % i)
            await trio.testing.wait_all_tasks_blocked()
            stats = lst.statistics()
            assert not lst.closed
    assert stats.handler_errors == 20
    assert stats.accepted == 40
    assert stats.active == 0
    # Grouped, as accept errors are: the first in full, with its traceback;
    # the other 19 counted in one summary line (here when the block drains).
    records = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    first, summary = records
    assert first.exc_info
    assert first.exc_info[0] is ZeroDivisionError
    assert first.getMessage().startswith("handler for ")
    assert not summary.exc_info
    assert "raised: ZeroDivisionError \u00d719 in " in summary.getMessage()
    assert getattr(first, "handler_errors", None) == 1
    assert getattr(summary, "handler_errors", None) == 19


async def test_handlers_returning_without_closing_leak_nothing() -> None:
    async def forgets(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        await conn.send_all(b"hi")

    with trio.fail_after(10):
        async with open_listener(forgets, address=LOCAL, flags=FREE) as lst:
            await trio.testing.wait_all_tasks_blocked()
            base = count_fds()
            for _ in range(50):
                async with await open_stream_to(lst) as client:
                    assert await recv_exactly(client, 2) == b"hi"
                    assert await client.receive_some() == b""  # closed for it
            await trio.testing.wait_all_tasks_blocked()
            assert count_fds() == base
            assert lst.statistics().active == 0


async def test_handlers_blocked_forever_are_cut_at_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Blocked three ways: sleeping, on a full send buffer, and catching
    Cancelled to try again (Trio re-raises at the next checkpoint)."""
    retries: list[int] = []

    async def stubborn(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        kind = await conn.receive_some(1)
        if kind == b"s":
            await trio.sleep_forever()
        elif kind == b"w":
            while True:
                await conn.send_all(b"x" * 65536)
        else:
            for attempt in range(3):
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    retries.append(attempt)
                    if attempt == 2:
                        raise

    with trio.fail_after(100):
        clients: list[trio.SocketStream] = []
        try:
            async with open_listener(
                stubborn, address=LOCAL, flags=FREE, drain_timeout=7
            ) as lst:
                for kind in b"swc":
                    clients.append(await open_stream_to(lst))
                    await clients[-1].send_all(bytes([kind]))
                await trio.testing.wait_all_tasks_blocked()
                assert lst.statistics().active == 3
                left = trio.current_time()
            assert trio.current_time() - left == pytest.approx(7)
            assert lst.statistics().active == 0
        finally:
            for client in clients:
                await client.aclose()
    # Cancelled once; every retry was cancelled at once, at the same instant.
    assert retries == [0, 1, 2]


async def test_handler_closing_the_listener_lets_the_running_ones_finish() -> None:
    release = trio.Event()

    async def handler(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        data = await conn.receive_some()
        if data == b"close":
            listener.close()
        await release.wait()
        await conn.send_all(data)

    with trio.fail_after(10):
        async with open_listener(handler, address=LOCAL, flags=FREE) as lst:
            a = await open_stream_to(lst)
            b = await open_stream_to(lst)
            async with a, b:
                await a.send_all(b"a")
                await b.send_all(b"close")
                await trio.testing.wait_all_tasks_blocked()
                assert lst.closed
                assert lst.fd == -1
                # Nothing more is accepted: the port is closed.
                with pytest.raises(OSError, match="all attempts to connect"):
                    await open_stream_to(lst)
                release.set()
                assert await recv_exactly(a, 1) == b"a"
                assert await recv_exactly(b, 5) == b"close"
        assert lst.statistics().accepted == 2


async def test_handler_cancelling_the_nursery_closes_every_connection() -> None:
    async def handler(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        data = await conn.receive_some()
        if data == b"stop":
            listener.nursery.cancel_scope.cancel()
        async for more in conn:
            await conn.send_all(more)

    with trio.fail_after(10):
        clients: list[trio.SocketStream] = []
        try:
            async with open_listener(handler, address=LOCAL, flags=FREE) as lst:
                for i in range(5):
                    clients.append(await open_stream_to(lst))
                    await clients[-1].send_all(b"c%d" % i)
                await trio.testing.wait_all_tasks_blocked()
                async with await open_stream_to(lst) as stopper:
                    await stopper.send_all(b"stop")
                    await trio.sleep_forever()
            assert lst.closed
            for client in clients:
                assert await client.receive_some() == b""
        finally:
            for client in clients:
                await client.aclose()


async def test_reentrant_set_cb_and_disable_from_handlers_and_error_cb() -> None:
    """A handler swaps the callback, disables and re-enables the listener, in
    the middle of a stream of connections."""
    second_args: list[tuple[Any, ...]] = []
    send, receive = trio.open_memory_channel[str](math.inf)

    async def second(
        listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: Any
    ) -> None:
        second_args.append(args)
        send.send_nowait("second")

    async def first(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        listener.disable()
        listener.set_cb(None)
        listener.enable()  # enabled, but no callback: still shut
        listener.set_cb(first)
        listener.disable()
        listener.set_cb(second, "swapped")  # the gate stays shut: disabled
        send.send_nowait("first")

    with trio.fail_after(10):
        async with open_listener(first, address=LOCAL, flags=FREE) as lst:
            async with await open_stream_to(lst):
                assert await receive.receive() == "first"
            assert not lst.enabled
            async with await open_stream_to(lst):
                await trio.testing.wait_all_tasks_blocked()
                assert lst.statistics().accepted == 1
                lst.enable()
                assert await receive.receive() == "second"
            assert second_args == [("swapped",)]
            assert lst.statistics().accepted == 2


async def test_handler_nursery_already_closed_closes_the_accepted_socket() -> None:
    async with trio.open_nursery() as finished:
        pass  # closed to new arrivals from here on

    with trio.fail_after(10):
        base = count_fds()
        with pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="closed to new arrivals")
        ):
            async with (
                open_listener(
                    echo_handler, address=LOCAL, flags=FREE, handler_nursery=finished
                ) as lst,
                await open_stream_to(lst) as client,
            ):
                await client.send_all(b"x")
                # The accepted socket is closed, not leaked: the client
                # sees EOF (or a reset) rather than a hang.
                with trio.move_on_after(5) as hung:
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await client.receive_some() == b""
                assert not hung.cancelled_caught
                await trio.sleep_forever()
        assert lst.closed
        assert lst.statistics().active == 0
        assert count_fds() == base


async def test_a_handler_that_closes_its_fd_ends_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # os.close() behind the socket object's back makes the listener's
    # cleanup fail with EBADF: that must neither end the listener nor keep
    # the handler's max_connections slot.
    async def rude(listener: ConnListener, conn: Any, addr: Any) -> None:
        if await conn.receive_some() == b"close":
            os.close(conn.socket.fileno())
            return
        await conn.send_all(b"ok")

    with trio.fail_after(10):
        async with open_listener(
            rude, address=LOCAL, flags=FREE, max_connections=1
        ) as listener:
            for _ in range(3):
                async with await open_stream_to(listener) as client:
                    await client.send_all(b"close")
                    assert await client.receive_some() == b""
                await trio.testing.wait_all_tasks_blocked()
                assert listener.statistics().active == 0
            async with await open_stream_to(listener) as client:
                await client.send_all(b"hello")
                assert await recv_exactly(client, 2) == b"ok"
            assert not listener.closed
            assert listener.statistics().handler_errors == 0
