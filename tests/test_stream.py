"""trio_evlisten.SocketStream: trio's conformance suite, and each semantic alone.

Every pair is a real loopback TCP connection (listen on 127.0.0.1:0,
connect, accept), made by :func:`tcp_pair`, which takes the function that
wraps each end so other makers (the listener's own) can reuse it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import math
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import attrs
import pytest
import trio
import trio.testing

from tests.test_socket import is_nonblocking
from trio_evlisten import Flag, open_listener
from trio_evlisten._stream import NOTSENT_LOWAT, SocketStream
from trio_evlisten.testing import open_stream_to

#: Wraps one connected stdlib socket into a stream.
Wrap: TypeAlias = Callable[[socket.socket], trio.abc.HalfCloseableStream]
Pair: TypeAlias = tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]


def ours(sock: socket.socket) -> SocketStream:
    """Our stream over ``sock``."""
    return SocketStream(sock)


def trios(sock: socket.socket) -> trio.SocketStream:
    """trio's stream over ``sock``."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def tcp_sockets() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (accepted side, connecting side).

    Both are non-blocking (our stream would make the accepted one so itself;
    trio's from_stdlib_socket does too).
    """
    with socket.socket() as lsock:
        lsock.setblocking(False)
        client = socket.socket()
        try:
            client.setblocking(False)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            with contextlib.suppress(BlockingIOError):
                client.connect(lsock.getsockname())
            await trio.lowlevel.wait_writable(client)
            await trio.lowlevel.wait_readable(lsock)
            conn, _ = lsock.accept()
        except BaseException:
            client.close()
            raise
    conn.setblocking(False)
    return conn, client


async def tcp_pair(
    make_server_side: Wrap = ours,
    make_client_side: Wrap = trios,
) -> Pair:
    """A loopback TCP connection as (server-side stream, client-side stream)."""
    conn, client = await tcp_sockets()
    try:
        server = make_server_side(conn)
    except BaseException:
        conn.close()
        client.close()
        raise
    try:
        return server, make_client_side(client)
    except BaseException:
        client.close()
        await trio.aclose_forcefully(server)
        raise


async def fill(stream: trio.abc.SendStream) -> None:
    """Send until ``send_all`` blocks (the peer is not reading)."""

    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


def makers(
    make_pair: Callable[[], Awaitable[Pair]],
) -> tuple[Callable[[], Awaitable[Pair]], Callable[[], Awaitable[Pair]]]:
    """A stream maker and a clogged-stream maker for ``check_*_stream``.

    ``make_pair`` makes one connected pair, e.g.
    ``functools.partial(tcp_pair, ours, trios)``; the clogged maker fills
    both directions of a new pair until ``send_all`` blocks.
    """

    async def clogged_stream_maker() -> Pair:
        a, b = await make_pair()
        try:
            await fill(a)
            await fill(b)
        except BaseException:
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)
            raise
        return a, b

    return make_pair, clogged_stream_maker


# ----------------------------------------------------------------------
# trio's own conformance suite


@pytest.mark.parametrize(
    ("first", "second"),
    [(ours, trios), (trios, ours), (ours, ours)],
    ids=["ours-trio", "trio-ours", "ours-ours"],
)
async def test_conformance(first: Wrap, second: Wrap) -> None:
    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(
            *makers(functools.partial(tcp_pair, first, second))
        )


@pytest.mark.parametrize("server_first", [True, False], ids=["ours-peer", "peer-ours"])
async def test_conformance_of_streams_the_listener_hands_out(
    server_first: bool,
) -> None:
    """The stream as handlers get it: accepted, set up and owned by the listener."""
    send, receive = trio.open_memory_channel[trio.abc.HalfCloseableStream](math.inf)

    async def hand_out(listener: object, conn: SocketStream, addr: object) -> None:
        # The handler stays alive while the suite uses its stream (the
        # listener closes a stream when its handler returns).
        await send.send(conn)
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with open_listener(
            hand_out,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE,
            stream=SocketStream,
            drain_timeout=0,
        ) as listener:

            async def make_pair() -> Pair:
                client = await open_stream_to(listener)
                server = await receive.receive()
                assert type(server) is SocketStream
                return (server, client) if server_first else (client, server)

            await trio.testing.check_half_closeable_stream(*makers(make_pair))


# ----------------------------------------------------------------------
# Each semantic alone, on our stream with a raw peer socket


@attrs.frozen
class Conn:
    """Our stream, the stdlib socket under it, and the raw peer socket."""

    stream: SocketStream
    sock: socket.socket
    peer: socket.socket


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[Conn]:
    """Our stream over a loopback connection, and the other end raw."""
    conn, peer = await tcp_sockets()
    with peer:
        async with SocketStream(conn) as stream:
            yield Conn(stream, conn, peer)


async def peer_recv(peer: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from the raw peer socket (fewer at EOF)."""
    buf = bytearray()
    while len(buf) < n:
        await trio.lowlevel.wait_readable(peer)
        chunk = peer.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


#: One way to receive from our stream.
Receive: TypeAlias = Callable[[SocketStream], Awaitable[bytes]]
#: The two ways: ``receive_some()`` and ``async for`` (our ``__anext__``
#: repeats receive_some's body, so every receive test runs both).
RECEIVERS: dict[str, Receive] = {
    "receive_some": lambda stream: stream.receive_some(),
    "async for": lambda stream: stream.__anext__(),
}
receivers = pytest.mark.parametrize("receive", RECEIVERS.values(), ids=RECEIVERS.keys())


async def test_rejects_what_is_not_a_stdlib_stream_socket() -> None:
    # A socket of the wrong kind is a bad value (ValueError, as trio's
    # SocketStream raises); anything but a socket.socket is a bad type.
    with socket.socket(type=socket.SOCK_DGRAM) as dgram:
        with pytest.raises(ValueError, match=r"SOCK_STREAM socket, not <socket"):
            SocketStream(dgram)
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            trio.SocketStream(trio.socket.from_stdlib_socket(dgram))
    a, b = trio.socket.socketpair()
    with a, b, pytest.raises(TypeError, match=r"socket\.socket, not <trio\.socket"):
        SocketStream(a)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"socket\.socket, not 3"):
        SocketStream(3)  # type: ignore[arg-type]

    class Sub(socket.socket):
        pass

    with Sub() as sub, pytest.raises(TypeError, match=r"socket\.socket, not <"):
        SocketStream(sub)


