"""Protocol mode: asyncio Protocols served by the listener's engine.

Every test runs under both engines (the ``engine`` fixture): the epoll one
and the task-per-connection fallback, which must behave the same.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

import trio_evlisten
from benchmarks.pyservers import EchoProtocol
from trio_evlisten import _engine
from trio_evlisten._cli import parse_args, serve_echo
from trio_evlisten._transport import Transport

from .asyncio_docs_echo import EchoServerProtocol
from .conftest import recv_exactly
from .test_examples import EXAMPLES, load_echo, start_echo, stop

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_evlisten import ConnListener

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True, params=["epoll", "tasks"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test under the epoll engine and under the fallback."""
    name: str = request.param
    monkeypatch.setattr(_engine, "ENGINE", name)
    return name


@attrs.define(eq=False)
class Recorder(asyncio.Protocol):
    """Records every call; replies as told."""

    events: list[tuple[Any, ...]] = attrs.field(factory=list)
    received: bytearray = attrs.field(factory=bytearray)
    transport: Transport | None = None
    keep_open: bool = False
    lost: trio.Event = attrs.field(factory=trio.Event)
    got: trio.Event = attrs.field(factory=trio.Event)
    echo: bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, Transport)
        self.transport = transport
        self.events.append(("made",))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", len(data)))
        self.received += data
        self.got.set()
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.events.append(("eof",))
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        self.lost.set()

    def pause_writing(self) -> None:
        self.events.append(("pause_writing",))

    def resume_writing(self) -> None:
        self.events.append(("resume_writing",))

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events]


@attrs.define(eq=False)
class Made:
    """A protocol factory that keeps every protocol it made."""

    cls: Callable[[], Any] = Recorder
    made: list[Any] = attrs.field(factory=list)
    one: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self) -> Any:
        protocol = self.cls()
        self.made.append(protocol)
        self.one.set()
        return protocol

    async def wait(self, n: int = 1) -> Any:
        while len(self.made) < n:
            self.one = trio.Event()
            await self.one.wait()
        return self.made[n - 1]


@functools.wraps(trio_evlisten.open_listener)
def listen(**options: Any) -> Any:
    options.setdefault("address", ("127.0.0.1", 0))
    options.setdefault("flags", trio_evlisten.Flag.CLOSE_ON_FREE)
    return trio_evlisten.open_listener(**options)


async def connect(listener: ConnListener, rcvbuf: int = 0) -> trio.SocketStream:
    if not rcvbuf:
        return await trio.open_tcp_stream("127.0.0.1", listener.port)
    sock = trio.socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", listener.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    async for chunk in stream:
        data += chunk
    return bytes(data)


# ----------------------------------------------------------------------
# Protocols we did not write run unchanged


async def test_asyncio_docs_echo_protocol_runs_unchanged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(10):
        async with (
            listen(protocol=EchoServerProtocol) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"hello")
            assert await read_all(client) == b"hello"  # then it closes
            peer = client.socket.getsockname()
    out = capsys.readouterr().out
    assert f"Connection from {peer}" in out
    assert "Data received: 'hello'" in out
    assert "Close the client socket" in out


async def test_benchmark_echo_protocol_with_a_peer_that_does_not_read() -> None:
    """The benchmarks' EchoProtocol pauses reading while its buffer is full."""
    calls: list[str] = []
    paused = trio.Event()

    class Counted(EchoProtocol):
        def pause_writing(self) -> None:
            calls.append("pause")
            paused.set()
            super().pause_writing()

        def resume_writing(self) -> None:
            calls.append("resume")
            super().resume_writing()

    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    with trio.fail_after(20):
        async with (
            listen(protocol=Counted) as listener,
            await connect(listener, rcvbuf=4096) as client,
        ):
            # Send all of it before reading a byte: the server's writes
            # must buffer, pause, and resume once we read. (A small
            # receive buffer, or loopback's would take it all.)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                await paused.wait()
                echoed = await recv_exactly(client, len(payload))
            assert echoed == payload
    assert calls[0] == "pause"
    assert "resume" in calls


# ----------------------------------------------------------------------
# The transport's methods


