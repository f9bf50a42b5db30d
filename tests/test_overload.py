"""Shedding load at the door: max_loop_lag, max_accept_rate,
max_connections_per_client, and the counts and log of every pause and
refusal."""

from __future__ import annotations

import contextlib
import logging
import tracemalloc
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten._clients import HOLD, REFUSED, ClientLimiter, client_key
from trio_evlisten._overload import LAG_PERIOD, Shedding, TokenBucket
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


class Held:
    """Echo once, record when and from where, then hold the connection until
    released or the client leaves."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.at: list[float] = []
        self.addrs: list[Any] = []

    async def __call__(
        self, listener: ConnListener, conn: trio.abc.Stream, addr: Any
    ) -> None:
        self.at.append(trio.current_time())
        self.addrs.append(addr)
        data = await conn.receive_some()
        await conn.send_all(data)
        # Then hold the connection until released or the client leaves.
        async with trio.open_nursery() as nursery:

            async def until_eof() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await conn.receive_some()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_eof)
            await self.release.wait()
            nursery.cancel_scope.cancel()


async def echoes(stream: trio.abc.Stream, data: bytes = b"x") -> bool:
    """Whether ``stream`` echoes ``data`` (False: closed or reset)."""
    try:
        await stream.send_all(data)
        return await recv_exactly(stream, len(data)) == data
    except trio.BrokenResourceError:
        return False


async def connect_from(
    source: str, port: int, header: bytes = b""
) -> trio.SocketStream:
    """A client stream to 127.0.0.1:``port`` from the local address ``source``
    (127.0.0.2 and the like are distinct loopback sources on Linux),
    first sending ``header``."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    if header:
        await stream.send_all(header)
    return stream


def v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 198.51.100.2 56324 443\r\n".encode()


# ----------------------------------------------------------------------
# max_loop_lag


async def test_a_late_loop_pauses_accepting_until_it_catches_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A stopped clock: time moves only when the test jumps it, so a jump is
    # a stall of exactly that long as the lag monitor sees it.
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_loop_lag=0.05
    ) as listener:
        await trio.testing.wait_all_tasks_blocked()
        assert listener.statistics().paused_by_load is False
        async with await open_stream_to(listener) as first:
            assert await echoes(first)
            mock_clock.jump(0.1)  # the loop "ran" 0.1 s late
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert stats.paused_by_load is True
            assert stats.loop_lag == pytest.approx(0.1 - LAG_PERIOD)
            assert stats.pauses["load"] == 1
            async with await open_stream_to(listener) as second:
                await second.send_all(b"y")
                await trio.testing.wait_all_tasks_blocked()
                # Queued in the kernel, not accepted, while the loop is late.
                assert listener.statistics().accepted == 1
                assert listener.statistics().queue_depth == 1
                mock_clock.jump(LAG_PERIOD)  # the next tick comes on time
                assert await recv_exactly(second, 1) == b"y"
                stats = listener.statistics()
                assert stats.paused_by_load is False
                assert stats.accepted == 2
                assert stats.load_paused_seconds == pytest.approx(LAG_PERIOD)
                held.release.set()


async def test_connections_are_let_in_at_a_pace_the_loop_keeps_up_with(
    mock_clock: trio.testing.MockClock,
) -> None:
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_loop_lag=0.05
    ) as listener:
        await trio.testing.wait_all_tasks_blocked()
        clients = [await open_stream_to(listener) for _ in range(5)]
        try:
            for c in clients:
                await c.send_all(b"x")
            await trio.testing.wait_all_tasks_blocked()
            # One per tick at first: the rest wait in the kernel's queue.
            assert len(held.at) == 1
            mock_clock.jump(LAG_PERIOD)  # on time, allowance used: one more
            await trio.testing.wait_all_tasks_blocked()
            assert len(held.at) == 3
            mock_clock.jump(LAG_PERIOD + 0.035)  # late, if under the bound
            await trio.testing.wait_all_tasks_blocked()
            # Back to one per tick, without a pause.
            assert len(held.at) == 4
            assert listener.statistics().pauses["load"] == 0
            mock_clock.jump(LAG_PERIOD)
            await trio.testing.wait_all_tasks_blocked()
            assert len(held.at) == 5
        finally:
            for c in clients:
                await c.aclose()
            held.release.set()