async def test_makes_the_socket_non_blocking_and_sets_trios_tcp_options() -> None:
    conn, peer = await tcp_sockets()
    conn.setblocking(True)
    with peer:
        async with SocketStream(conn) as stream:
            assert conn.gettimeout() == 0.0
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                lowat = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                assert lowat == NOTSENT_LOWAT == 16384
            assert f"fd={conn.fileno()}" in repr(stream)


async def test_unix_sockets_work_too() -> None:
    """The TCP options are for TCP only; a Unix stream socket works as well."""
    a, b = socket.socketpair()
    async with SocketStream(a) as sa, SocketStream(b) as sb:
        await sa.send_all(b"ping")
        assert await sb.receive_some() == b"ping"
        await sb.send_eof()
        assert await sa.receive_some() == b""


@receivers
async def test_receive_in_a_cancelled_scope_raises_and_keeps_the_data(
    receive: Receive,
) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            c.peer.send(b"abc")
            await trio.lowlevel.wait_readable(c.sock)
            with trio.CancelScope() as scope:
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await receive(c.stream)
            assert await receive(c.stream) == b"abc"


async def test_async_for_receives_until_eof() -> None:
    with trio.fail_after(5):
        async with connected() as c:
            c.peer.send(b"one")
            c.peer.shutdown(socket.SHUT_WR)
            got = [data async for data in c.stream]
            assert b"".join(got) == b"one"
            with pytest.raises(StopAsyncIteration):  # and stays stopped
                await c.stream.__anext__()


async def test_async_for_waits_in_its_own_frame() -> None:
    """``__anext__`` is receive_some's body again, not a call to it.

    The copy kept in _stream.py: a connection idling in ``async for`` keeps
    one coroutine frame fewer alive (see the comment above ``__anext__``).
    """
    with trio.fail_after(5):
        async with connected() as c, trio.open_nursery() as nursery:
            nursery.start_soon(c.stream.__anext__)
            await trio.testing.wait_all_tasks_blocked()
            (task,) = nursery.child_tasks
            names = [frame.f_code.co_name for frame, _ in task.iter_await_frames()]
            assert names[:2] == ["__anext__", "wait_readable"], names
            nursery.cancel_scope.cancel()


async def test_send_all_in_a_cancelled_scope_raises_and_sends_nothing() -> None:
    with trio.fail_after(5):
        async with connected() as c:
            with trio.CancelScope() as scope:
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await c.stream.send_all(b"lost")
            await c.stream.send_all(b"kept")
            assert await peer_recv(c.peer, 4) == b"kept"


