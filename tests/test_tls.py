"""ssl_context=: handlers get a trio.SSLStream whose handshake ran in their task."""

from __future__ import annotations

import contextlib
import gc
import shutil
import socket
import ssl
import weakref
from typing import TYPE_CHECKING

import pytest
import trio
import trustme

from tests.conftest import recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import open_stream_to

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LOCAL = ("127.0.0.1", 0)


async def tls_echo(
    listener: ConnListener, conn: trio.SSLStream[trio.SocketStream], addr: object
) -> None:
    assert isinstance(conn, trio.SSLStream)
    async for data in conn:
        await conn.send_all(data)


async def test_trio_client_is_echoed_over_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        async with (
            open_listener(
                tls_echo,
                address=LOCAL,
                flags=Flag.CLOSE_ON_FREE,
                ssl_context=server_ctx,
            ) as listener,
            await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", listener.port, ssl_context=client_ctx
            ) as client,
        ):
            await client.send_all(b"secret bytes")
            assert await recv_exactly(client, 12) == b"secret bytes"
            assert client.selected_alpn_protocol() is None
            assert client.version() is not None
    assert listener.statistics().tls_failures == 0
    assert listener.statistics().accepted == 1


def _blocking_tls_roundtrip(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


async def test_stdlib_ssl_client_in_a_thread(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    payload = b"x" * 100_000
    with trio.fail_after(20):
        async with open_listener(
            tls_echo, address=LOCAL, flags=Flag.CLOSE_ON_FREE, ssl_context=server_ctx
        ) as listener:
            got = await trio.to_thread.run_sync(
                _blocking_tls_roundtrip, listener.port, client_ctx, payload
            )
    assert got == payload


@pytest.fixture
def ca_pem(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def tls_line_echo(
    listener: ConnListener, conn: trio.SSLStream[trio.SocketStream], addr: object
) -> None:
    """Echo one line, then return: the listener closes the connection."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = await conn.receive_some(1024)
        if not chunk:
            return
        line += chunk
    await conn.send_all(line)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client(server_ctx: ssl.SSLContext, ca_pem: Path) -> None:
    with trio.fail_after(20):
        async with open_listener(
            tls_line_echo,
            address=LOCAL,
            flags=Flag.CLOSE_ON_FREE,
            ssl_context=server_ctx,
        ) as listener:
            # -quiet implies -ign_eof: s_client exits when the server closes.
            result = await trio.run_process(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{listener.port}",
                    "-CAfile",
                    str(ca_pem),
                    "-verify_return_error",
                    "-quiet",
                ],
                stdin=b"hello from openssl\n",
                capture_stdout=True,
                capture_stderr=True,
            )
    assert b"hello from openssl\n" in result.stdout


async def test_plaintext_client_is_dropped_and_counted(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    called = 0

    async def handler(
        listener: ConnListener, conn: trio.abc.Stream, addr: object
    ) -> None:
        nonlocal called
        called += 1

    with trio.fail_after(10):
        async with open_listener(
            handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE, ssl_context=server_ctx
        ) as listener:
            async with await open_stream_to(listener) as plain:
                await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
                # The server gives up on the handshake and closes: EOF or reset.
                try:
                    while await plain.receive_some(1024):
                        pass
                except trio.BrokenResourceError:
                    pass
            # The listener goes on serving TLS clients.
            async with await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", listener.port, ssl_context=client_ctx
            ) as good:
                await good.do_handshake()
                await trio.testing.wait_all_tasks_blocked()
    assert called == 1
    stats = listener.statistics()
    assert stats.tls_failures == 1
    assert stats.handler_errors == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_slow_handshake_times_out_without_blocking_accepts(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    autojump_clock: trio.abc.Clock,
) -> None:
    served = trio.Event()

    async def handler(
        listener: ConnListener, conn: trio.abc.Stream, addr: object
    ) -> None:
        served.set()

    with trio.fail_after(60):
        async with (
            open_listener(
                handler,
                address=LOCAL,
                flags=Flag.CLOSE_ON_FREE,
                ssl_context=server_ctx,
                tls_handshake_timeout=3,
            ) as listener,
            await open_stream_to(listener) as silent,
        ):
            start = trio.current_time()
            # A second, real TLS client is served while the first stalls.
            async with await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", listener.port, ssl_context=client_ctx
            ) as good:
                await good.do_handshake()
                await served.wait()
            assert trio.current_time() - start < 3
            assert listener.statistics().tls_failures == 0
            # The silent one is dropped once its 3 s are up.
            assert await silent.receive_some(1) == b""
            assert trio.current_time() - start == pytest.approx(3)
    assert listener.statistics().tls_failures == 1


async def test_bad_tls_options(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ValueError, match="LEAVE_SOCKETS_BLOCKING"):
        async with open_listener(
            tls_echo,
            address=LOCAL,
            flags=Flag.LEAVE_SOCKETS_BLOCKING,
            ssl_context=server_ctx,
        ):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match=r"ssl_context must be an ssl\.SSLContext"):
        async with open_listener(tls_echo, address=LOCAL, ssl_context="cert.pem"):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="tls_handshake_timeout"):
        async with open_listener(
            tls_echo, address=LOCAL, ssl_context=server_ctx, tls_handshake_timeout=-1
        ):
            pass  # pragma: no cover


# ----------------------------------------------------------------------
# What a connection leaves behind: nothing the cyclic GC must find


@contextlib.contextmanager
def cyclic_gc_disabled() -> Iterator[None]:
    """Leave only reference counting to free objects: what a cycle holds stays.

    Under an attack, a connection whose objects sit in a reference cycle keeps
    its memory (a TLS connection's buffers are big) until a full collection,
    which a busy heap makes rare; with the collector off, the test sees that
    at once, deterministically.
    """
    enabled = gc.isenabled()
    gc.collect()  # earlier tests' garbage, so it is not mistaken for ours
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:  # closed, or a listening socket
        return None


def server_end(client: trio.SocketStream) -> dict[str, weakref.ref[object]]:
    """Weak references to the server's end of ``client``'s connection, by role.

    Found among every object the cyclic GC tracks, since a connection dropped
    in its preamble never reaches a handler that could hand them over: the
    accepted ``socket`` (the one whose peer is ``client``) and, once a TLS
    handshake began, the server-side ``SSLStream`` and its ``SSLObject``
    (there must be only one server-side TLS connection in the test). The
    stream between the ``SSLStream`` and the socket takes no weak reference
    (its class has slots), but holds the socket: that one freed, it was too.
    """
    here = client.socket.getsockname()
    found: dict[str, object] = {}
    for obj in gc.get_objects():
        if isinstance(obj, (trio.SSLStream, ssl.SSLObject)) and obj.server_side:
            role = type(obj).__name__
            assert role not in found, f"more than one server-side {role} alive"
            found[role] = obj
        elif isinstance(obj, socket.socket) and _peer(obj) == here:
            found["socket"] = obj
    return {role: weakref.ref(obj) for role, obj in found.items()}


def alive(refs: dict[str, weakref.ref[object]]) -> list[str]:
    """The roles in ``refs`` whose object has not been freed."""
    return sorted(role for role, ref in refs.items() if ref() is not None)


TLS_END = ["SSLObject", "SSLStream", "socket"]


async def never_called(
    listener: ConnListener, conn: trio.abc.Stream, addr: object
) -> None:
    raise AssertionError("the handler ran for a connection that failed its preamble")


async def test_timed_out_handshake_is_freed_by_reference_counting(
    server_ctx: ssl.SSLContext, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60), cyclic_gc_disabled():
        async with open_listener(
            never_called,
            address=LOCAL,
            flags=Flag.CLOSE_ON_FREE,
            ssl_context=server_ctx,
            tls_handshake_timeout=3,
        ) as listener:
            async with await open_stream_to(listener) as silent:
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(silent)
                assert alive(refs) == TLS_END  # the handshake is under way
                assert await silent.receive_some(1) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().tls_failures == 1
            assert listener.statistics().pending == 0
            assert alive(refs) == []


async def test_handshake_cancelled_by_a_drain_is_freed_by_reference_counting(
    server_ctx: ssl.SSLContext,
) -> None:
    with trio.fail_after(10), cyclic_gc_disabled():
        async with open_listener(
            never_called,
            address=LOCAL,
            flags=Flag.CLOSE_ON_FREE,
            ssl_context=server_ctx,
        ) as listener:
            async with await open_stream_to(listener) as silent:
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(silent)
                assert alive(refs) == TLS_END
                result = await listener.drain(grace=0)
                assert result.cancelled == 1
                assert await silent.receive_some(1) == b""
            assert alive(refs) == []


async def test_failed_handshake_is_freed_by_reference_counting(
    server_ctx: ssl.SSLContext,
) -> None:
    with trio.fail_after(10), cyclic_gc_disabled():
        async with open_listener(
            never_called,
            address=LOCAL,
            flags=Flag.CLOSE_ON_FREE,
            ssl_context=server_ctx,
        ) as listener:
            async with await open_stream_to(listener) as plain:
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(plain)
                assert alive(refs) == TLS_END
                await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
                # The server gives up on the handshake and closes: EOF or reset.
                with contextlib.suppress(trio.BrokenResourceError):
                    while await plain.receive_some(1024):
                        pass
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().tls_failures == 1
            assert alive(refs) == []


async def test_served_tls_connection_is_freed_by_reference_counting(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    handled = trio.Event()

    async def handler(
        listener: ConnListener, conn: trio.SSLStream[trio.SocketStream], addr: object
    ) -> None:
        handled.set()
        await tls_line_echo(listener, conn, addr)

    with trio.fail_after(10), cyclic_gc_disabled():
        async with (
            open_listener(
                handler,
                address=LOCAL,
                flags=Flag.CLOSE_ON_FREE,
                ssl_context=server_ctx,
            ) as listener,
            await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", listener.port, ssl_context=client_ctx
            ) as client,
        ):
            await client.do_handshake()
            await handled.wait()
            refs = server_end(client.transport_stream)
            assert alive(refs) == TLS_END
            await client.send_all(b"hello\n")
            assert await recv_exactly(client, 6) == b"hello\n"
            # The handler returned; the listener said goodbye and closed.
            assert await client.receive_some(1) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().active == 0
            assert alive(refs) == []