async def test_a_lag_under_the_bound_does_not_pause(
    mock_clock: trio.testing.MockClock,
) -> None:
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_loop_lag=0.05
    ) as listener:
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.04)  # late, but within the bound
        await trio.testing.wait_all_tasks_blocked()
        assert listener.statistics().paused_by_load is False
        async with await open_stream_to(listener) as client:
            assert await echoes(client)
        held.release.set()
        assert listener.statistics().pauses["load"] == 0


async def test_the_agent_port_weight_follows_the_loop_lag(
    mock_clock: trio.testing.MockClock,
) -> None:
    from tests.test_agent import ask

    async with open_listener(
        echo_handler, address=LOCAL, flags=FREE, max_loop_lag=0.05, agent_port=0
    ) as listener:
        port = listener.agent_port
        assert port is not None
        await trio.testing.wait_all_tasks_blocked()
        assert await ask(port) == "up ready 100%"
        mock_clock.jump(LAG_PERIOD + 0.03)  # 30 ms late: 60% of the bound
        await trio.testing.wait_all_tasks_blocked()
        assert await ask(port) == "up ready 40%"


async def test_without_max_loop_lag_there_is_no_timer(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_listener(echo_handler, address=LOCAL, flags=FREE) as listener:
        await trio.testing.wait_all_tasks_blocked()
        # Nothing sleeps on the clock: an idle listener wakes for nothing.
        assert mock_clock.deadline_to_sleep_time(trio.current_time() + 3600) > 0
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float(
            "inf"
        )
        stats = listener.statistics()
        assert stats.loop_lag is None
        assert stats.paused_by_load is False


# ----------------------------------------------------------------------
# max_accept_rate


async def test_accept_rate_is_a_token_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_accept_rate=10, accept_burst=2
    ) as listener:
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        clients = [await open_stream_to(listener) for _ in range(6)]
        try:
            for client in clients:
                assert await echoes(client)
            offsets = [round(t - start, 6) for t in held.at]
            # The burst at once, then one per tenth of a second.
            assert offsets == [0, 0, 0.1, 0.2, 0.3, 0.4]
            stats = listener.statistics()
            # Each time the bucket ran dry, the last one included.
            assert stats.pauses["rate"] == 5
        finally:
            for client in clients:
                await client.aclose()
            held.release.set()


async def test_the_default_burst_is_a_tenth_of_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_accept_rate=30
    ) as listener:
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        clients = [await open_stream_to(listener) for _ in range(4)]
        try:
            for client in clients:
                assert await echoes(client)
            offsets = [round(t - start, 6) for t in held.at]
            assert offsets == [0, 0, 0, round(1 / 30, 6)]
            assert listener.statistics().paused_by_rate is True
        finally:
            for client in clients:
                await client.aclose()
            held.release.set()


def test_token_bucket_refills_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert bucket.ready_at(0.0) == 0.0
    for _ in range(3):
        bucket.take()
    assert bucket.ready_at(0.0) == pytest.approx(0.5)
    assert bucket.ready_at(100.0) == 100.0  # full again, but only 3
    for _ in range(3):
        bucket.take()
    assert bucket.ready_at(100.0) == pytest.approx(100.5)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_accept_rate": 0}, ValueError, "max_accept_rate must be None or"),
        ({"max_accept_rate": "fast"}, TypeError, "max_accept_rate must be None"),
        ({"max_loop_lag": 0}, ValueError, "max_loop_lag must be None or seconds > 0"),
        ({"max_loop_lag": float("nan")}, ValueError, "max_loop_lag"),
        (
            {"accept_burst": 5},
            ValueError,
            "accept_burst=5 is the size of max_accept_rate",
        ),
        (
            {"max_accept_rate": 5, "accept_burst": 0},
            ValueError,
            "accept_burst must be None or >= 1",
        ),
        ({"max_connections_per_client": 0}, ValueError, "max_connections_per_client"),
        ({"client_limit_policy": "drop"}, ValueError, "'refuse' or 'hold'"),
        ({"client_ipv6_prefix": 129}, ValueError, "prefix length 0..128"),
        ({"client_table_size": 0}, ValueError, "client_table_size must be >= 1"),
        (
            {"client_limit_policy": "hold"},
            ValueError,
            "client_limit_policy= applies to max_connections_per_client=",
        ),
        (
            {"client_ipv6_prefix": 48},
            ValueError,
            "client_ipv6_prefix= applies to max_connections_per_client=",
        ),
    ],
)
async def test_bad_values_are_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        async with open_listener(echo_handler, address=LOCAL, flags=FREE, **options):
            pass  # pragma: no cover


