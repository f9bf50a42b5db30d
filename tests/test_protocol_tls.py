"""TLS in protocol mode: the handshake in the preamble, a TLS transport after.

Every test runs under both engines (the ``engine`` fixture), as in
tests/test_protocol.py; clients are trio's, the stdlib's and ``openssl
s_client``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import shutil
import ssl
import subprocess
import weakref
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import trustme

import trio_evlisten
from trio_evlisten import _engine
from trio_evlisten._tls_transport import TLSTransport

from .conftest import recv_exactly
from .test_protocol import Made, Recorder, connect, listen, read_all
from .test_tls import _blocking_tls_roundtrip

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True, params=["epoll", "tasks"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test under the epoll engine and under the fallback."""
    name: str = request.param
    monkeypatch.setattr(_engine, "ENGINE", name)
    return name


Echo = functools.partial(Recorder, echo=True)


async def tls_connect(
    listener: trio_evlisten.ConnListener, client_ctx: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    return await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", listener.port, ssl_context=client_ctx
    )


async def test_echo_over_tls_and_what_the_transport_tells(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    factory = Made(Echo)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            await client.send_all(b"secret bytes")
            assert await recv_exactly(client, 12) == b"secret bytes"
            protocol: Recorder = await factory.wait()
            transport = protocol.transport
            assert isinstance(transport, TLSTransport)
            sslobj = transport.get_extra_info("ssl_object")
            assert isinstance(sslobj, ssl.SSLObject)
            assert sslobj.version() == client.version()
            assert transport.get_extra_info("sslcontext") is server_ctx
            assert transport.get_extra_info("cipher") == sslobj.cipher()
            assert transport.get_extra_info("peercert") is None  # no client cert
            assert transport.get_extra_info("compression") is None
            assert (
                transport.get_extra_info("peername")
                == client.transport_stream.socket.getsockname()
            )
            assert not transport.can_write_eof()
            with pytest.raises(NotImplementedError, match=r"call close\(\)"):
                transport.write_eof()
    assert listener.statistics().tls_failures == 0


async def test_stdlib_client_bulk_echo(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    payload = bytes(range(256)) * 2000  # 512 KB: past the write buffer's limit
    with trio.fail_after(20):
        async with listen(protocol=Made(Echo), ssl_context=server_ctx) as listener:
            got = await trio.to_thread.run_sync(
                _blocking_tls_roundtrip, listener.port, client_ctx, payload
            )
    assert got == payload


async def test_a_buffered_protocol_over_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(7)  # smaller than a record: several reads each
            self.transport: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.transport.write(bytes(self.buf[:nbytes]))

    with trio.fail_after(10):
        async with (
            listen(protocol=Buffered, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            await client.send_all(b"0123456789" * 10)
            assert await recv_exactly(client, 100) == b"0123456789" * 10


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_gets_its_line_back(
    server_ctx: ssl.SSLContext, ca_file: Path
) -> None:
    def run(port: int) -> str:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        argv += ["-CAfile", str(ca_file), "-verify_return_error", "-quiet"]
        # -quiet implies -ign_eof: s_client keeps reading after its input
        # ends; the protocol closes once it has echoed the line, which is
        # what ends s_client.
        done = subprocess.run(
            argv, input="hello over TLS\n", capture_output=True, text=True, timeout=20
        )
        return done.stdout

    class EchoThenClose(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.write(data)
            if self.received.endswith(b"\n"):
                self.transport.close()

    factory = Made(EchoThenClose)
    with trio.fail_after(30):
        async with listen(protocol=factory, ssl_context=server_ctx) as listener:
            out = await trio.to_thread.run_sync(run, listener.port)
    assert out == "hello over TLS\n"
    assert factory.made[0].events[-1] == ("lost", None)
    assert listener.statistics().tls_failures == 0


async def test_close_sends_close_notify_after_what_was_written(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class Goodbye(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"x" * 300_000)  # more than the kernel takes at once
            transport.close()

    factory = Made(Goodbye)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            # A clean end of stream: trio's SSLStream raises
            # BrokenResourceError at an EOF without close_notify.
            assert await read_all(client) == b"x" * 300_000
            await factory.made[0].lost.wait()
    assert factory.made[0].kinds() == ["made", "lost"]


async def test_the_peers_close_notify_is_eof_received(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    factory = Made(functools.partial(Recorder, keep_open=True))
    with trio.fail_after(10):
        async with listen(protocol=factory, ssl_context=server_ctx) as listener:
            client = await tls_connect(listener, client_ctx)
            await client.send_all(b"hi")
            protocol: Recorder = await factory.wait()
            await protocol.got.wait()
            await client.aclose()  # sends close_notify
            await protocol.lost.wait()
    # TLS cannot stay half-open: closed although eof_received() said True.
    assert protocol.events == [("made",), ("data", 2), ("eof",), ("lost", None)]


async def test_an_end_without_close_notify_is_an_error_for_the_protocol(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    factory = Made()
    with trio.fail_after(10):
        async with listen(protocol=factory, ssl_context=server_ctx) as listener:
            client = await tls_connect(listener, client_ctx)
            await client.send_all(b"hi")
            protocol: Recorder = await factory.wait()
            await protocol.got.wait()
            # A FIN on the raw socket, no close_notify (a close could be a
            # reset: the session tickets the client never read are unread data).
            await client.transport_stream.send_eof()
            await protocol.lost.wait()
            await client.transport_stream.aclose()
    kind, exc = protocol.events[-1]
    assert kind == "lost"
    assert isinstance(exc, ssl.SSLEOFError)
    assert "eof" not in protocol.kinds()
    # The client's doing, not a handler error.
    assert listener.statistics().handler_errors == 0


async def test_a_failed_handshake_is_counted_and_makes_no_protocol(
    server_ctx: ssl.SSLContext,
) -> None:
    factory = Made()
    with trio.fail_after(10):
        async with listen(protocol=factory, ssl_context=server_ctx) as listener:
            async with await connect(listener) as client:
                await client.send_all(b"GET / HTTP/1.0\r\n\r\n")
                # At most a TLS alert comes back, then the end.
                await read_all(client)
            # Counted before the socket was closed.
            assert listener.statistics().tls_failures == 1
            assert listener.statistics().active == 0
    assert factory.made == []
    assert listener.statistics().tls_failures == 1


async def test_a_stalled_handshake_times_out_holding_no_slot(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    factory = Made(Echo)
    with trio.fail_after(10):
        async with (
            listen(
                protocol=factory,
                ssl_context=server_ctx,
                max_connections=1,
                tls_handshake_timeout=1.0,
            ) as listener,
            await connect(listener) as silent,
        ):
            # The only slot is free for a client that does speak TLS.
            async with await tls_connect(listener, client_ctx) as client:
                await client.send_all(b"ping")
                assert await recv_exactly(client, 4) == b"ping"
            assert listener.statistics().tls_failures == 0
            # The silent one is dropped once its handshake times out.
            assert await read_all(silent) == b""
            assert listener.statistics().tls_failures == 1
    assert listener.statistics().tls_failures == 1
    assert len(factory.made) == 1


async def test_a_peer_that_does_not_read_pauses_writing(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class Flood(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.WriteTransport)
            for _ in range(64):
                transport.write(b"y" * 65536)

    factory = Made(Flood)
    with trio.fail_after(10):
        async with listen(protocol=factory, ssl_context=server_ctx) as listener:
            client = await tls_connect(listener, client_ctx)
            await client.do_handshake()
            protocol: Recorder = await factory.wait()
            assert protocol.transport is not None
            assert "pause_writing" in protocol.kinds()
            assert protocol.transport.get_write_buffer_size() > 0
            got = 0
            while got < 64 * 65536:
                got += len(await client.receive_some(1 << 20))
            # The last bytes left in the call that emptied the buffer.
            assert protocol.kinds()[-1] == "resume_writing"
            protocol.transport.close()
            assert await read_all(client) == b""
            await client.aclose()


async def test_a_drains_end_aborts_tls_transports(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    autojump_clock: trio.abc.Clock,
) -> None:
    factory = Made()
    async with listen(protocol=factory, ssl_context=server_ctx) as listener:
        client = await tls_connect(listener, client_ctx)
        await client.do_handshake()
        protocol: Recorder = await factory.wait()
        result = await listener.drain(grace=5)
        assert result == trio_evlisten.DrainResult(finished=0, failed=0, cancelled=1)
        assert protocol.events[-1] == ("lost", None)
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()


async def test_the_proxy_header_then_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    factory = Made(Echo)
    with trio.fail_after(10):
        async with listen(
            protocol=factory, ssl_context=server_ctx, proxy_protocol=True
        ) as listener:
            raw = await connect(listener)
            await raw.send_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 443\r\n")
            async with trio.SSLStream(
                raw, client_ctx, server_hostname="127.0.0.1"
            ) as client:
                await client.send_all(b"hi")
                assert await recv_exactly(client, 2) == b"hi"
                protocol: Recorder = await factory.wait()
                assert protocol.transport is not None
                assert protocol.transport.get_extra_info("peername") == (
                    "192.0.2.1",
                    5555,
                )


async def test_hand_over_is_refused_on_a_tls_transport(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def handler(stream: object, data: bytes) -> None:
        raise AssertionError("never called")

    factory = Made()
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            await client.do_handshake()
            protocol: Recorder = await factory.wait()
            assert protocol.transport is not None
            with pytest.raises(RuntimeError, match="TLS"):
                protocol.transport.hand_over(handler)


async def test_sessions_are_freed_without_the_cyclic_gc(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """A served, a failed and a timed-out connection leave no session behind
    for the cyclic GC (task mode's trio.SSLStream needed help for that)."""
    factory = Made(Echo)
    sessions: list[weakref.ref[ssl.SSLObject]] = []
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(10):
            async with listen(
                protocol=factory, ssl_context=server_ctx, tls_handshake_timeout=0.5
            ) as listener:
                async with await tls_connect(listener, client_ctx) as client:
                    await client.send_all(b"hi")
                    assert await recv_exactly(client, 2) == b"hi"
                    protocol: Recorder = await factory.wait()
                    assert protocol.transport is not None
                    sessions.append(
                        weakref.ref(protocol.transport.get_extra_info("ssl_object"))
                    )
                    del protocol
                async with await connect(listener) as plain:
                    await plain.send_all(b"not TLS\r\n\r\n")
                    await read_all(plain)
                async with await connect(listener) as silent:
                    assert await read_all(silent) == b""
                await factory.made[0].lost.wait()
                factory.made.clear()
                assert listener.statistics().tls_failures == 2
        assert sessions[0]() is None
        # No server session left for the cyclic GC to find either (the
        # client's trio.SSLStream keeps its own in a cycle of trio's).
        objects = gc.get_objects()
        assert not [
            o for o in objects if isinstance(o, ssl.SSLObject) and o.server_side
        ]
    finally:
        gc.enable()


async def test_data_in_the_same_segment_as_finished_is_not_lost(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The client's Finished and its first record arrive at once: the
    handshake reads both, and the protocol still gets the record."""
    factory = Made(Echo)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await connect(listener) as raw,
        ):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = client_ctx.wrap_bio(
                incoming, outgoing, server_hostname="localhost"
            )
            while True:
                try:
                    client.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await raw.send_all(outgoing.read())
                    data = await raw.receive_some(65536)
                    assert data
                    incoming.write(data)
            client.write(b"early")
            await raw.send_all(outgoing.read())  # Finished and "early" at once
            protocol: Recorder = await factory.wait()
            await protocol.got.wait()
            assert protocol.received == b"early"


async def test_a_protocol_error_over_tls_is_counted(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    class Fails(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            raise ValueError("bad request")

    factory = Made(Fails)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            await client.send_all(b"x")
            protocol: Recorder = await factory.wait()
            await protocol.lost.wait()
            assert isinstance(protocol.events[-1][1], ValueError)
            assert listener.statistics().handler_errors == 1


async def test_a_write_that_needs_a_renegotiation_aborts(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """TLS 1.2 renegotiation is not served: no wait, the connection ends."""

    class Renegotiating(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            sslobj = self.transport.get_extra_info("ssl_object")

            def wants_read(data: bytes) -> int:
                raise ssl.SSLWantReadError("the peer started a handshake")

            # What SSLObject.write raises mid-renegotiation (Python's client
            # cannot start one).
            sslobj.write = wants_read
            self.transport.write(data)

    factory = Made(Renegotiating)
    with trio.fail_after(10):
        async with (
            listen(protocol=factory, ssl_context=server_ctx) as listener,
            await tls_connect(listener, client_ctx) as client,
        ):
            await client.send_all(b"x")
            protocol: Recorder = await factory.wait()
            await protocol.lost.wait()
            exc = protocol.events[-1][1]
            assert isinstance(exc, ssl.SSLError)
            assert "renegotiation is not supported" in str(exc)
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some(10)