async def test_transport_surface() -> None:
    factory = Made()
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                protocol: Recorder = await factory.wait()
                transport = protocol.transport
                assert transport is not None
                assert transport.listener is listener
                assert transport.get_extra_info("peername") == (
                    client.socket.getsockname()
                )
                assert transport.get_extra_info("sockname") == listener.sockname
                sock = transport.get_extra_info("socket")
                assert sock.fileno() == transport._sock.fileno()
                assert transport.get_extra_info("nothing", 7) == 7
                assert transport.get_protocol() is protocol
                assert transport.can_write_eof()
                assert not transport.is_closing()
                assert transport.get_write_buffer_size() == 0
                assert transport.get_write_buffer_limits() == (16384, 65536)
                transport.set_write_buffer_limits(high=100)
                assert transport.get_write_buffer_limits() == (25, 100)
                transport.set_write_buffer_limits(low=10)
                assert transport.get_write_buffer_limits() == (10, 40)
                with pytest.raises(ValueError, match=r"high \(1\) must be >= low"):
                    transport.set_write_buffer_limits(high=1, low=2)
                with pytest.raises(TypeError, match="bytes-like object, not 'str'"):
                    transport.write("text")  # type: ignore[arg-type]
                transport.write(b"")
                transport.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
                assert await recv_exactly(client, 3) == b"abc"
                transport.write_eof()
                with pytest.raises(RuntimeError, match="after write_eof"):
                    transport.write(b"x")
                assert await client.receive_some(10) == b""  # our EOF
                # Half-closed: the peer may still send.
                await client.send_all(b"more")
                await protocol.got.wait()
                assert protocol.received == b"more"
            await protocol.lost.wait()
            assert transport.is_closing()
            assert listener.statistics().active == 0
    assert protocol.kinds() == ["made", "data", "eof", "lost"]
    assert protocol.events[-1] == ("lost", None)


async def test_pause_and_resume_reading() -> None:
    factory = Made()
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            protocol: Recorder = await factory.wait()
            transport = protocol.transport
            assert transport is not None
            assert transport.is_reading()
            transport.pause_reading()
            transport.pause_reading()  # idempotent
            assert not transport.is_reading()
            await client.send_all(b"held")
            await trio.sleep(0.05)
            await trio.testing.wait_all_tasks_blocked()
            assert protocol.received == b""
            transport.resume_reading()
            assert transport.is_reading()
            await protocol.got.wait()
            assert protocol.received == b"held"
            transport.close()
            assert not transport.is_reading()
            assert await read_all(client) == b""
            await protocol.lost.wait()


async def test_close_flushes_the_buffer_first() -> None:
    payload = b"x" * (8 * 1024 * 1024)
    factory = Made()
    with trio.fail_after(20):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            protocol: Recorder = await factory.wait()
            transport = protocol.transport
            assert transport is not None
            transport.write(payload)
            assert transport.get_write_buffer_size() > 0
            assert ("pause_writing",) in protocol.events
            transport.close()
            transport.close()  # idempotent
            assert transport.is_closing()
            assert not protocol.lost.is_set()
            assert await read_all(client) == payload
            await protocol.lost.wait()
    assert protocol.kinds().count("lost") == 1
    assert protocol.events[-1] == ("lost", None)
    assert ("resume_writing",) in protocol.events


async def test_abort_drops_the_buffer() -> None:
    payload = b"x" * (8 * 1024 * 1024)
    factory = Made()
    with trio.fail_after(20):
        async with listen(protocol=factory) as listener:
            async with await connect(listener) as client:
                protocol: Recorder = await factory.wait()
                transport = protocol.transport
                assert transport is not None
                transport.write(payload)
                transport.abort()
                transport.abort()
                transport.write(b"dropped")  # lost: dropped silently
                assert transport.get_write_buffer_size() == 0
                await protocol.lost.wait()
                try:
                    got = await read_all(client)
                except trio.BrokenResourceError:
                    got = b""
                assert len(got) < len(payload)
            assert listener.statistics().active == 0
    assert protocol.events[-1] == ("lost", None)
    assert protocol.kinds().count("lost") == 1


