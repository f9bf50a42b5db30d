"""Connections in their preamble pend: they hold no handler slot, and have a bound.

A connection still reading its PROXY header or in its TLS handshake is
*pending*; it takes one of ``max_connections``'s slots only when its handler
starts. Pending connections are bounded by ``max_pending``.
"""

from __future__ import annotations

import resource
import ssl
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import recv_exactly
from trio_evlisten import (
    FD_RESERVE,
    ConnListener,
    Flag,
    ResourceLimitWarning,
    open_listener,
)
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE
HEADER = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"


class Gated:
    """An echo-once handler that holds its slot until released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.running = 0

    async def __call__(
        self, listener: ConnListener, conn: trio.abc.Stream, addr: Any
    ) -> None:
        self.running += 1
        try:
            await conn.send_all(await conn.receive_some())
            await self.release.wait()
        finally:
            self.running -= 1


async def tls_client(
    listener: ConnListener, ctx: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await open_stream_to(listener)
    tls = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    await tls.do_handshake()
    return tls


async def test_silent_tls_clients_hold_no_handler_slot(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    handler = Gated()
    handler.release.set()
    with trio.fail_after(5):
        async with open_listener(
            handler,
            address=LOCAL,
            flags=FREE,
            ssl_context=server_ctx,
            max_connections=1,
            # Longer than the test's bound: before the fix the honest client
            # waited this long for the silent one's slot.
            tls_handshake_timeout=60,
        ) as listener:
            silent = [await open_stream_to(listener) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert (stats.pending, stats.active) == (3, 0)
            honest = await tls_client(listener, client_ctx)
            await honest.send_all(b"hello")
            assert await recv_exactly(honest, 5) == b"hello"
            await honest.aclose()
            for client in silent:
                await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
    assert (stats.pending, stats.active, stats.tls_failures) == (0, 0, 3)


async def test_max_pending_bounds_what_is_accepted() -> None:
    with trio.fail_after(5):
        async with open_listener(
            Gated(),
            address=LOCAL,
            flags=FREE,
            proxy_protocol=True,
            proxy_timeout=60,
            max_pending=2,
        ) as listener:
            silent = [await open_stream_to(listener) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            # The third waits in the kernel's queue, not in our memory.
            assert (stats.accepted, stats.pending, stats.max_pending) == (2, 2, 2)
            await silent[0].aclose()  # EOF mid-header: rejected, a pending slot frees
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert (stats.accepted, stats.pending, stats.proxy_rejected) == (3, 2, 1)
            for client in silent[1:]:
                await client.aclose()


async def test_past_the_preamble_connections_wait_for_a_slot_in_order() -> None:
    handler = Gated()
    with trio.fail_after(5):
        async with open_listener(
            handler, address=LOCAL, flags=FREE, proxy_protocol=True, max_connections=1
        ) as listener:
            clients = []
            for i in range(3):
                client = await open_stream_to(listener)
                await client.send_all(HEADER + b"%d" % i)
                clients.append(client)
                await trio.testing.wait_all_tasks_blocked()
            # The first runs; the other two read their header and wait.
            assert await recv_exactly(clients[0], 1) == b"0"
            stats = listener.statistics()
            assert (stats.active, stats.pending, handler.running) == (1, 2, 1)
            # Raising the cap hands a slot to the first in line at once.
            listener.set_max_connections(2)
            assert await recv_exactly(clients[1], 1) == b"1"
            stats = listener.statistics()
            assert (stats.active, stats.pending) == (2, 1)
            handler.release.set()
            assert await recv_exactly(clients[2], 1) == b"2"
            for client in clients:
                await client.aclose()


async def one_served_one_in_line(
    listener: ConnListener,
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """With max_connections=1: a client served (its handler holds the slot),
    and one past its header, waiting in line for the slot."""
    first = await open_stream_to(listener)
    await first.send_all(HEADER + b"a")
    assert await recv_exactly(first, 1) == b"a"
    waiting = await open_stream_to(listener)
    await waiting.send_all(HEADER + b"b")
    await trio.testing.wait_all_tasks_blocked()
    assert listener.statistics().pending == 1
    return first, waiting


async def test_cancelled_while_waiting_for_a_slot_closes_the_connection() -> None:
    handler = Gated()
    with trio.fail_after(5):
        async with open_listener(
            handler,
            address=LOCAL,
            flags=FREE,
            proxy_protocol=True,
            max_connections=1,
        ) as listener:
            first, waiting = await one_served_one_in_line(listener)
            # Stop everything (the loopexit): no drain, so nothing is served.
            listener.nursery.cancel_scope.cancel()
        # The one in line was closed unserved (reset, as its unread byte was
        # still in the socket).
        async with first, waiting:
            with pytest.raises(trio.BrokenResourceError):
                await waiting.receive_some()
        assert listener.statistics().pending == 0


async def test_a_drain_serves_the_connections_waiting_in_line_past_the_cap() -> None:
    draining_at_start: list[bool] = []

    async def until_drained(
        listener: ConnListener, conn: trio.abc.Stream, addr: Any
    ) -> None:
        draining_at_start.append(listener.draining)
        await conn.send_all(await conn.receive_some())
        await listener.wait_draining()

    with trio.fail_after(5):
        async with open_listener(
            until_drained,
            address=LOCAL,
            flags=FREE,
            proxy_protocol=True,
            max_connections=1,
        ) as listener:
            first, waiting = await one_served_one_in_line(listener)
            result = await listener.drain()
        # The drain gave the one in line its handler, past the cap, with
        # draining already set, instead of resetting it.
        async with first, waiting:
            assert await recv_exactly(waiting, 1) == b"b"
        assert draining_at_start == [False, True]
        assert (result.finished, result.failed, result.cancelled) == (2, 0, 0)
        assert listener.statistics().pending == 0


def test_default_max_pending_is_what_the_fd_budget_leaves() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> tuple[int, int]:
        async with (
            open_listener(None, address=LOCAL, flags=FREE) as plain,
            open_listener(None, address=LOCAL, flags=FREE, max_connections=10) as cap,
        ):
            return plain.statistics().max_pending, cap.statistics().max_pending

    plain, capped = trio.run(main)
    if soft == resource.RLIM_INFINITY:
        assert plain == capped == 65536
    else:
        assert plain == max(soft - FD_RESERVE, 64)
        assert capped == max(soft - FD_RESERVE - 10, 64)


async def test_fd_limit_warning_counts_max_pending() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_NOFILE is unlimited here")
    with pytest.warns(ResourceLimitWarning, match=r"max_connections=1 \+ max_pending="):
        async with open_listener(
            None,
            address=LOCAL,
            flags=FREE,
            proxy_protocol=True,
            max_connections=1,
            max_pending=soft,
        ):
            pass


async def test_bad_max_pending_is_refused() -> None:
    with pytest.raises(ValueError, match="max_pending must be None or >= 1, not 0"):
        async with open_listener(None, address=LOCAL, max_pending=0):
            pass  # pragma: no cover
