"""drain(): stop accepting, tell handlers to finish up, wait, cancel the rest."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, DrainResult, Flag, open_listener
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


class Polite:
    """A handler that finishes up ``finish_in`` seconds after draining begins,
    or never (``math.inf``), recording what happened when."""

    def __init__(self) -> None:
        self.started = trio.Semaphore(0)
        self.told: dict[bytes, float] = {}
        self.ended: dict[bytes, tuple[str, float]] = {}

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        kind = await recv_exactly(conn, 5)
        finish_in = {b"quick": 0.25, b"stuck": math.inf}[kind]
        self.started.release()
        try:
            await listener.wait_draining()
            assert listener.draining
            self.told[kind] = trio.current_time()
            await trio.sleep(finish_in)
        except trio.Cancelled:
            self.ended[kind] = ("cancelled", trio.current_time())
            raise
        self.ended[kind] = ("finished", trio.current_time())


async def test_drain_signals_waits_the_grace_exactly_then_cancels(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Polite()
    with trio.fail_after(10):
        async with (
            open_listener(handler, address=LOCAL, flags=FREE) as listener,
            await open_stream_to(listener) as quick,
            await open_stream_to(listener) as stuck,
        ):
            await quick.send_all(b"quick")
            await stuck.send_all(b"stuck")
            await handler.started.acquire()
            await handler.started.acquire()
            assert not listener.draining
            t0 = trio.current_time()
            result = await listener.drain(1.5)
            assert trio.current_time() == t0 + 1.5
            assert result == DrainResult(finished=1, failed=0, cancelled=1)
            assert listener.closed
            assert listener.draining
            stats = listener.statistics()
    assert handler.told == {b"quick": t0, b"stuck": t0}
    assert handler.ended == {
        b"quick": ("finished", t0 + 0.25),
        b"stuck": ("cancelled", t0 + 1.5),
    }
    assert (stats.active, stats.handler_errors, stats.accepted) == (0, 0, 2)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_drain_stops_accepting_at_once_and_returns_at_once_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=LOCAL, flags=FREE) as listener:
            async with await open_stream_to(listener) as client:
                await client.send_all(b"hi")
                assert await recv_exactly(client, 2) == b"hi"
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            result = await listener.drain(30)
            assert result == DrainResult(finished=0, failed=0, cancelled=0)
            assert trio.current_time() == t0
            assert listener.closed
            assert listener.fd == -1  # CLOSE_ON_FREE: the socket is gone
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream("127.0.0.1", listener.port)
            # Idempotent: a second drain finds nothing to do.
            result = await listener.drain(0)
            assert result == DrainResult(finished=0, failed=0, cancelled=0)


async def test_grace_none_waits_for_every_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.Event()

    async def slow(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        await trio.sleep(100)

    with trio.fail_after(1000):
        async with (
            open_listener(slow, address=LOCAL, flags=FREE) as listener,
            await open_stream_to(listener),
        ):
            await started.wait()
            t0 = trio.current_time()
            result = await listener.drain()
            assert result == DrainResult(finished=1, failed=0, cancelled=0)
            assert trio.current_time() == t0 + 100


@pytest.mark.parametrize("handler_errors", ["log", "raise"])
async def test_a_handler_that_fails_as_drain_cancels_it_is_no_handler_error(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    handler_errors: Any,
) -> None:
    started = trio.Event()

    async def messy(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup failed on cancellation")

    with trio.fail_after(10):
        async with (
            open_listener(
                messy, address=LOCAL, flags=FREE, handler_errors=handler_errors
            ) as listener,
            await open_stream_to(listener),
        ):
            await started.wait()
            result = await listener.drain(0)
            assert result == DrainResult(finished=0, failed=0, cancelled=1)
            stats = listener.statistics()
    assert stats.handler_errors == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_leaving_the_block_drains_with_drain_timeout_and_signals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Polite()
    with trio.fail_after(10):
        async with (
            open_listener(
                handler, address=LOCAL, flags=FREE, drain_timeout=2
            ) as listener,
            await open_stream_to(listener) as quick,
            await open_stream_to(listener) as stuck,
        ):
            await quick.send_all(b"quick")
            await stuck.send_all(b"stuck")
            await handler.started.acquire()
            await handler.started.acquire()
            t0 = trio.current_time()
        assert trio.current_time() == t0 + 2
        assert listener.draining
    # The handlers learnt it the moment the block was left.
    assert handler.told == {b"quick": t0, b"stuck": t0}
    assert handler.ended == {
        b"quick": ("finished", t0 + 0.25),
        b"stuck": ("cancelled", t0 + 2),
    }


async def test_with_handler_nursery_drain_cancels_only_its_own_handlers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Polite()
    bystander_done: list[float] = []

    async def bystander() -> None:
        await trio.sleep(10)
        bystander_done.append(trio.current_time())

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            async with (
                open_listener(
                    handler, address=LOCAL, flags=FREE, handler_nursery=nursery
                ) as listener,
                await open_stream_to(listener) as stuck,
            ):
                await stuck.send_all(b"stuck")
                await handler.started.acquire()
                t0 = trio.current_time()
                result = await listener.drain(3)
                assert trio.current_time() == t0 + 3
            assert result == DrainResult(finished=0, failed=0, cancelled=1)
            assert handler.ended == {b"stuck": ("cancelled", t0 + 3)}
            assert bystander_done == []  # the nursery's other task goes on
    assert bystander_done == [pytest.approx(t0 + 10, abs=0.5)]


async def test_leaving_the_block_with_handler_nursery_does_not_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Polite()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            async with (
                open_listener(
                    handler, address=LOCAL, flags=FREE, handler_nursery=nursery
                ) as listener,
                await open_stream_to(listener) as quick,
            ):
                await quick.send_all(b"quick")
                await handler.started.acquire()
            # The handlers are the nursery's: closed, not drained.
            assert listener.closed
            assert not listener.draining
            await trio.testing.wait_all_tasks_blocked()
            assert handler.told == {}
            t0 = trio.current_time()
            result = await listener.drain(5)
            assert result == DrainResult(finished=1, failed=0, cancelled=0)
            assert handler.ended == {b"quick": ("finished", t0 + 0.25)}


async def test_two_drains_at_once_both_return_when_the_handlers_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler = Polite()
    results: list[tuple[float, DrainResult]] = []
    with trio.fail_after(10):
        async with (
            open_listener(handler, address=LOCAL, flags=FREE) as listener,
            await open_stream_to(listener) as quick,
        ):
            await quick.send_all(b"quick")
            await handler.started.acquire()
            t0 = trio.current_time()

            async def drain(grace: float) -> None:
                result = await listener.drain(grace)
                results.append((trio.current_time(), result))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, 10)
                nursery.start_soon(drain, 20)
    # Both saw the handler finish by itself at +0.25 s.
    assert sorted(results, key=lambda r: r[0]) == [
        (t0 + 0.25, DrainResult(finished=1, failed=0, cancelled=0)),
        (t0 + 0.25, DrainResult(finished=1, failed=0, cancelled=0)),
    ]


@pytest.mark.parametrize(
    ("grace", "error"),
    [(-1, ValueError), (math.nan, ValueError), ("1", TypeError), (True, TypeError)],
)
async def test_drain_grace_is_checked(grace: Any, error: type[Exception]) -> None:
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=LOCAL, flags=FREE) as listener:
            with pytest.raises(error, match="grace"):
                await listener.drain(grace)
            assert not listener.closed
            assert not listener.draining


# ----------------------------------------------------------------------
# Nothing the kernel queued is lost; nothing waits in silence


async def answer_once(
    listener: ConnListener, conn: trio.SocketStream, addr: Any
) -> None:
    await conn.send_all(await recv_exactly(conn, 3) + b".")


@pytest.mark.parametrize("how", ["drain", "leave the block"])
async def test_connections_queued_when_drain_begins_are_served(how: str) -> None:
    n = 50
    with trio.fail_after(10):
        async with contextlib.AsyncExitStack() as clients:
            async with open_listener(answer_once, address=LOCAL, flags=FREE) as lst:
                # Disabled: every connection completes its TCP handshake and
                # waits in the kernel's accept queue.
                lst.disable()
                streams = []
                for i in range(n):
                    stream = await clients.enter_async_context(
                        await open_stream_to(lst)
                    )
                    await stream.send_all(b"%03d" % i)
                    streams.append(stream)
                assert lst.statistics().queue_depth == n
                if how == "drain":
                    result = await lst.drain(5)
                    assert result == DrainResult(finished=n, failed=0, cancelled=0)
            # Every one was accepted and answered: none reset, none silent.
            for i, stream in enumerate(streams):
                assert await recv_exactly(stream, 4) == b"%03d." % i
            assert lst.statistics().accepted == n


async def test_a_drain_waiting_on_handlers_warns_after_10_s_then_every_60_s(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    started = trio.Event()

    async def stuck(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(1000):
        async with (
            open_listener(stuck, address=LOCAL, flags=FREE, drain_timeout=0) as lst,
            await open_stream_to(lst),
        ):
            await started.wait()
            t0 = trio.current_time()
            with trio.move_on_after(135):
                await lst.drain()
    warnings = [
        (r.created, r.getMessage())
        for r in caplog.records
        if r.name == "trio_evlisten" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 3  # at 10, 70 and 130 s
    for _, message in warnings:
        assert "still waiting for 1 handler(s)" in message
        # It says what to do about it.
        assert "wait_draining()" in message
        assert "drain_timeout=" in message
    waited = [re.search(r" after (\d+) s", m) for _, m in warnings]
    assert [w and w.group(1) for w in waited] == ["10", "70", "130"]
    assert trio.current_time() >= t0 + 135


async def test_drain_counts_handlers_that_raise_apart() -> None:
    go = trio.Event()

    async def fails_on_drain(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        go.set()
        await listener.wait_draining()
        raise ValueError("failing while finishing up")

    with trio.fail_after(5):
        async with (
            open_listener(fails_on_drain, address=LOCAL, flags=FREE) as lst,
            await open_stream_to(lst),
        ):
            await go.wait()
            result = await lst.drain(5)
    assert result == DrainResult(finished=0, failed=1, cancelled=0)
    assert lst.statistics().handler_errors == 1


async def test_a_handlers_own_nursery_is_drained_and_supervised_with_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """What the docs advise for helper tasks: a nursery inside the handler."""
    helpers_cancelled: list[float] = []
    started = trio.Semaphore(0)

    async def helper(fail: bool) -> None:
        started.release()
        if fail:
            raise RuntimeError("helper failed")
        try:
            await trio.sleep_forever()
        finally:
            helpers_cancelled.append(trio.current_time())

    async def with_helpers(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        fail = await conn.receive_some() == b"fail"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(helper, fail)

    with trio.fail_after(100):
        async with (
            open_listener(with_helpers, address=LOCAL, flags=FREE) as lst,
            await open_stream_to(lst) as failing,
            await open_stream_to(lst) as waiting,
        ):
            await failing.send_all(b"fail")
            await waiting.send_all(b"wait")
            await started.acquire()
            await started.acquire()
            await trio.testing.wait_all_tasks_blocked()
            assert not lst.closed  # the helper's error was the handler's: logged
            t0 = trio.current_time()
            result = await lst.drain(5)
    assert result == DrainResult(finished=0, failed=0, cancelled=1)
    assert helpers_cancelled == [t0 + 5]
    assert lst.statistics().handler_errors == 1
    [logged] = [r for r in caplog.records if r.exc_info]
    assert logged.exc_info is not None
    assert logged.getMessage().startswith("handler for ")
    assert "helper failed" in "".join(
        logging.Formatter().formatException(logged.exc_info)
    )


# ----------------------------------------------------------------------
# Nothing that completed its TCP handshake is reset by a drain


async def answer_until_draining(
    listener: ConnListener, conn: trio.abc.Stream, addr: Any
) -> None:
    """A well-behaved handler: answers one message; once draining, that's all."""
    await conn.send_all(await conn.receive_some())
    while not listener.draining:
        data = await conn.receive_some()
        if not data:
            return
        await conn.send_all(data)


