"""Accept-queue visibility: queue_depth, queue_limit and backlog in statistics()."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import Flag, ResourceLimitWarning, open_listener
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="TCP_INFO's accept-queue fields are Linux's",
)


def somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        pytest.skip("no /proc/sys/net/core/somaxconn here")


@linux_only
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_a_disabled_listener_reports_the_connections_queued(
    family: str,
) -> None:
    address = ("127.0.0.1", 0) if family == "ipv4" else ("::1", 0)
    n = 3
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=address, flags=FREE | Flag.DISABLED, backlog=5
        ) as listener:
            stats = listener.statistics()
            assert (stats.queue_depth, stats.queue_limit, stats.backlog) == (0, 5, 5)
            clients = [await open_stream_to(listener) for _ in range(n)]
            try:
                # Loopback completes each handshake inside connect(): the
                # connections sit in the accept queue, none accepted.
                stats = listener.statistics()
                assert stats.queue_depth == n
                assert stats.queue_limit == 5
                assert stats.accepted == 0
                listener.enable()
                for client in clients:
                    await client.send_all(b"hi")
                    assert await recv_exactly(client, 2) == b"hi"
                stats = listener.statistics()
                assert stats.queue_depth == 0
                assert stats.accepted == n
            finally:
                for client in clients:
                    await client.aclose()


@linux_only
async def test_the_default_backlog_is_somaxconn() -> None:
    cap = min(somaxconn(), 0xFFFF)
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=LOCAL, flags=FREE) as listener:
            stats = listener.statistics()
    assert (stats.backlog, stats.queue_limit, stats.queue_depth) == (cap, cap, 0)
    # Closed: nothing to read from the kernel any more.
    after = listener.statistics()
    assert (after.queue_depth, after.queue_limit) == (None, None)


@linux_only
async def test_a_backlog_above_somaxconn_is_cut_and_warned() -> None:
    cap = somaxconn()
    asked = cap + 1000
    with trio.fail_after(10):
        with pytest.warns(ResourceLimitWarning) as caught:
            async with open_listener(
                echo_handler, address=LOCAL, flags=FREE, backlog=asked
            ) as listener:
                stats = listener.statistics()
        assert len(caught) == 1
        assert f"backlog={asked} was cut to {cap}" in str(caught[0].message)
        # At the caller's line, not somewhere inside trio_evlisten.
        assert caught[0].filename == __file__
    assert stats.backlog == cap
    assert stats.queue_limit == cap


async def test_a_backlog_within_somaxconn_is_not_warned() -> None:
    with trio.fail_after(10), warnings.catch_warnings():
        warnings.simplefilter("error", ResourceLimitWarning)
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, backlog=7
        ) as listener:
            assert listener.statistics().backlog == 7


async def test_a_unix_listener_has_a_backlog_but_no_queue_info(
    tmp_path: Path,
) -> None:
    path = os.fspath(tmp_path / "s.sock")
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=path, flags=FREE, backlog=9
        ) as listener:
            async with await open_stream_to(listener) as client:
                await client.send_all(b"u")
                assert await recv_exactly(client, 1) == b"u"
            stats = listener.statistics()
    assert (stats.queue_depth, stats.queue_limit, stats.backlog) == (None, None, 9)


@linux_only
async def test_a_wrapped_listening_socket_reports_the_kernel_limit() -> None:
    # backlog=0: we never called listen(), so only the kernel knows.
    with socket.socket() as sock:
        sock.bind(LOCAL)
        sock.listen(11)
        with trio.fail_after(10):
            async with open_listener(echo_handler, sock=sock, backlog=0) as listener:
                stats = listener.statistics()
    assert (stats.backlog, stats.queue_limit, stats.queue_depth) == (11, 11, 0)