@pytest.mark.parametrize(
    "operation",
    ["receive_some", "send_all", "send_eof", "wait_send_all_might_not_block", "aclose"],
)
async def test_each_call_is_a_schedule_point_even_when_it_need_not_wait(
    operation: str,
) -> None:
    """Another task gets to run between two calls, though neither waits.

    trio runs each batch of ready tasks in a random order, so after one
    schedule point the other task may or may not have run yet; after two it
    must have.
    """
    with trio.fail_after(5):
        async with connected() as c:
            c.peer.send(b"ab")
            await trio.lowlevel.wait_readable(c.sock)
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "receive_some": lambda: c.stream.receive_some(1),
                "send_all": lambda: c.stream.send_all(b"x"),
                "send_eof": c.stream.send_eof,
                "wait_send_all_might_not_block": (
                    c.stream.wait_send_all_might_not_block
                ),
                "aclose": c.stream.aclose,
            }
            ran = []

            async def other() -> None:
                ran.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                await calls[operation]()
                await calls[operation]()
                assert ran == [True]


async def test_an_async_for_step_is_a_checkpoint_when_data_is_there() -> None:
    """As the test above, by trio's counters (a step takes all the data there
    is, so two steps cannot both find data without waiting in between)."""
    with trio.fail_after(5):
        async with connected() as c:
            c.peer.send(b"ab")
            await trio.lowlevel.wait_readable(c.sock)
            with trio.testing.assert_checkpoints():
                assert await c.stream.__anext__() == b"ab"


@pytest.mark.parametrize("first", RECEIVERS.values(), ids=RECEIVERS.keys())
@pytest.mark.parametrize("second", RECEIVERS.values(), ids=RECEIVERS.keys())
async def test_two_receivers_are_busy_blocked_or_not(
    first: Receive, second: Receive
) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            # The first receiver is blocked (trio's SocketStream notices this
            # case too, in wait_readable).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first, c.stream)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError, match="receiving"):
                    await second(c.stream)
                nursery.cancel_scope.cancel()
            # Two receivers start in the same batch, in trio's random order:
            # the one that runs first gets the data and is in its closing
            # schedule point when the other starts. It is still receiving, so
            # the other is refused (trio's SocketStream would block it).
            c.peer.send(b"abc")
            await trio.lowlevel.wait_readable(c.sock)
            results: list[bytes | BaseException] = []

            async def receiver(receive: Receive) -> None:
                try:
                    results.append(await receive(c.stream))
                except trio.BusyResourceError as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver, first)
                nursery.start_soon(receiver, second)
            assert len(results) == 2
            assert b"abc" in results
            results.remove(b"abc")
            assert isinstance(results[0], trio.BusyResourceError)
            # The cancelled and the refused calls left nothing behind.
            c.peer.send(b"def")
            assert await first(c.stream) == b"def"
            c.peer.send(b"ghi")
            assert await second(c.stream) == b"ghi"


@pytest.mark.parametrize("blocked", ["send_all", "wait_send_all_might_not_block"])
async def test_a_second_sender_is_busy(blocked: str) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            await fill(c.stream)
            first: dict[str, Callable[[], Awaitable[object]]] = {
                "send_all": lambda: c.stream.send_all(b"x" * 1000),
                "wait_send_all_might_not_block": (
                    c.stream.wait_send_all_might_not_block
                ),
            }
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first[blocked])
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError, match="sending"):
                    await c.stream.send_all(b"y")
                with pytest.raises(trio.BusyResourceError, match="sending"):
                    await c.stream.wait_send_all_might_not_block()
                with pytest.raises(trio.BusyResourceError, match="sending"):
                    await c.stream.send_eof()
                nursery.cancel_scope.cancel()
            # The cancelled call let go: sending works again once drained.
            c.peer.setblocking(True)
            await c.stream.send_eof()
            while await trio.to_thread.run_sync(c.peer.recv, 1 << 20):
                pass


@pytest.mark.parametrize(
    "operation",
    ["receive_some", "async for", "send_all", "wait_send_all_might_not_block"],
)
async def test_close_wakes_a_blocked_call_with_closed_resource_error(
    operation: str,
) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            if operation not in RECEIVERS:
                await fill(c.stream)
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "receive_some": c.stream.receive_some,
                "async for": c.stream.__anext__,
                "send_all": lambda: c.stream.send_all(b"x" * 1000),
                "wait_send_all_might_not_block": (
                    c.stream.wait_send_all_might_not_block
                ),
            }

            async def blocked() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await calls[operation]()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked)
                await trio.testing.wait_all_tasks_blocked()
                c.stream._close()
                c.stream._close()  # idempotent
            assert c.sock.fileno() == -1