@pytest.mark.parametrize("keep_open", [False, True])
async def test_half_close(keep_open: bool) -> None:
    factory = Made(functools.partial(Recorder, keep_open=keep_open))
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"question")
            await client.send_eof()
            protocol: Recorder = await factory.wait()
            while "eof" not in protocol.kinds():
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.01)
            transport = protocol.transport
            assert transport is not None
            if keep_open:
                # Still open for writing: answer after the peer's EOF.
                assert not transport.is_closing()
                transport.write(b"answer")
                transport.close()
                assert await read_all(client) == b"answer"
            else:
                # eof_received() returned a false value: closed.
                assert transport.is_closing()
                assert await read_all(client) == b""
            await protocol.lost.wait()
    assert protocol.kinds() == ["made", "data", "eof", "lost"]


async def test_reset_gives_connection_lost_the_error() -> None:
    factory = Made()
    with trio.fail_after(10):
        async with listen(protocol=factory) as listener:
            client = await connect(listener)
            protocol: Recorder = await factory.wait()
            # SO_LINGER with a zero timeout: close() sends RST.
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await client.aclose()
            await protocol.lost.wait()
            assert listener.statistics().handler_errors == 0
    kind, exc = protocol.events[-1]
    assert kind == "lost"
    assert isinstance(exc, ConnectionResetError)


async def test_buffered_protocol() -> None:
    received = bytearray()
    lost = trio.Event()

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(5)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            received.extend(self.buf[:nbytes])
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(self.buf[:nbytes].upper())

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    with trio.fail_after(10):
        async with listen(protocol=Buffered) as listener:
            async with await connect(listener) as client:
                await client.send_all(b"hello world")
                assert await recv_exactly(client, 11) == b"HELLO WORLD"
            await lost.wait()
    assert received == b"hello world"


# ----------------------------------------------------------------------
# Errors in protocol callbacks


class Boom(Exception):
    pass


class Raises(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if data == b"boom":
            raise Boom("from data_received")
        assert self.transport is not None
        self.transport.write(data)


async def test_a_raising_callback_aborts_its_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory = Made(Raises)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as good,
            await connect(listener) as bad,
        ):
            await good.send_all(b"ping")
            assert await recv_exactly(good, 4) == b"ping"
            await bad.send_all(b"boom")
            assert await read_all(bad) == b""
            await good.send_all(b"pong")
            assert await recv_exactly(good, 4) == b"pong"
            assert listener.statistics().handler_errors == 1
            assert listener.statistics().active == 1
    failed = factory.made[1]
    kind, exc = failed.events[-1]
    assert kind == "lost"
    assert isinstance(exc, Boom)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[1] is exc


async def test_handler_errors_raise_propagates() -> None:
    factory = Made(Raises)
    with trio.fail_after(10), pytest.RaisesGroup(Boom, flatten_subgroups=True):
        async with listen(protocol=factory, handler_errors="raise") as listener:
            other = await connect(listener)
            async with await connect(listener) as bad:
                await factory.wait(2)
                await bad.send_all(b"boom")
                await trio.sleep_forever()
    await other.aclose()
    # The other connection was aborted and told.
    assert factory.made[0].events[-1] == ("lost", None)