# ----------------------------------------------------------------------
# max_connections_per_client


async def test_max_pending_bounds_connections_held_for_their_client() -> None:
    # Held connections pend, so max_pending applies (and is not refused as
    # an option that cannot apply).
    async with open_listener(
        echo_handler,
        address=LOCAL,
        flags=FREE,
        max_connections_per_client=2,
        max_pending=5,
    ) as listener:
        assert listener.statistics().max_pending == 5


def test_client_keys_group_ipv6_by_prefix() -> None:
    a = client_key(("2001:db8:1:2::1", 1, 0, 0))
    assert a == client_key(("2001:db8:1:2:ffff::9", 2, 0, 0))
    assert a != client_key(("2001:db8:1:3::1", 1, 0, 0))
    assert client_key(("2001:db8::1", 1, 0, 0), 128) != client_key(
        ("2001:db8::2", 1, 0, 0), 128
    )
    assert client_key(("::ffff:192.0.2.1", 1, 0, 0)) == client_key(("192.0.2.1", 1))
    # No IPv6 prefix collides with an IPv4 address.
    assert client_key(("::c000:201", 1, 0, 0), 128) != client_key(("192.0.2.1", 1))
    assert client_key(("fe80::1%lo", 1, 0, 1)) == client_key(("fe80::2", 1, 0, 1))
    assert client_key("/run/app.sock") is None
    assert client_key("") is None


async def test_over_the_limit_a_client_is_refused_and_others_are_served() -> None:
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_connections_per_client=2
    ) as listener:
        port = listener.port
        with trio.fail_after(10):
            clients = [await connect_from("127.0.0.1", port) for _ in range(4)]
            other = await connect_from("127.0.0.2", port)
            try:
                served = [await echoes(c) for c in clients]
                assert served.count(True) == 2
                assert served.count(False) == 2
                assert await echoes(other)
                stats = listener.statistics()
                assert stats.refused["per client"] == 2
                assert stats.active == 3
                assert stats.clients == 2
            finally:
                for c in [*clients, other]:
                    await c.aclose()
                held.release.set()
    assert listener.statistics().clients == 0


async def test_hold_keeps_a_connection_until_its_client_has_room() -> None:
    held = Held()
    async with open_listener(
        held,
        address=LOCAL,
        flags=FREE,
        max_connections_per_client=2,
        client_limit_policy="hold",
    ) as listener:
        port = listener.port
        with trio.fail_after(10):
            clients = [await connect_from("127.0.0.1", port) for _ in range(5)]
            try:
                for c in clients:
                    await c.send_all(b"x")
                await trio.testing.wait_all_tasks_blocked()
                # Two served, two held (pending, no handler slot), the fifth
                # past the held ones refused.
                stats = listener.statistics()
                assert (stats.active, stats.pending) == (2, 2)
                assert stats.held == 2
                assert stats.refused["per client"] == 1
                assert len(held.at) == 2
                # A served one leaving lets a held one in.
                by_port = {c.socket.getsockname()[1]: c for c in clients}
                served = [by_port[addr[1]] for addr in held.addrs]
                for c in served:
                    assert await recv_exactly(c, 1) == b"x"
                await served[0].aclose()
                await trio.testing.wait_all_tasks_blocked()
                assert len(held.at) == 3
                stats = listener.statistics()
                assert (stats.active, stats.pending) == (2, 1)
                assert await recv_exactly(by_port[held.addrs[2][1]], 1) == b"x"
            finally:
                for c in clients:
                    await c.aclose()
                held.release.set()


async def test_the_proxy_named_client_is_the_one_counted() -> None:
    held = Held()
    async with open_listener(
        held,
        address=LOCAL,
        flags=FREE,
        proxy_protocol=True,
        max_connections_per_client=2,
    ) as listener:
        port = listener.port
        with trio.fail_after(10):
            same = [
                await connect_from("127.0.0.1", port, v1("192.0.2.1")) for _ in range(3)
            ]
            other = await connect_from("127.0.0.1", port, v1("192.0.2.2"))
            try:
                served = [await echoes(c) for c in same]
                assert served.count(True) == 2
                assert await echoes(other)
                assert listener.statistics().refused["per client"] == 1
                assert {a[0] for a in held.addrs} == {"192.0.2.1", "192.0.2.2"}
            finally:
                for c in [*same, other]:
                    await c.aclose()
                held.release.set()