async def test_calls_on_a_closed_stream_raise_closed_resource_error() -> None:
    with trio.fail_after(5):
        async with connected() as c:
            await c.stream.aclose()
            await c.stream.aclose()  # idempotent
            assert c.sock.fileno() == -1
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.receive_some()
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.__anext__()
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.send_all(b"x")
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.send_all(b"")
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.wait_send_all_might_not_block()
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.send_eof()


async def test_cancelled_aclose_still_closes() -> None:
    async with connected() as c:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await c.stream.aclose()
        assert c.sock.fileno() == -1


@receivers
async def test_a_socket_closed_under_the_stream_is_closed_not_broken(
    receive: Receive,
) -> None:
    """EBADF becomes ClosedResourceError, with the OSError suppressed (as trio)."""
    with trio.fail_after(5):
        async with connected() as c:
            c.sock.close()  # behind the stream's back: the next call sees EBADF
            with pytest.raises(trio.ClosedResourceError) as receiving:
                await receive(c.stream)
            with pytest.raises(trio.ClosedResourceError) as sending:
                await c.stream.send_all(b"x")
            with pytest.raises(trio.ClosedResourceError):
                await c.stream.send_eof()
            for info in (receiving, sending):
                assert info.value.__cause__ is None
                assert info.value.__suppress_context__


@receivers
async def test_a_reset_connection_is_broken_from_the_oserror(receive: Receive) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            # SO_LINGER 0: close() sends a RST instead of a FIN.
            c.peer.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            c.peer.close()
            await trio.lowlevel.wait_readable(c.sock)
            with pytest.raises(trio.BrokenResourceError) as receiving:
                await receive(c.stream)
            assert isinstance(receiving.value.__cause__, OSError)
            assert receiving.value.__cause__.errno == errno.ECONNRESET
            with pytest.raises(trio.BrokenResourceError) as sending:
                await c.stream.send_all(b"x")
            assert isinstance(sending.value.__cause__, OSError)


@receivers
async def test_a_blocked_receive_wakes_for_data_then_eof(receive: Receive) -> None:
    with trio.fail_after(5):
        async with connected() as c:
            got: list[bytes] = []

            async def receive_into_got() -> None:
                try:
                    got.append(await receive(c.stream))
                except StopAsyncIteration:
                    got.append(b"<stop>")

            for send in (
                lambda: c.peer.send(b"x"),
                lambda: c.peer.shutdown(socket.SHUT_WR),
            ):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive_into_got)
                    await trio.testing.wait_all_tasks_blocked()
                    send()
            eof = b"" if receive is RECEIVERS["receive_some"] else b"<stop>"
            assert got == [b"x", eof]


@receivers
async def test_a_blocked_receive_wakes_broken_on_reset(receive: Receive) -> None:
    with trio.fail_after(5):
        async with connected() as c:

            async def receive_broken() -> None:
                with pytest.raises(trio.BrokenResourceError) as info:
                    await receive(c.stream)
                assert isinstance(info.value.__cause__, ConnectionResetError)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_broken)
                await trio.testing.wait_all_tasks_blocked()
                c.peer.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                c.peer.close()


@pytest.mark.parametrize("max_bytes", [0, -1])
async def test_max_bytes_below_one_is_a_value_error(max_bytes: int) -> None:
    async with connected() as c:
        with pytest.raises(
            ValueError, match=f"max_bytes must be >= 1, not {max_bytes}"
        ):
            await c.stream.receive_some(max_bytes)
        with pytest.raises(TypeError):
            await c.stream.receive_some(1.5)  # type: ignore[arg-type]
        # Refused calls left no busy flag behind.
        c.peer.send(b"a")
        with trio.fail_after(5):
            assert await c.stream.receive_some(1) == b"a"


async def test_send_eof_then_send_all_is_closed_and_receiving_goes_on() -> None:
    with trio.fail_after(5):
        async with connected() as c:
            await c.stream.send_all(b"bye")
            await c.stream.send_eof()
            await c.stream.send_eof()  # idempotent
            with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
                await c.stream.send_all(b"more")
            with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
                await c.stream.send_all(b"")
            assert await peer_recv(c.peer, 100) == b"bye"  # then EOF
            c.peer.send(b"still")
            assert await c.stream.receive_some() == b"still"


