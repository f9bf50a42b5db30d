"""Peers misbehaving, in protocol mode: resets, floods, silence, half-close.

The task-mode cases of test_peers.py, with an asyncio Protocol instead of a
handler, under both engines. In each, the listener must keep serving, every
other client must get its own bytes back, and every fd must come back (the
autouse fixture counts them).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from tests.conftest import recv_exactly
from tests.faults._support import client_process, stderr_of
from tests.faults.test_peers import (
    BURST,
    BURST_BACKLOG,
    BURST_DEADLINE,
    BURST_DRAIN,
    LINGER_0,
    echo_once,
    listener_records,
    reset,
)
from trio_evlisten import Flag, _engine, open_listener
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


@pytest.fixture(autouse=True, params=["epoll", "tasks"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str = request.param
    monkeypatch.setattr(_engine, "ENGINE", name)
    return name


class Echo(asyncio.Protocol):
    """Echo; a message ``flood`` makes it write far more than a peer reads."""

    #: Every connection_lost's argument, in order.
    lost: ClassVar[list[BaseException | None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data == b"flood":
            # Past the high-water mark: the transport buffers the rest and
            # waits for the peer, which never reads.
            for _ in range(64):
                self.transport.write(b"x" * 65536)
            return
        self.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        Echo.lost.append(exc)


@pytest.fixture(autouse=True)
def fresh_log() -> None:
    Echo.lost = []


def serve(**options: Any) -> Any:
    options.setdefault("flags", FREE)
    return open_listener(address=LOCAL, protocol=Echo, **options)


async def test_client_reset_before_accept_does_no_harm(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")
    with trio.fail_after(10):
        async with serve(flags=FREE | Flag.DISABLED) as listener:
            for _ in range(5):
                reset(socket.create_connection(("127.0.0.1", listener.port)))
            async with await open_stream_to(listener) as good:
                await good.send_all(b"good")
                listener.enable()
                assert await recv_exactly(good, 4) == b"good"
            async with await open_stream_to(listener) as after:
                await echo_once(after, b"after")
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
    assert stats.accepted + stats.retried == 7
    assert stats.errors == stats.handler_errors == 0
    assert stats.active == 0
    assert listener_records(caplog, logging.INFO) == []


async def test_resets_mid_write_and_mid_read(caplog: pytest.LogCaptureFixture) -> None:
    """RST from peers whose transport holds a full write buffer, or that
    sent half a message: each gets connection_lost(the OSError), is not a
    handler error, and the others are served."""
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")
    n_vanish = 10
    with trio.fail_after(10):
        async with serve() as listener:
            async with await open_stream_to(listener) as steady:
                await echo_once(steady, b"before")
                for i in range(n_vanish):
                    client = await open_stream_to(listener)
                    if i % 2:
                        await client.send_all(b"flood")
                        await client.receive_some(1)  # the flood has begun
                    else:
                        await client.send_all(b"part")
                        assert await recv_exactly(client, 4) == b"part"
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
                    await client.aclose()  # RST, not FIN
                    await echo_once(steady, b"still %d" % i)
                while len(Echo.lost) < n_vanish:
                    await echo_once(steady, b"wait")
                stats = listener.statistics()
                assert stats.active == 1  # only `steady`
            assert stats.accepted == n_vanish + 1
            assert stats.handler_errors == 0
    assert len(Echo.lost) == n_vanish + 1
    resets = Echo.lost[:n_vanish]
    # The flooded ones meet the reset in send(); the others in recv() or as
    # an EOF after it, which the kernel may report either way.
    assert all(exc is None or isinstance(exc, ConnectionError) for exc in resets)
    assert sum(isinstance(exc, ConnectionError) for exc in resets) >= n_vanish // 2
    assert listener_records(caplog, logging.WARNING) == []


async def test_silent_and_flooded_peers_are_cut_at_the_drains_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Peers that never send, and peers that never read a flood, do not
    block the others, and are aborted when the drain's grace ends."""
    async with serve() as listener:
        silent = [await open_stream_to(listener) for _ in range(3)]
        flooded = []
        for _ in range(3):
            client = await open_stream_to(listener)
            await client.send_all(b"flood")
            flooded.append(client)
        async with await open_stream_to(listener) as other:
            await echo_once(other, b"served")
        await trio.testing.wait_all_tasks_blocked()
        assert listener.statistics().active == 6
        result = await listener.drain(grace=5)
        assert result.cancelled == 6
        assert listener.statistics().active == 0
        for client in silent + flooded:
            await client.aclose()
    assert Echo.lost.count(None) == 7


async def test_half_closed_client_gets_everything_then_eof() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: more than one socket buffer
    with trio.fail_after(10):
        async with serve() as listener:
            async with await open_stream_to(listener) as client:
                received = bytearray()

                async def reader() -> None:
                    async for chunk in client:
                        received.extend(chunk)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    await client.send_all(payload)
                    await client.send_eof()
                # eof_received() returned None: the transport closed after
                # sending everything it was given.
                assert bytes(received) == payload
            async with await open_stream_to(listener) as other:
                await echo_once(other, b"still serving")


@pytest.mark.slow
async def test_burst_of_2000_connects_against_backlog_16() -> None:
    """As test_peers.py's burst: whatever connects in time is echoed its own
    bytes, nothing is refused or reset, and a fresh client is served after."""
    with trio.fail_after(BURST_DEADLINE + 30):
        async with serve(backlog=BURST_BACKLOG, drain_timeout=BURST_DRAIN) as listener:
            async with client_process(
                listener.port, BURST, deadline=BURST_DEADLINE, inflight=0, hold=False
            ) as (proc, lines):
                try:
                    summary = await lines.read_json()
                except EOFError as exc:
                    await proc.wait()
                    raise AssertionError(await stderr_of(proc)) from exc
                assert await proc.wait() == 0, await stderr_of(proc)
            async with await open_stream_to(listener) as fresh:
                await echo_once(fresh, b"fresh")
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
    assert summary["launched"] == BURST
    assert summary["mismatched"] == 0
    assert summary["refused"] == summary["reset"] == summary["other"] == 0
    assert summary["echoed"] + summary["timed_out"] == BURST
    assert summary["echoed"] >= 10 * BURST_BACKLOG, summary
    assert stats.accepted >= summary["echoed"] + 1
    assert stats.errors == stats.handler_errors == 0