@pytest.mark.parametrize("how", ["drain", "leaving the block"])
async def test_a_drain_serves_connections_queued_behind_max_connections(
    how: str,
) -> None:
    draining_at_start: list[bool] = []

    async def handler(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        draining_at_start.append(listener.draining)
        await answer_until_draining(listener, conn, addr)

    with trio.fail_after(10):
        async with open_listener(
            handler, address=LOCAL, flags=FREE, max_connections=1, drain_timeout=1
        ) as listener:
            holder = await open_stream_to(listener)
            await holder.send_all(b"a")
            assert await recv_exactly(holder, 1) == b"a"
            # The cap is reached: this one waits in the kernel's queue.
            queued = await open_stream_to(listener)
            await queued.send_all(b"b")
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert (stats.active, stats.queue_depth) == (1, 1)
            if how == "drain":
                result = await listener.drain(1)
        async with holder, queued:
            # Served past the cap, with draining already set, not reset.
            assert await recv_exactly(queued, 1) == b"b"
            assert await queued.receive_some() == b""
    assert draining_at_start == [False, True]
    if how == "drain":
        # The holder was told, and left when it next heard from its peer:
        # it is still waiting, so the grace ends it.
        assert (result.finished, result.failed, result.cancelled) == (1, 0, 1)


async def test_a_drain_under_continuous_connects_resets_nothing_it_took() -> None:
    # Clients keep connecting while the drain runs. Every connection whose
    # connect() succeeded completed its handshake, so it must be served
    # (answered), never reset: the drain takes the queue until accept()
    # finds it empty and closes the socket in the same step.
    connected: list[trio.SocketStream] = []
    stop = trio.Event()

    async def flood(port: int) -> None:
        while not stop.is_set():
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return  # refused: the socket is closed, which is no loss
            connected.append(stream)
            await stream.send_all(b"x")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_listener(
                answer_until_draining, address=LOCAL, flags=FREE | Flag.DISABLED
            ) as listener:
                # A queue longer than one accept batch, then more arriving.
                for _ in range(100):
                    connected.append(await open_stream_to(listener))
                    await connected[-1].send_all(b"x")
                for _ in range(4):
                    nursery.start_soon(flood, listener.port)
                await trio.sleep(0.05)
                await listener.drain(5)
            stop.set()
        answered = reset = 0
        for stream in connected:
            async with stream:
                try:
                    answered += await recv_exactly(stream, 1) == b"x"
                except trio.BrokenResourceError:
                    reset += 1
        assert (answered, reset) == (len(connected), 0)
        assert answered > 100


# ----------------------------------------------------------------------
# drain() from inside a handler would wait for itself


@pytest.mark.parametrize("where", ["handler", "task inside the handler"])
@pytest.mark.parametrize("own_nursery", [True, False])
async def test_drain_from_one_of_its_own_handlers_is_a_clear_error(
    where: str, own_nursery: bool
) -> None:
    errors: list[BaseException] = []

    async def call_drain(listener: ConnListener) -> None:
        try:
            await listener.drain(2)
        except RuntimeError as exc:
            errors.append(exc)

    async def handler(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        if where == "handler":
            await call_drain(listener)
        else:
            async with trio.open_nursery() as inner:
                inner.start_soon(call_drain, listener)
        await conn.send_all(b"done")

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            options: dict[str, Any] = {} if own_nursery else {"handler_nursery": outer}
            async with (
                open_listener(handler, address=LOCAL, flags=FREE, **options) as lst,
                await open_stream_to(lst) as client,
            ):
                assert await recv_exactly(client, 4) == b"done"
                assert not lst.draining  # it did not begin
    [error] = errors
    assert isinstance(error, RuntimeError)
    assert "awaited from one of the listener's own handlers" in str(error)
    assert "listener.nursery.start_soon(listener.drain)" in str(error)


async def test_a_handler_may_start_a_drain_in_the_listeners_nursery() -> None:
    # What the error message advises works: the drain runs in a task of the
    # listener's nursery, and waits for the handler that started it.
    async def handler(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        listener.nursery.start_soon(listener.drain, 5)
        await listener.wait_draining()
        await conn.send_all(b"bye")

    with trio.fail_after(10):
        async with open_listener(handler, address=LOCAL, flags=FREE) as listener:
            async with await open_stream_to(listener) as client:
                assert await recv_exactly(client, 3) == b"bye"
            await trio.testing.wait_all_tasks_blocked()
            assert listener.closed