async def test_a_full_client_table_refuses_new_clients() -> None:
    held = Held()
    async with open_listener(
        held,
        address=LOCAL,
        flags=FREE,
        proxy_protocol=True,
        max_connections_per_client=5,
        client_table_size=4,
    ) as listener:
        port = listener.port
        with trio.fail_after(10):
            spoofed = [
                await connect_from("127.0.0.1", port, v1(f"192.0.2.{i}"))
                for i in range(1, 7)
            ]
            try:
                served = [await echoes(c) for c in spoofed]
                assert served.count(True) == 4
                stats = listener.statistics()
                assert stats.clients == 4
                assert stats.refused["client table full"] == 2
            finally:
                for c in spoofed:
                    await c.aclose()
                held.release.set()


def test_100000_spoofed_clients_cannot_grow_the_table_past_its_bound() -> None:
    size = 1000
    limiter = ClientLimiter(10, "refuse", 64, size, Shedding(("127.0.0.1", 1)))

    async def main() -> None:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            refused = 0
            # Every one still connected (never left): the worst case.
            for i in range(100_000):
                verdict, _key = limiter.enter(
                    (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1)
                )
                refused += verdict is REFUSED
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(limiter) == size
        assert refused == 100_000 - size
        # The documented bound per entry, with room for the dict's growth.
        assert grown < size * 256

    trio.run(main)


async def test_a_held_connection_cancelled_is_not_counted() -> None:
    limiter = ClientLimiter(1, "hold", 64, 10, Shedding(("127.0.0.1", 1)))
    addr = ("192.0.2.1", 1)
    first, key = limiter.enter(addr)
    assert first is None
    assert key is not None
    verdict, _ = limiter.enter(addr)
    assert verdict is HOLD
    with trio.move_on_after(0.01):
        await limiter.wait_turn(key)
    limiter.leave(key)
    assert len(limiter) == 0


async def test_the_target_one_address_holds_at_most_10_of_300() -> None:
    held = Held()
    async with open_listener(
        held,
        address=LOCAL,
        flags=FREE,
        max_connections=100,
        max_connections_per_client=10,
    ) as listener:
        port = listener.port
        with trio.fail_after(20):
            flood: list[trio.SocketStream] = []
            try:
                for _ in range(300):
                    flood.append(await connect_from("127.0.0.1", port, b"x"))
                began = trio.current_time()
                async with await connect_from("127.0.0.2", port) as other:
                    assert await echoes(other)
                took = trio.current_time() - began
                assert took < 0.2
                await trio.testing.wait_all_tasks_blocked()
                served = [a for a in held.addrs if a[0] == "127.0.0.1"]
                assert len(served) == 10
                assert listener.statistics().refused["per client"] == 290
            finally:
                for c in flood:
                    await c.aclose()
                held.release.set()


# ----------------------------------------------------------------------
# Counted and logged by reason


async def test_a_capacity_pause_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_evlisten")
    held = Held()
    async with open_listener(held, address=LOCAL, flags=FREE, max_connections=1) as (
        listener
    ):
        with trio.fail_after(10):
            async with await open_stream_to(listener) as a:
                assert await echoes(a)
                async with await open_stream_to(listener) as b:
                    await b.send_all(b"x")
                    await trio.testing.wait_all_tasks_blocked()
                    assert listener.statistics().pauses["capacity"] == 1
                    held.release.set()
    [record] = [r for r in caplog.records if "capacity" in r.getMessage()]
    assert "paused accepting (capacity)" in record.getMessage()
    assert "max_connections=1" in record.getMessage()


async def test_refusals_are_logged_once_then_summed_up(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_evlisten")
    held = Held()
    async with open_listener(
        held, address=LOCAL, flags=FREE, max_connections_per_client=1
    ) as listener:
        clients = [await open_stream_to(listener) for _ in range(5)]
        try:
            for c in clients:
                await echoes(c)
            await trio.sleep(11)  # past the summary interval
        finally:
            for c in clients:
                await c.aclose()
            held.release.set()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "refused a connection (per client)" in lines[0]
    assert "\u00d73" in lines[1]


# ----------------------------------------------------------------------
# The tutorial's snippet


async def test_the_tutorial_snippet_refuses_the_third_and_serves_the_other() -> None:
    from tests.test_docs import load

    with trio.fail_after(10):
        results, stats = await load("overload").main()
    # Which of the first address's three is refused is the scheduler's pick.
    assert sorted(results[:3]) == [False, True, True]
    assert results[3] is True
    assert stats.refused["per client"] == 1
    assert stats.clients == 2
