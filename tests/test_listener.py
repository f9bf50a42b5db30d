"""The listener's behaviour as users see it: callbacks, lifetime, methods.

Real sockets on 127.0.0.1 throughout (the accept-error paths live in
test_errors.py). "Not served" is checked with
``trio.testing.wait_all_tasks_blocked()``: a connect on loopback completes in
the kernel, so a listener whose gate were open would be woken by epoll and
would have started the handler before every task is blocked.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import socket
import struct
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import (
    ConnListener,
    Flag,
    ListenerStatistics,
    open_listener,
    serve_listener,
)
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from trio.testing import MockClock

LOCAL = ("127.0.0.1", 0)
CLOSE = Flag.CLOSE_ON_FREE


def sockname_of(stream: trio.SocketStream) -> Any:
    """The client's own address: what the listener's ``accept()`` reports."""
    return stream.socket.getsockname()


async def assert_refused(listener: ConnListener) -> None:
    """A connect to the listener's address is refused: nothing listens there."""
    with trio.socket.socket() as client, pytest.raises(ConnectionRefusedError):
        await client.connect(listener.sockname)


class Served:
    """An accept callback that records each connection's peer and returns.

    ``calls`` counts handler runs; ``addrs`` receives each peer address, so a
    test can wait (under ``fail_after``) for "this connection was served".
    """

    def __init__(self) -> None:
        self.calls = 0
        self._send, self.addrs = trio.open_memory_channel[Any](math.inf)

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        self.calls += 1
        self._send.send_nowait(addr)


# ----------------------------------------------------------------------
# Serving many clients


@pytest.mark.slow
async def test_200_concurrent_clients_each_get_their_own_bytes_back() -> None:
    n = 200
    payloads = {
        i: (f"client {i:03d} says hello; ".encode() * 200)[: 2000 + 13 * i]
        for i in range(n)
    }
    echoed: dict[int, bytes] = {}

    async def client(listener: ConnListener, i: int) -> None:
        async with await open_stream_to(listener) as stream:
            await stream.send_all(payloads[i])
            await stream.send_eof()
            buf = bytearray()
            async for chunk in stream:
                buf += chunk
            echoed[i] = bytes(buf)

    with trio.fail_after(10):
        async with open_listener(echo_handler, address=LOCAL, flags=CLOSE) as listener:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(client, listener, i)
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert stats.accepted == n
            assert stats.active == 0
    assert echoed == payloads


# ----------------------------------------------------------------------
# Callbacks


async def test_callback_gets_listener_conn_addr_and_args(
    stream_class: type[trio.abc.HalfCloseableStream],
) -> None:
    seen: list[tuple[object, object, object, tuple[object, ...]]] = []
    done = trio.Event()

    async def cb(
        listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: object
    ) -> None:
        seen.append((listener, conn, addr, args))
        await conn.send_all(b"x")
        done.set()

    with trio.fail_after(10):
        async with (
            open_listener(cb, "a", 1, address=LOCAL, flags=CLOSE) as listener,
            await open_stream_to(listener) as client,
        ):
            await done.wait()
            assert await recv_exactly(client, 1) == b"x"
            client_addr = sockname_of(client)
    [(got_listener, conn, addr, args)] = seen
    assert got_listener is listener
    assert type(conn) is stream_class
    assert addr == client_addr
    assert args == ("a", 1)


async def test_set_cb_sends_later_connections_to_the_new_callback() -> None:
    send, recv = trio.open_memory_channel[tuple[str, Any, tuple[object, ...]]](math.inf)

    async def first(
        listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: object
    ) -> None:
        send.send_nowait(("first", addr, args))

    async def second(
        listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: object
    ) -> None:
        send.send_nowait(("second", addr, args))

    with trio.fail_after(10):
        async with open_listener(first, 1, address=LOCAL, flags=CLOSE) as listener:
            async with await open_stream_to(listener) as client:
                assert await recv.receive() == ("first", sockname_of(client), (1,))
            listener.set_cb(second, "b", 2)
            async with await open_stream_to(listener) as client:
                assert await recv.receive() == (
                    "second",
                    sockname_of(client),
                    ("b", 2),
                )
            listener.set_cb(first)
            async with await open_stream_to(listener) as client:
                assert await recv.receive() == ("first", sockname_of(client), ())


