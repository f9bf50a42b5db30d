"""Protocol mode's ways out of a callback: ``start_task`` and ``hand_over``.

Every test runs under both engines (the ``engine`` fixture of
tests/test_protocol.py): the epoll one and the task-per-connection fallback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

import trio_evlisten
from trio_evlisten._transport import Transport

from .conftest import recv_exactly
from .test_protocol import Made, Recorder, connect, engine, listen, read_all

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["engine"]  # the autouse fixture, imported to run both engines

pytestmark = pytest.mark.filterwarnings("error")


class Boom(Exception):
    pass


@attrs.define(eq=False)
class Tasked(Recorder):
    """Starts ``work(self, data)`` as a task for each chunk received."""

    work: Callable[[Tasked, bytes], Awaitable[object]] | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        assert self.work is not None
        self.transport.start_task(self.work, self, data)


def tasked(work: Callable[[Tasked, bytes], Awaitable[object]]) -> Made:
    return Made(lambda: Tasked(work=work))


# ----------------------------------------------------------------------
# start_task


async def test_a_task_writes_its_result_back() -> None:
    async def lookup(protocol: Tasked, data: bytes) -> None:
        await trio.sleep(0.01)  # the "database call"
        assert protocol.transport is not None
        protocol.transport.write(data.upper())

    factory = tasked(lookup)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"abc")
            assert await recv_exactly(client, 3) == b"ABC"
            await client.send_all(b"def")
            assert await recv_exactly(client, 3) == b"DEF"
            assert listener.statistics().active == 1
        assert listener.statistics().handler_errors == 0


async def test_drain_waits_for_tasks_then_cancels_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    cancelled: list[bytes] = []

    async def work(protocol: Tasked, data: bytes) -> None:
        assert protocol.transport is not None
        try:
            await trio.sleep(3 if data == b"quick" else 3600)
        except trio.Cancelled:
            cancelled.append(data)
            raise
        protocol.transport.write(b"done")
        protocol.transport.close()

    factory = tasked(work)
    async with listen(protocol=factory) as listener:
        quick = await connect(listener)
        slow = await connect(listener)
        await quick.send_all(b"quick")
        await slow.send_all(b"slow")
        await factory.wait(2)
        await trio.testing.wait_all_tasks_blocked()
        began = trio.current_time()
        result = await listener.drain(grace=5)
        assert trio.current_time() - began == pytest.approx(5)
        assert result == trio_evlisten.DrainResult(finished=1, failed=0, cancelled=1)
        assert cancelled == [b"slow"]
        assert await read_all(quick) == b"done"
        assert await read_all(slow) == b""
        assert listener.statistics().active == 0
        await quick.aclose()
        await slow.aclose()


async def test_a_raising_task_aborts_its_connection_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def work(protocol: Tasked, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if data == b"boom":
            raise Boom(data)
        assert protocol.transport is not None
        protocol.transport.write(data)

    factory = tasked(work)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as good,
            await connect(listener) as bad,
        ):
            await bad.send_all(b"boom")
            assert await read_all(bad) == b""
            protocol: Tasked = await factory.wait(2)
            await protocol.lost.wait()
            await good.send_all(b"ping")
            assert await recv_exactly(good, 4) == b"ping"
            stats = listener.statistics()
            assert (stats.handler_errors, stats.active) == (1, 1)
    bad_one = next(p for p in factory.made if p.received == b"boom")
    kind, exc = bad_one.events[-1]
    assert kind == "lost"
    assert isinstance(exc, Boom)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[1] is exc


async def test_a_task_raising_after_its_connection_is_lost_is_counted() -> None:
    go = trio.Event()

    async def work(protocol: Tasked, data: bytes) -> None:
        await go.wait()
        raise Boom(data)

    factory = tasked(work)
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                await client.send_all(b"x")
                protocol: Tasked = await factory.wait()
                await protocol.got.wait()
            await protocol.lost.wait()
            assert protocol.events[-1] == ("lost", None)
            go.set()
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert (stats.handler_errors, stats.active) == (1, 0)


async def test_handler_errors_raise_raises_a_tasks_error() -> None:
    async def work(protocol: Tasked, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        raise Boom(data)

    factory = tasked(work)
    with trio.fail_after(10), pytest.RaisesGroup(Boom, flatten_subgroups=True):
        async with (
            listen(protocol=factory, handler_errors="raise") as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"boom")
            await trio.sleep_forever()


async def test_max_connections_holds_while_a_task_outlives_its_connection() -> None:
    go = trio.Event()
    finished: list[bytes] = []

    async def work(protocol: Tasked, data: bytes) -> None:
        await go.wait()
        finished.append(data)

    factory = tasked(work)
    with trio.fail_after(10):
        async with listen(protocol=factory, max_connections=1) as listener:
            async with await connect(listener) as first:
                await first.send_all(b"first")
                protocol: Tasked = await factory.wait()
                await protocol.got.wait()
            await protocol.lost.wait()
            second = await connect(listener)  # waits in the kernel's backlog
            await trio.sleep(0.05)
            await trio.testing.wait_all_tasks_blocked()
            assert len(factory.made) == 1
            assert listener.statistics().active == 1
            go.set()
            await factory.wait(2)
            assert finished == [b"first"]
            await second.aclose()
            await factory.made[1].lost.wait()


async def test_start_task_is_checked_and_refused_once_closing() -> None:
    outcome: list[BaseException | None] = []

    async def nothing() -> None:
        await trio.lowlevel.checkpoint()

    async def one(x: int) -> None:
        await trio.lowlevel.checkpoint()

    class Checks(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert self.transport is not None
            calls: list[Callable[[], Any]] = [
                lambda: self.transport.start_task(print),  # type: ignore[union-attr,arg-type]
                lambda: self.transport.start_task(one),  # type: ignore[union-attr]
                lambda: self.transport.start_task(nothing, 1),  # type: ignore[union-attr]
            ]
            for call in calls:
                try:
                    call()
                except TypeError as exc:
                    outcome.append(exc)
            self.transport.close()
            try:
                self.transport.start_task(nothing)
            except RuntimeError as exc:
                outcome.append(exc)

    factory = Made(Checks)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            assert await read_all(client) == b""
    assert [type(exc) for exc in outcome] == [TypeError] * 3 + [RuntimeError]
    assert "not an async function" in str(outcome[0])
    assert "cannot take that" in str(outcome[1])
    assert "cannot take that" in str(outcome[2])
    assert "closing" in str(outcome[3]) or "lost" in str(outcome[3])


# ----------------------------------------------------------------------
# hand_over


@attrs.define(eq=False)
class Sniffer(Recorder):
    """Hands the connection over on its first bytes, after writing ``first``."""

    handler: Callable[..., Awaitable[object]] | None = None
    first: bytes = b""
    calls_after: list[str] = attrs.field(factory=list)
    handed: bool = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        assert self.handler is not None
        if self.handed:
            self.calls_after.append("data_received")
            return
        if self.first:
            self.transport.write(self.first)
        self.transport.hand_over(self.handler, "arg", data=bytes(self.received))
        self.handed = True


async def echo_after_data(
    stream: trio_evlisten.SocketStream, data: bytes, arg: str
) -> None:
    await stream.send_all(b"[" + data + b"|" + arg.encode() + b"]")
    async for chunk in stream:
        await stream.send_all(chunk)


async def test_hand_over_sniffed_bytes_then_the_stream() -> None:
    factory = Made(lambda: Sniffer(handler=echo_after_data, first=b"hi "))
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                await client.send_all(b"GET")
                assert await recv_exactly(client, 12) == b"hi [GET|arg]"
                for chunk in (b"ping", b"pong" * 1000):
                    await client.send_all(chunk)
                    assert await recv_exactly(client, len(chunk)) == chunk
                assert listener.statistics().active == 1
                protocol: Sniffer = await factory.wait()
                # connection_lost(None), and nothing after it.
                assert protocol.kinds() == ["made", "data", "lost"]
                assert protocol.events[-1] == ("lost", None)
                await client.send_eof()
                assert await read_all(client) == b""
            # The stream is closed just before the slot is given back.
            stats = listener.statistics()
            assert (stats.handler_errors, stats.accepted, stats.active) == (0, 1, 0)


async def test_hand_over_sends_the_write_buffer_first() -> None:
    # More than the kernel takes from one write to a client that does not
    # read yet, so the transport buffers the rest before hand_over.
    big = bytes(range(256)) * (16 * 1024)
    handed: list[int] = []

    async def handler(
        stream: trio_evlisten.SocketStream, data: bytes, arg: str
    ) -> None:
        handed.append(len(data))
        await stream.send_all(b"END")

    class Buffered(Sniffer):
        def data_received(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(big)
            handed.append(self.transport.get_write_buffer_size())
            super().data_received(data)

    factory = Made(lambda: Buffered(handler=handler))
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener, rcvbuf=4096) as client,
        ):
            await client.send_all(b"x")
            await factory.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert handed[0] > 0, "the write buffer held nothing"
            assert await read_all(client) == big + b"END"
    assert handed[1:] == [1]


async def test_drain_with_handed_over_handlers(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def handler(
        stream: trio_evlisten.SocketStream, data: bytes, arg: str
    ) -> None:
        if data == b"quick":
            await trio.sleep(2)
            await stream.send_all(b"bye")
            return
        await trio.sleep_forever()

    factory = Made(lambda: Sniffer(handler=handler))
    async with listen(protocol=factory) as listener:
        quick = await connect(listener)
        slow = await connect(listener)
        await quick.send_all(b"quick")
        await slow.send_all(b"slow")
        await factory.wait(2)
        await trio.testing.wait_all_tasks_blocked()
        assert listener.statistics().active == 2
        result = await listener.drain(grace=5)
        assert result == trio_evlisten.DrainResult(finished=1, failed=0, cancelled=1)
        assert await read_all(quick) == b"bye"
        assert await read_all(slow) == b""
        await quick.aclose()
        await slow.aclose()


async def test_hand_over_is_checked_and_refused_when_it_cannot_be() -> None:
    outcome: list[BaseException] = []

    async def handler(stream: trio_evlisten.SocketStream, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def wrong(stream: trio_evlisten.SocketStream) -> None:
        await trio.lowlevel.checkpoint()

    class Checks(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            t = self.transport
            assert t is not None
            calls: list[Callable[[], Any]] = [
                lambda: t.hand_over(wrong),
                lambda: t.hand_over(handler, data="text"),  # type: ignore[arg-type]
            ]
            for call in calls:
                try:
                    call()
                except TypeError as exc:
                    outcome.append(exc)
            t.write_eof()
            try:
                t.hand_over(handler)
            except RuntimeError as exc:
                outcome.append(exc)
            t.abort()
            try:
                t.hand_over(handler)
            except RuntimeError as exc:
                outcome.append(exc)

    factory = Made(Checks)
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                assert await read_all(client) == b""
            await (await factory.wait()).lost.wait()
            assert listener.statistics().handler_errors == 0
    assert [type(exc) for exc in outcome] == [TypeError] * 2 + [RuntimeError] * 2
    assert "cannot take that" in str(outcome[0])
    assert "'text'" in str(outcome[1])
    assert "write_eof" in str(outcome[2])
    assert "lost" in str(outcome[3])


# ----------------------------------------------------------------------
# handler_nursery=: the engine, tasks and handed-over handlers run there


async def test_handler_nursery_connections_outlive_the_block() -> None:
    where: list[trio.Nursery | None] = []

    async def work(protocol: Tasked, data: bytes) -> None:
        where.append(trio.lowlevel.current_task().parent_nursery)
        assert protocol.transport is not None
        protocol.transport.write(data.upper())

    factory = tasked(work)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with listen(protocol=factory, handler_nursery=nursery) as listener:
                client = await connect(listener)
                await client.send_all(b"in")
                assert await recv_exactly(client, 2) == b"IN"
            # The block closed the listener; its connection is still served.
            assert listener.closed
            await client.send_all(b"after")
            assert await recv_exactly(client, 5) == b"AFTER"
            await client.aclose()
        assert where == [nursery, nursery]
        protocol: Tasked = factory.made[0]
        assert protocol.kinds()[-1] == "lost"
        assert listener.statistics().active == 0


async def test_drain_in_a_handler_nursery_cancels_only_ours(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def work(protocol: Tasked, data: bytes) -> None:
        await trio.sleep_forever()

    async def hand(stream: trio_evlisten.SocketStream, data: bytes, arg: str) -> None:
        await trio.sleep_forever()

    tasks = tasked(work)
    handed = Made(lambda: Sniffer(handler=hand))
    sibling_done = trio.Event()

    async def sibling() -> None:
        await trio.sleep(100)
        sibling_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sibling)
        async with (
            listen(protocol=tasks, handler_nursery=nursery) as one,
            listen(protocol=handed, handler_nursery=nursery) as two,
        ):
            a = await connect(one)
            b = await connect(two)
            await a.send_all(b"a")
            await b.send_all(b"b")
            await handed.wait()
            await tasks.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert (one.statistics().active, two.statistics().active) == (1, 1)
            for listener in (one, two):
                result = await listener.drain(grace=5)
                assert result == trio_evlisten.DrainResult(
                    finished=0, failed=0, cancelled=1
                )
            assert await read_all(a) == b""
            assert await read_all(b) == b""
            await a.aclose()
            await b.aclose()
        assert not sibling_done.is_set()
    assert sibling_done.is_set()


async def test_hand_over_refuses_a_tls_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # TLS in protocol mode is another change's; what hand_over reads of it
    # is get_extra_info("ssl_object"), as asyncio's SSL transports give.
    def extra(self: Transport, name: str, default: Any = None) -> Any:
        return object() if name == "ssl_object" else default

    monkeypatch.setattr(Transport, "get_extra_info", extra)
    refused: list[RuntimeError] = []

    async def handler(stream: trio_evlisten.SocketStream, data: bytes) -> None:
        raise AssertionError("handed over a TLS transport")

    class TLSSniffer(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            try:
                self.transport.hand_over(handler, data=data)
            except RuntimeError as exc:
                refused.append(exc)
            self.transport.write(data)

    factory = Made(TLSSniffer)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"hi")
            assert await recv_exactly(client, 2) == b"hi"
    assert len(refused) == 1
    assert "TLS" in str(refused[0])


async def test_a_slot_is_held_by_a_task_and_a_handed_over_handler_alike() -> None:
    go = trio.Event()

    async def work() -> None:
        await go.wait()

    async def handler(stream: trio_evlisten.SocketStream, data: bytes) -> None:
        await stream.send_all(data)

    class Both(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.start_task(work)
            self.transport.hand_over(handler, data=data)

    factory = Made(Both)
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                await client.send_all(b"hi")
                assert await read_all(client) == b"hi"
            await trio.testing.wait_all_tasks_blocked()
            # The handler returned; the task still holds the slot.
            assert listener.statistics().active == 1
            go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().active == 0