async def test_eof_sent_through_the_trio_socket_counts_as_send_eof() -> None:
    """As with trio's SocketStream, ``stream.socket.shutdown(SHUT_WR)`` is an EOF."""
    with trio.fail_after(5):
        async with connected() as c:
            c.stream.socket.shutdown(socket.SHUT_WR)
            with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
                await c.stream.send_all(b"x")
            await c.stream.send_eof()  # no second shutdown, no error
            with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
                await c.stream.send_all(b"x")
            assert await peer_recv(c.peer, 1) == b""


async def test_send_eof_through_the_stream_shows_on_the_trio_socket() -> None:
    async with connected() as c:
        tsock = c.stream.socket
        await c.stream.send_eof()
        assert tsock.did_shutdown_SHUT_WR


async def test_setsockopt_getsockopt_round_trip() -> None:
    async with connected() as c:
        s = c.stream
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, False)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 4)
        assert raw == struct.pack("i", 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 7))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == struct.pack(
            "ii", 1, 7
        )
        with pytest.raises(TypeError, match="invalid value for argument 'value'"):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, False, 5)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="invalid value for argument 'value'"):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, None)  # type: ignore[call-overload]
        if hasattr(socket, "SO_BINDTODEVICE"):
            # Unprivileged, older kernels refuse it.
            with contextlib.suppress(PermissionError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, None, 0)


async def test_socket_is_a_trio_socket_on_the_same_socket_made_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[socket.socket] = []
    real = trio.socket.from_stdlib_socket

    def counting(sock: socket.socket) -> trio.socket.SocketType:
        made.append(sock)
        return real(sock)

    monkeypatch.setattr(trio.socket, "from_stdlib_socket", counting)
    with trio.fail_after(5):
        async with connected() as c:
            # The hot paths never make one.
            c.peer.send(b"x")
            assert await c.stream.receive_some() == b"x"
            await c.stream.send_all(b"y")
            await c.stream.wait_send_all_might_not_block()
            assert made == []
            tsock = c.stream.socket
            assert isinstance(tsock, trio.socket.SocketType)
            assert c.stream.socket is tsock
            assert made == [c.sock]
            assert tsock.fileno() == c.sock.fileno()
            await c.stream.aclose()
            assert c.stream.socket is tsock
            assert tsock.fileno() == -1


async def test_socket_asked_for_first_after_close_is_closed_resource_error() -> None:
    async with connected() as c:
        await c.stream.aclose()
        with pytest.raises(trio.ClosedResourceError, match="closed before"):
            _ = c.stream.socket


# ----------------------------------------------------------------------
# send_all beyond one send(): partial sends, buffers, views

BIG = 4 * 1024 * 1024


async def send_and_collect(
    data: bytes | bytearray | memoryview, expected: bytes
) -> None:
    """send_all ``data`` (bigger than the kernel's buffers) from ours; check it."""
    with trio.fail_after(10):
        server, client = await tcp_pair()
        async with server, client:
            got = bytearray()

            async def receive() -> None:
                await trio.testing.wait_all_tasks_blocked()  # sender is stuck
                while len(got) < len(expected):
                    got.extend(await client.receive_some())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await server.send_all(data)
            assert got == expected


async def test_send_all_of_a_big_bytearray_releases_it_afterwards() -> None:
    data = bytearray(i % 251 for i in range(BIG))
    await send_and_collect(data, bytes(data))
    data += b"resizable"  # no memoryview left exporting its buffer


async def test_send_all_counts_bytes_of_a_wide_memoryview() -> None:
    """A partial send of int items resumes at the right byte, not item."""
    ints = array.array("i", range(BIG // 4))
    await send_and_collect(memoryview(ints), ints.tobytes())


@pytest.mark.parametrize("stream", [SocketStream, trio.SocketStream])
async def test_handlers_streams_have_the_tcp_options_whoever_set_them(
    stream: type[SocketStream] | type[trio.SocketStream],
) -> None:
    """Ours come with them from the listening socket (Linux copies them into
    each accepted socket); trio's set them on each. Either way, as trio does."""
    seen: list[tuple[int, int, bool]] = []

    async def report(listener: object, conn: Any, addr: object) -> None:
        seen.append(
            (
                conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT),
                is_nonblocking(conn.socket.fileno()),
            )
        )

    with trio.fail_after(10):
        async with (
            open_listener(
                report,
                address=("127.0.0.1", 0),
                flags=Flag.CLOSE_ON_FREE,
                stream=stream,
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            assert await client.receive_some() == b""
    assert seen == [(1, NOTSENT_LOWAT, True)]