async def test_set_cb_rejects_a_non_callable() -> None:
    with trio.fail_after(10):
        async with open_listener(Served(), address=LOCAL, flags=CLOSE) as listener:
            with pytest.raises(TypeError, match="42"):
                listener.set_cb(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("at_open", [False, True], ids=["set_cb_None", "cb_None"])
async def test_no_callback_leaves_connections_in_the_backlog(at_open: bool) -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(
            None if at_open else served, address=LOCAL, flags=CLOSE
        ) as listener:
            if not at_open:
                listener.set_cb(None)
            async with await open_stream_to(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                assert served.calls == 0
                assert listener.statistics().accepted == 0
                assert listener.enabled  # enabled, but waiting for a callback
                listener.set_cb(served)
                assert await served.addrs.receive() == sockname_of(client)
            assert served.calls == 1
            assert listener.statistics().accepted == 1


# ----------------------------------------------------------------------
# enable / disable


async def test_flag_disabled_starts_disabled_until_enable() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(
            served, address=LOCAL, flags=CLOSE | Flag.DISABLED
        ) as listener:
            assert listener.enabled is False
            assert listener.statistics().enabled is False
            async with await open_stream_to(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                assert served.calls == 0
                assert listener.statistics().accepted == 0
                listener.enable()
                listener.enable()  # idempotent
                assert listener.enabled is True
                assert await served.addrs.receive() == sockname_of(client)
            assert served.calls == 1


async def test_disable_holds_connections_until_enable() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(served, address=LOCAL, flags=CLOSE) as listener:
            assert listener.enabled is True
            async with await open_stream_to(listener) as client:
                assert await served.addrs.receive() == sockname_of(client)
            listener.disable()
            listener.disable()  # idempotent
            assert listener.enabled is False
            assert listener.statistics().enabled is False
            async with await open_stream_to(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                assert served.calls == 1
                listener.enable()
                assert await served.addrs.receive() == sockname_of(client)
            # Still enabled after another enable(): the next one is served too.
            listener.enable()
            async with await open_stream_to(listener) as client:
                assert await served.addrs.receive() == sockname_of(client)
            assert served.calls == 3
            assert listener.statistics().accepted == 3


async def test_methods_on_a_closed_listener_raise_but_close_is_idempotent() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(served, address=LOCAL, flags=CLOSE) as listener:
            listener.close()
            listener.close()
            await listener.aclose()
            assert listener.closed
            with pytest.raises(trio.ClosedResourceError, match="enable"):
                listener.enable()
            with pytest.raises(trio.ClosedResourceError, match="disable"):
                listener.disable()
            with pytest.raises(trio.ClosedResourceError, match="set_cb"):
                listener.set_cb(served)
            with pytest.raises(trio.ClosedResourceError, match="set_cb"):
                listener.set_cb(None)
            with pytest.raises(trio.ClosedResourceError, match="set_error_cb"):
                listener.set_error_cb(None)
        listener.close()
        await listener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            listener.enable()
    assert served.calls == 0


# ----------------------------------------------------------------------
# The method rows: fd, socket, nursery, set_error_cb


async def test_fd_socket_sockname_and_port_describe_the_listening_socket() -> None:
    with trio.fail_after(10):
        async with open_listener(Served(), address=LOCAL, flags=CLOSE) as listener:
            assert listener.fd == listener.socket.fileno() >= 0
            assert listener.socket.getsockname() == listener.sockname
            assert listener.sockname[0] == "127.0.0.1"
            assert listener.port == listener.sockname[1] > 0
            assert listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert isinstance(listener.nursery, trio.Nursery)
        assert listener.fd == -1
        # The address stays readable after close.
        assert listener.sockname[0] == "127.0.0.1"


async def test_set_error_cb_gets_listener_error_and_args(
    autojump_clock: MockClock,
) -> None:
    errors: list[tuple[object, OSError, tuple[object, ...]]] = []

    def error_cb(listener: ConnListener, error: OSError, *args: object) -> None:
        errors.append((listener, error, args))

    served = Served()
    emfile = OSError(errno.EMFILE, "Too many open files")
    with ScriptedSocket([emfile]) as sock:
        with trio.fail_after(10):
            async with open_listener(served, sock=sock) as listener:
                listener.set_error_cb(error_cb, "tag")
                async with await open_stream_to(listener) as client:
                    # After the backoff, the queued connection is accepted.
                    assert await served.addrs.receive() == sockname_of(client)
        assert errors == [(listener, emfile, ("tag",))]
        assert listener.statistics().errors == 1


# ----------------------------------------------------------------------
# close() and aclose()


async def test_close_inside_the_callback_serves_that_connection_only() -> None:
    handled = 0
    closed_in_handler = trio.Event()

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        nonlocal handled
        handled += 1
        listener.close()
        closed_in_handler.set()
        await echo_handler(listener, conn, addr)

    listener: ConnListener | None = None
    try:
        with trio.fail_after(10):
            # Without CLOSE_ON_FREE the socket keeps listening, so the later
            # clients do connect: only the listener can refuse to serve them.
            async with (
                open_listener(cb, address=LOCAL) as listener,
                await open_stream_to(listener) as first,
            ):
                # Taken (it outlives the block), so closing it is ours: below.
                _ = listener.socket
                await closed_in_handler.wait()
                assert listener.closed
                async with (
                    await open_stream_to(listener) as second,
                    await open_stream_to(listener) as third,
                ):
                    await first.send_all(b"ping")
                    assert await recv_exactly(first, 4) == b"ping"
                    await second.send_all(b"ignored?")
                    await third.send_all(b"ignored?")
                    await trio.testing.wait_all_tasks_blocked()
                    assert handled == 1
                    assert listener.statistics().accepted == 1
            assert handled == 1
            assert listener.statistics().accepted == 1
    finally:
        if listener is not None:
            listener.socket.close()


@pytest.mark.parametrize("how", ["leave", "close", "aclose"])
async def test_running_handler_finishes_and_the_block_waits_for_it(
    autojump_clock: MockClock, how: str
) -> None:
    started = trio.Event()
    finished_at: list[float] = []

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        await trio.sleep(1)  # work that takes a while (virtual time)
        await conn.send_all(b"done")
        finished_at.append(trio.current_time())

    with trio.fail_after(10):
        async with contextlib.AsyncExitStack() as stack:
            async with open_listener(cb, address=LOCAL, flags=CLOSE) as listener:
                client = await stack.enter_async_context(await open_stream_to(listener))
                await started.wait()
                t0 = trio.current_time()
                if how == "close":
                    listener.close()
                elif how == "aclose":
                    with trio.testing.assert_checkpoints():
                        await listener.aclose()
                if how != "leave":
                    assert listener.closed
                    assert listener.fd == -1
                    assert listener.statistics().active == 1
            # The handler was not cancelled, and the block waited for it.
            assert finished_at == [t0 + 1]
            assert trio.current_time() == t0 + 1
            assert await recv_exactly(client, 4) == b"done"
            assert await client.receive_some(10) == b""
            assert listener.statistics().active == 0


# ----------------------------------------------------------------------
# The listener owns the stream


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
async def test_listener_closes_the_stream_the_handler_left_open(
    raises: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Keep a reference, so that garbage collection cannot close the stream
    # behind the listener's back: only the listener's own close counts.
    kept: list[trio.SocketStream] = []

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        kept.append(conn)
        await conn.send_all(b"hi")
        if raises:
            raise ValueError("handler failed")

    with trio.fail_after(10):
        async with (
            open_listener(cb, address=LOCAL, flags=CLOSE) as listener,
            await open_stream_to(listener) as client,
        ):
            assert await recv_exactly(client, 2) == b"hi"
            assert await client.receive_some(10) == b""  # EOF
    assert listener.statistics().handler_errors == (1 if raises else 0)
    [conn] = kept
    with pytest.raises(trio.ClosedResourceError):
        await conn.send_all(b"closed?")


# ----------------------------------------------------------------------
# Handler supervision


async def test_handler_exception_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        first = await recv_exactly(conn, 4)
        if first == b"bad!":
            raise ValueError("bad request")
        await conn.send_all(first)
        await echo_handler(listener, conn, addr)

    with trio.fail_after(10):
        async with open_listener(cb, address=LOCAL, flags=CLOSE) as listener:
            async with await open_stream_to(listener) as good:
                await good.send_all(b"good")
                assert await recv_exactly(good, 4) == b"good"
                async with await open_stream_to(listener) as bad:
                    await bad.send_all(b"bad!")
                    assert await bad.receive_some(10) == b""  # closed for us
                # The other connection is untouched, and new ones are served.
                await good.send_all(b"more")
                assert await recv_exactly(good, 4) == b"more"
                async with await open_stream_to(listener) as later:
                    await later.send_all(b"late")
                    assert await recv_exactly(later, 4) == b"late"
            stats = listener.statistics()
            assert stats.handler_errors == 1
            assert stats.accepted == 3
            assert not listener.closed

    errors = [
        r
        for r in caplog.records
        if r.name == "trio_evlisten" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1
    [record] = errors
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError
    assert str(record.exc_info[1]) == "bad request"


async def test_peer_reset_in_a_handler_is_logged_at_debug_not_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")
    handler_done = trio.Event()

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        try:
            await conn.send_all(b"x")
            await conn.receive_some(10)  # the peer resets: BrokenResourceError
        finally:
            handler_done.set()

    with trio.fail_after(10):
        async with open_listener(cb, address=LOCAL, flags=CLOSE) as listener:
            async with await open_stream_to(listener) as client:
                assert await recv_exactly(client, 1) == b"x"
                # SO_LINGER 0: close() sends RST instead of FIN.
                client.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            await handler_done.wait()
    ours = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert [r.levelno for r in ours] == [logging.DEBUG]
    [record] = ours
    assert record.exc_info is not None
    assert record.exc_info[0] is trio.BrokenResourceError
    assert listener.statistics().accepted == 1


async def test_handler_errors_raise_propagates_out_of_open_listener() -> None:
    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        raise ValueError("strict")

    reached_end = False
    listener: ConnListener | None = None
    with trio.fail_after(10):
        with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="strict")):
            async with open_listener(
                cb, address=LOCAL, flags=CLOSE, handler_errors="raise"
            ) as listener:
                async with await open_stream_to(listener):
                    await trio.sleep_forever()
                reached_end = True
    assert not reached_end
    assert listener is not None
    assert listener.closed
    assert listener.fd == -1


async def test_handler_errors_must_be_log_or_raise() -> None:
    with pytest.raises(ValueError, match="bogus"):
        async with open_listener(
            Served(),
            address=LOCAL,
            flags=CLOSE,
            handler_errors="bogus",  # type: ignore[arg-type]
        ):
            pass  # pragma: no cover


@pytest.mark.parametrize("with_handler", [False, True])
async def test_exception_from_the_body_alone_comes_out_unwrapped(
    with_handler: bool,
) -> None:
    started = trio.Event()
    handler_cancelled = False

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        nonlocal handler_cancelled
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            handler_cancelled = True
            raise

    listeners: list[ConnListener] = []

    async def run_block() -> None:
        async with open_listener(cb, address=LOCAL, flags=CLOSE) as listener:
            listeners.append(listener)
            if with_handler:
                async with await open_stream_to(listener):
                    await started.wait()
                    raise KeyError("from the body")
            raise KeyError("from the body")

    with trio.fail_after(10), pytest.raises(KeyError) as excinfo:
        await run_block()
    assert excinfo.type is KeyError
    assert excinfo.value.args == ("from the body",)
    assert handler_cancelled is with_handler
    [listener] = listeners
    assert listener.closed
    assert listener.fd == -1


# ----------------------------------------------------------------------
# drain_timeout


async def test_drain_timeout_cancels_slow_handlers_after_exactly_that_long(
    autojump_clock: MockClock,
) -> None:
    started = trio.Semaphore(0, max_value=2)
    outcome: dict[bytes, tuple[str, float]] = {}

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        kind = await recv_exactly(conn, 5)
        started.release()
        try:
            if kind == b"stuck":
                await trio.sleep_forever()
            await trio.sleep(0.5)
        except trio.Cancelled:
            outcome[kind] = ("cancelled", trio.current_time())
            raise
        outcome[kind] = ("finished", trio.current_time())

    with trio.fail_after(10):
        async with (
            open_listener(cb, address=LOCAL, flags=CLOSE, drain_timeout=1) as listener,
            await open_stream_to(listener) as stuck,
            await open_stream_to(listener) as quick,
        ):
            await stuck.send_all(b"stuck")
            await quick.send_all(b"quick")
            await started.acquire()
            await started.acquire()
            t0 = trio.current_time()
        assert trio.current_time() == t0 + 1
    assert outcome == {
        b"quick": ("finished", t0 + 0.5),
        b"stuck": ("cancelled", t0 + 1),
    }


async def test_drain_timeout_none_waits_for_every_handler(
    autojump_clock: MockClock,
) -> None:
    started = trio.Event()
    finished_at: list[float] = []

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        await trio.sleep(100)
        finished_at.append(trio.current_time())

    with trio.fail_after(1000):
        async with (
            open_listener(cb, address=LOCAL, flags=CLOSE) as listener,
            await open_stream_to(listener),
        ):
            await started.wait()
            t0 = trio.current_time()
        assert finished_at == [t0 + 100]
        assert trio.current_time() == t0 + 100


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan])
async def test_drain_timeout_must_not_be_negative(bad: float) -> None:
    with pytest.raises(ValueError, match="drain_timeout"):
        async with open_listener(
            Served(), address=LOCAL, flags=CLOSE, drain_timeout=bad
        ):
            pass  # pragma: no cover


async def test_drain_timeout_with_handler_nursery_is_an_error() -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="handler_nursery"):
            async with open_listener(
                Served(),
                address=LOCAL,
                flags=CLOSE,
                drain_timeout=1,
                handler_nursery=nursery,
            ):
                pass  # pragma: no cover


# ----------------------------------------------------------------------
# handler_nursery and listener.nursery


async def test_handler_nursery_runs_handlers_that_outlive_the_block() -> None:
    started = trio.Event()
    release = trio.Event()
    finished = False

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        nonlocal finished
        started.set()
        await release.wait()
        await conn.send_all(b"bye")
        finished = True

    with trio.fail_after(10):
        async with contextlib.AsyncExitStack() as stack:
            async with trio.open_nursery() as nursery:
                async with open_listener(
                    cb, address=LOCAL, flags=CLOSE, handler_nursery=nursery
                ) as listener:
                    assert listener.nursery is nursery
                    client = await stack.enter_async_context(
                        await open_stream_to(listener)
                    )
                    await started.wait()
                # The block did not wait: the handler is still running.
                assert listener.closed
                assert listener.fd == -1
                assert not finished
                assert listener.statistics().active == 1
                release.set()
            assert finished
            assert await recv_exactly(client, 3) == b"bye"
            assert await client.receive_some(10) == b""
            assert listener.statistics().active == 0


async def test_cancelling_listener_nursery_from_a_handler_is_loopexit() -> None:
    parked = trio.Event()
    parked_cancelled = False
    body_went_on = False

    async def sleeper(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        nonlocal parked_cancelled
        parked.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            parked_cancelled = True
            raise

    async def quitter(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        listener.nursery.cancel_scope.cancel()

    with trio.fail_after(10):
        async with open_listener(sleeper, address=LOCAL, flags=CLOSE) as listener:
            async with await open_stream_to(listener):
                await parked.wait()
                listener.set_cb(quitter)
                async with await open_stream_to(listener):
                    await trio.sleep_forever()
            body_went_on = True  # pragma: no cover
        # No error came out of the block.
    assert not body_went_on
    assert parked_cancelled
    assert listener.closed
    assert listener.fd == -1
    assert listener.statistics().accepted == 2


# ----------------------------------------------------------------------
# max_connections


async def test_max_connections_caps_running_handlers() -> None:
    cap, n = 3, 10
    running = 0
    max_running = 0
    active_seen: list[int] = []
    gates: list[trio.Event] = []
    done_send, done_recv = trio.open_memory_channel[Any](math.inf)

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        nonlocal running, max_running
        running += 1
        max_running = max(max_running, running)
        active_seen.append(listener.statistics().active)
        gate = trio.Event()
        gates.append(gate)
        try:
            await gate.wait()
        finally:
            running -= 1
        done_send.send_nowait(addr)

    with trio.fail_after(10):
        async with (
            open_listener(
                cb, address=LOCAL, flags=CLOSE, max_connections=cap
            ) as listener,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(await open_stream_to(listener))
                for _ in range(n)
            ]
            await trio.testing.wait_all_tasks_blocked()
            assert running == cap
            assert len(gates) == cap
            stats = listener.statistics()
            assert (stats.accepted, stats.active) == (cap, cap)
            assert stats.max_connections == cap
            served = []
            # Each handler that finishes lets exactly one more in.
            for k in range(n):
                gates[k].set()
                served.append(await done_recv.receive())
                await trio.testing.wait_all_tasks_blocked()
                stats = listener.statistics()
                assert stats.accepted == min(cap + k + 1, n)
                assert stats.active == min(cap, n - k - 1)
                assert running == stats.active
            assert sorted(served) == sorted(sockname_of(c) for c in clients)
    assert max_running == cap
    assert max(active_seen) <= cap
    assert listener.statistics().accepted == n


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        ("x", TypeError),
        (True, TypeError),
        (2.5, TypeError),
    ],
)
async def test_max_connections_must_be_a_positive_int(
    bad: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="max_connections"):
        async with open_listener(
            Served(),
            address=LOCAL,
            flags=CLOSE,
            max_connections=bad,  # type: ignore[arg-type]
        ):
            pass  # pragma: no cover


# ----------------------------------------------------------------------
# serve_listener


async def test_serve_listener_returns_the_listener_and_serves_until_cancelled() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(
                functools.partial(
                    serve_listener, echo_handler, address=LOCAL, flags=CLOSE
                )
            )
            assert isinstance(listener, ConnListener)
            assert not listener.closed
            async with await open_stream_to(listener) as client:
                await client.send_all(b"served")
                assert await recv_exactly(client, 6) == b"served"
            nursery.cancel_scope.cancel()
        assert listener.closed
        assert listener.fd == -1
        await assert_refused(listener)


async def test_serve_listener_returns_after_close_once_handlers_finish() -> None:
    started = trio.Event()
    release = trio.Event()
    returned = trio.Event()

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.set()
        await release.wait()
        await conn.send_all(b"ok")

    async def run(
        *, task_status: trio.TaskStatus[ConnListener] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await serve_listener(cb, address=LOCAL, flags=CLOSE, task_status=task_status)
        returned.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener: ConnListener = await nursery.start(run)
            async with await open_stream_to(listener) as client:
                await started.wait()
                listener.close()
                assert listener.fd == -1
                await trio.testing.wait_all_tasks_blocked()
                assert not returned.is_set()
                release.set()
                await returned.wait()
                assert await recv_exactly(client, 2) == b"ok"
        assert returned.is_set()


# ----------------------------------------------------------------------
# statistics()


async def test_statistics_is_a_frozen_snapshot_consistent_with_events() -> None:
    started = trio.Semaphore(0, max_value=2)
    release = trio.Event()
    done = trio.Semaphore(0, max_value=2)

    async def cb(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        started.release()
        await release.wait()
        done.release()

    with trio.fail_after(10):
        async with open_listener(cb, address=LOCAL, flags=CLOSE) as listener:
            s0 = listener.statistics()
            assert isinstance(s0, ListenerStatistics)
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                s0.accepted = 5  # type: ignore[misc]
            assert (
                s0.accepted,
                s0.active,
                s0.errors,
                s0.paused_by_errors,
                s0.enabled,
                s0.closed,
            ) == (0, 0, 0, False, True, False)
            async with (
                await open_stream_to(listener),
                await open_stream_to(listener),
            ):
                await started.acquire()
                await started.acquire()
                s1 = listener.statistics()
                assert (s1.accepted, s1.active) == (2, 2)
                assert s0.accepted == 0  # a snapshot, not a live view
                release.set()
                await done.acquire()
                await done.acquire()
                await trio.testing.wait_all_tasks_blocked()
                s2 = listener.statistics()
                assert (s2.accepted, s2.active, s2.errors) == (2, 0, 0)
                assert s2.handler_errors == 0
            listener.disable()
            s3 = listener.statistics()
            assert (s3.enabled, s3.closed) == (False, False)
        s4 = listener.statistics()
        assert (s4.accepted, s4.active, s4.errors) == (2, 0, 0)
        assert s4.closed is True
        assert s4.paused_by_errors is False


# ----------------------------------------------------------------------
# Nothing is accepted after close


async def test_after_close_with_close_on_free_connects_are_refused() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(served, address=LOCAL, flags=CLOSE) as listener:
            async with await open_stream_to(listener) as client:
                assert await served.addrs.receive() == sockname_of(client)
            listener.close()
            assert listener.fd == -1
            await assert_refused(listener)
    assert served.calls == 1
    assert listener.statistics().accepted == 1


async def test_after_close_without_close_on_free_the_socket_stays_open() -> None:
    served = Served()
    listener: ConnListener | None = None
    try:
        with trio.fail_after(10):
            async with open_listener(served, address=LOCAL) as listener:
                listener.close()
                assert listener.closed
                # The socket is still open and listening: it is the caller's.
                assert listener.fd != -1
                assert listener.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ACCEPTCONN
                )
                async with await open_stream_to(listener):
                    await trio.testing.wait_all_tasks_blocked()
                    assert served.calls == 0
                    assert listener.statistics().accepted == 0
            assert listener.fd != -1
            # After the block, still nobody accepts the queued connection.
            async with await open_stream_to(listener):
                await trio.testing.wait_all_tasks_blocked()
            assert served.calls == 0
            assert listener.statistics().accepted == 0
    finally:
        if listener is not None:
            listener.socket.close()