async def test_a_raising_factory_or_connection_made() -> None:
    def bad_factory() -> asyncio.Protocol:
        raise Boom("factory")

    class BadMade(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            raise Boom("connection_made")

    with trio.fail_after(10):
        async with listen(protocol=bad_factory) as listener:
            async with await connect(listener) as client:
                assert await read_all(client) == b""
            # Counted before the socket closed, so before the client saw EOF.
            assert listener.statistics().handler_errors == 1
            assert listener.statistics().active == 0
            factory = Made(BadMade)
            listener.set_cb(factory)
            async with await connect(listener) as client:
                assert await read_all(client) == b""
            protocol: Recorder = await factory.wait()
            await protocol.lost.wait()
            assert listener.statistics().handler_errors == 2
    assert protocol.kinds() == ["made", "lost"]


async def test_slow_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Slow(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            time.sleep(0.15)  # blocking on purpose: what the warning is for

    factory = Made(Slow)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"x")
            protocol: Recorder = await factory.wait()
            await protocol.got.wait()
    assert any("took" in r.getMessage() for r in caplog.records)


async def test_other_tasks_run_while_a_connection_stays_ready() -> None:
    # A one-byte buffer keeps the connection readable for thousands of
    # wakes: the engine must checkpoint between batches all the same (it
    # skips wait_readable while connections are known to be ready).
    class OneByte(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(1)
            self.n = 0
            self.first = trio.Event()

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.n += nbytes
            self.first.set()

    factory = Made(OneByte)
    sent = 64 * 1024
    with trio.fail_after(10):
        async with (
            listen(protocol=factory) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"x" * sent)
            protocol: OneByte = await factory.wait()
            await protocol.first.wait()
            for _ in range(20):
                await trio.lowlevel.checkpoint()
            assert 0 < protocol.n < sent


# ----------------------------------------------------------------------
# The listener's features in protocol mode


async def test_drain_closes_finished_ones_and_aborts_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    class ClosesOnData(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.write(data)
            if self.transport.listener.draining:
                self.transport.close()

    factory = Made(ClosesOnData)
    async with listen(protocol=factory) as listener:
        polite = await connect(listener)
        idle = await connect(listener)
        await factory.wait(2)
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                result.append(await listener.drain(grace=5))

            result: list[trio_evlisten.DrainResult] = []
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.draining
            await polite.send_all(b"bye")
            assert await read_all(polite) == b"bye"
        assert result == [trio_evlisten.DrainResult(finished=1, failed=0, cancelled=1)]
        assert await read_all(idle) == b""
        assert factory.made[1].events[-1] == ("lost", None)
        assert listener.statistics().active == 0
        await polite.aclose()
        await idle.aclose()


async def test_cancelling_the_nursery_aborts_every_transport() -> None:
    factory = Made()
    clients = []
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with listen(protocol=factory) as listener:
                for _ in range(3):
                    clients.append(await connect(listener))
                await factory.wait(3)
                scope.cancel()
        for client in clients:
            assert await read_all(client) == b""
            await client.aclose()
    for protocol in factory.made:
        assert protocol.kinds() == ["made", "lost"]


async def test_max_connections() -> None:
    factory = Made()
    with trio.fail_after(10):
        async with listen(protocol=factory, max_connections=1) as listener:
            first = await connect(listener)
            second = await connect(listener)  # waits in the kernel's backlog
            await factory.wait()
            await trio.sleep(0.05)
            await trio.testing.wait_all_tasks_blocked()
            assert len(factory.made) == 1
            assert listener.statistics().active == 1
            await first.aclose()
            await factory.wait(2)
            assert listener.statistics().active == 1
            await second.aclose()
            await factory.made[1].lost.wait()


async def test_proxy_header_comes_before_the_protocol() -> None:
    factory = Made(functools.partial(Recorder, echo=True))
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, proxy_protocol=True) as listener,
            await connect(listener) as client,
        ):
            await client.send_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\nhi")
            assert await recv_exactly(client, 2) == b"hi"
            protocol: Recorder = await factory.wait()
            assert protocol.transport is not None
            peer = protocol.transport.get_extra_info("peername")
            assert peer == ("192.0.2.1", 5555)
            assert protocol.received == b"hi"
            assert listener.statistics().pending == 0


async def test_many_connections(engine: str) -> None:
    n = 2000 if engine == "epoll" else 500
    with trio.fail_after(60):
        async with listen(protocol=EchoProtocol, max_connections=n) as listener:
            clients = []
            for _ in range(n):
                clients.append(await connect(listener))
            for i, client in enumerate(clients):
                await client.send_all(b"%d" % i)
            for i, client in enumerate(clients):
                assert await recv_exactly(client, len(b"%d" % i)) == b"%d" % i
            assert listener.statistics().active == n
            for client in clients:
                await client.aclose()


# ----------------------------------------------------------------------
# Arguments


async def test_arguments_are_checked() -> None:
    async def handler(*args: object) -> None:
        pass

    with pytest.raises(TypeError, match="both an accept callback"):
        async with listen(cb=handler, protocol=Recorder):
            pass
    with pytest.raises(TypeError, match="is an async function"):
        async with listen(protocol=handler):
            pass
    with pytest.raises(TypeError, match="must be a protocol factory"):
        async with listen(protocol=3):
            pass
    with pytest.raises(ValueError, match="LEAVE_SOCKETS_BLOCKING"):
        async with listen(
            protocol=Recorder,
            flags=trio_evlisten.Flag.LEAVE_SOCKETS_BLOCKING
            | trio_evlisten.Flag.CLOSE_ON_FREE,
        ):
            pass
    async with listen(protocol=Recorder) as listener:
        with pytest.raises(TypeError, match="no arguments"):
            listener.set_cb(Recorder, 1)
        with pytest.raises(TypeError, match="async function"):
            listener.set_cb(handler)


# ----------------------------------------------------------------------
# examples/echo_protocol.py: examples/echo.py's behaviour, in protocol mode

ECHO_PROTOCOL = EXAMPLES / "echo_protocol.py"


@pytest.mark.slow
async def test_echo_protocol_example_serves_and_stops_quietly(engine: str) -> None:
    if engine != "epoll":
        pytest.skip("a subprocess: the engine it runs is its platform's")
    proc, port = start_echo(args=(str(ECHO_PROTOCOL),))
    try:
        results: dict[int, bytes] = {}

        async def client(i: int) -> None:
            payload = f"client {i}: ".encode() * (1 + i % 50)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(payload)
                await stream.send_eof()
                results[i] = await read_all(stream)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(client, i)
        assert all(
            results[i] == f"client {i}: ".encode() * (1 + i % 50) for i in results
        )
        assert len(results) == 100
    finally:
        out, err = stop(proc)
    assert proc.returncode == 0
    assert err == ""
    assert "Traceback" not in out


@pytest.mark.parametrize("arg", ["0", "65536", "abc"])
def test_echo_protocol_example_refuses_a_bad_port(arg: str, engine: str) -> None:
    if engine != "epoll":
        pytest.skip("a subprocess: the engine it runs is its platform's")
    result = subprocess.run(
        [sys.executable, str(ECHO_PROTOCOL), arg],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == "Invalid port\n"
    assert result.returncode == 1
    echo_protocol = load_echo(ECHO_PROTOCOL)
    assert echo_protocol.parse_port(["echo_protocol.py"]) == 9876


# ----------------------------------------------------------------------
# The command line's --protocol


async def test_cli_echo_in_protocol_mode(capsys: pytest.CaptureFixture[str]) -> None:
    options = parse_args(["echo", "--protocol", "--host", "127.0.0.1", "--port", "0"])
    assert options.protocol
    status: list[int] = []

    async def serve() -> None:
        status.append(await serve_echo(options))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            out = capsys.readouterr().out
            port = int(out.strip().rpartition(":")[2])
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"hello")
            assert await recv_exactly(client, 5) == b"hello"
            # Parked on its signal receiver since it printed its line.
            os.kill(os.getpid(), signal.SIGINT)
        # The stop cut the connection, still open.
        assert await client.receive_some(10) == b""
        await client.aclose()
    assert status == [0]
    assert capsys.readouterr().out == (
        "Stopped (SIGINT): accepted=1 active=1 errors=0 retried=0 handler_errors=0\n"
    )


async def test_max_connections_per_client_counts_live_transports() -> None:
    # A client's count is given back when its protocol's connection is lost
    # (not when the engine takes the connection over): over the limit the
    # next one is refused, and once one of the client's connections ends,
    # the client may connect again.
    with trio.fail_after(10):
        async with listen(
            protocol=EchoProtocol, max_connections_per_client=2
        ) as listener:
            first = await connect(listener)
            second = await connect(listener)
            for stream in (first, second):
                await stream.send_all(b"x")
                assert await recv_exactly(stream, 1) == b"x"
            async with await connect(listener) as third:
                assert await read_all(third) == b""  # refused: closed at once
            stats = listener.statistics()
            assert stats.active == 2
            assert stats.refused["per client"] == 1
            await first.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().clients == 1
            async with await connect(listener) as again:
                await again.send_all(b"y")
                assert await recv_exactly(again, 1) == b"y"
            await second.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().clients == 0


async def test_max_accept_rate_paces_a_protocol_listener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The overload controls act at the door, before any mode's handling:
    # the token bucket paces connection_made just as it paces handlers.
    made: list[float] = []

    class Timed(EchoProtocol):
        def connection_made(self, transport: Any) -> None:
            made.append(trio.current_time())
            super().connection_made(transport)

    async with listen(protocol=Timed, max_accept_rate=10, accept_burst=2) as listener:
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        clients = [await connect(listener) for _ in range(5)]
        try:
            for client in clients:
                await client.send_all(b"x")
                assert await recv_exactly(client, 1) == b"x"
            assert [round(t - start, 6) for t in made] == [0, 0, 0.1, 0.2, 0.3]
            assert listener.statistics().pauses["rate"] == 4
        finally:
            for client in clients:
                await client.aclose()
