"""agent_port= and lameduck=: what HAProxy's agent check is told, and when.

The reply is a pure function of a snapshot, checked here for every state;
then a real listener's agent port is asked through each transition, and the
lame duck's timing is checked on Trio's mock clock.
"""

from __future__ import annotations

import re
import signal
import socket
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten._agent import (
    LAMEDUCK_QUIET,
    AgentSnapshot,
    agent_reply,
    lame_duck,
    weight,
)
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE

SERVING = AgentSnapshot(
    closed=False,
    accepting=True,
    lameduck=False,
    draining=False,
    active=0,
    pending=0,
    max_connections=None,
)


# ----------------------------------------------------------------------
# The reply, state by state


@pytest.mark.parametrize(
    ("changes", "reply"),
    [
        ({}, "up ready 100%"),
        ({"max_connections": 10, "active": 3}, "up ready 70%"),
        # Nearly full, and full: never below 1% while serving (0 would be
        # HAProxy's DRAIN, and a full listener still queues in its backlog).
        ({"max_connections": 10, "active": 9}, "up ready 10%"),
        ({"max_connections": 100, "active": 99, "pending": 1}, "up ready 1%"),
        ({"max_connections": 10, "active": 12}, "up ready 1%"),
        # Connections in their preamble will take a slot: counted.
        ({"max_connections": 4, "active": 1, "pending": 1}, "up ready 50%"),
        ({"paused": True}, "up ready 1%"),
        ({"loop_lag": 0.025, "max_loop_lag": 0.1}, "up ready 75%"),
        ({"loop_lag": 0.5, "max_loop_lag": 0.1}, "up ready 1%"),
        # A lag without a limit to measure it against says nothing.
        ({"loop_lag": 0.5}, "up ready 100%"),
        (
            {"loop_lag": 0.08, "max_loop_lag": 0.1, "max_connections": 2},
            "up ready 20%",
        ),
        ({"lameduck": True}, "drain"),
        ({"lameduck": True, "draining": True}, "drain"),
        ({"draining": True}, "drain"),
        ({"accepting": False}, "drain"),
        ({"closed": True, "draining": True}, "drain stopped#closed"),
        ({"closed": True, "accepting": False}, "drain stopped#closed"),
    ],
)
def test_reply_for_each_state(changes: dict[str, Any], reply: str) -> None:
    assert agent_reply(attrs.evolve(SERVING, **changes)) == reply


def test_weight_is_a_percentage_from_1_to_100() -> None:
    for active in range(0, 30):
        w = weight(attrs.evolve(SERVING, max_connections=25, active=active))
        assert 1 <= w <= 100
        assert w == max(1, (25 - active) * 4)


# ----------------------------------------------------------------------
# A real listener's agent port


async def ask(port: int) -> str:
    """Be HAProxy once: connect to the agent port, read the line."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data.endswith(b"\n"), data
    assert data.count(b"\n") == 1, data
    return data.decode("ascii").rstrip("\n")


class Holding:
    """A handler that holds its connection until released."""

    def __init__(self) -> None:
        self.started = trio.Semaphore(0)
        self.release = trio.Event()
        self.saw: list[tuple[bool, bool]] = []

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        self.saw.append((listener.lameduck, listener.draining))
        self.started.release()
        await self.release.wait()


async def test_agent_port_follows_the_listener_through_each_state() -> None:
    handler = Holding()
    with trio.fail_after(10):
        async with open_listener(
            handler,
            address=LOCAL,
            flags=FREE,
            agent_port=0,
            max_connections=4,
            drain_timeout=5,
        ) as listener:
            port = listener.agent_port
            assert port is not None
            assert port != listener.port
            assert await ask(port) == "up ready 100%"
            async with (
                await open_stream_to(listener),
                await open_stream_to(listener),
                await open_stream_to(listener),
            ):
                for _ in range(3):
                    await handler.started.acquire()
                assert await ask(port) == "up ready 25%"  # nearly full
                listener.disable()
                assert await ask(port) == "drain"
                listener.enable()
                assert await ask(port) == "up ready 25%"
                listener.set_cb(None)
                assert await ask(port) == "drain"
                listener.set_cb(handler)
                listener.close()
                # Closed, its handlers still running: the agent still answers.
                assert await ask(port) == "drain stopped#closed"
                handler.release.set()
    # Gone with the listener.
    with pytest.raises(OSError, match=r"failed|refused"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_lame_duck_says_drain_keeps_serving_then_ends_when_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("trio_evlisten._agent.LAMEDUCK_QUIET", 0.2)
    handler = Holding()
    handler.release.set()
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, agent_port=0, lameduck=30
        ) as listener:
            port = listener.agent_port
            assert port is not None
            result: list[Any] = []

            async def drain() -> None:
                result.append(await listener.drain(1))
                result.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                t0 = trio.current_time()
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert listener.lameduck
                assert not listener.draining
                assert listener.statistics().lameduck
                # Still serving: a new connection is accepted and echoed.
                listener.set_cb(handler)
                async with await open_stream_to(listener):
                    await handler.started.acquire()
                assert handler.saw == [(True, False)]
                assert not result
                # The balancer hears "drain"; then nothing arrives: the lame
                # duck ends a quiet period later, long before its 30 s.
                assert await ask(port) == "drain"
                t_told = trio.current_time()
            assert result[0].cancelled == 0
            assert t_told + 0.2 <= result[1] < t0 + 5
            assert listener.closed
            assert listener.draining


async def test_drain_without_lameduck_option_has_none() -> None:
    with trio.fail_after(5):
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, agent_port=0
        ) as listener:
            await listener.drain(0)
            assert not listener.lameduck
            assert listener.closed


# ----------------------------------------------------------------------
# The lame duck's timing, on the mock clock


async def test_lame_duck_without_an_agent_runs_its_full_length(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    await lame_duck(lambda: 0, 7.5, None)
    assert trio.current_time() == t0 + 7.5


async def test_lame_duck_ends_a_quiet_period_after_the_balancer_heard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told = trio.Event()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def tell() -> None:
            await trio.sleep(0.7)
            told.set()

        nursery.start_soon(tell)
        await lame_duck(lambda: 0, 30, told.wait)
    assert trio.current_time() == pytest.approx(t0 + 0.7 + LAMEDUCK_QUIET)


async def test_lame_duck_goes_on_while_connections_arrive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    arrivals = 0

    async def arrive() -> None:
        nonlocal arrivals
        for _ in range(20):  # one every half quiet period, for 10 periods
            await trio.sleep(LAMEDUCK_QUIET / 2)
            arrivals += 1

    async def heard() -> None:
        await trio.lowlevel.checkpoint()

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive)
        await lame_duck(lambda: arrivals, 30, heard)
    # The last arrival at 10 periods; quiet from the wake-up that saw it.
    end = trio.current_time() - t0
    assert 11 * LAMEDUCK_QUIET <= end <= 12 * LAMEDUCK_QUIET


async def test_lame_duck_is_bounded_by_its_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    never = trio.Event()
    await lame_duck(lambda: 0, 3, never.wait)
    assert trio.current_time() == t0 + 3


# ----------------------------------------------------------------------
# Errors


async def test_agent_port_refused_on_a_unix_socket(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="agent_port needs a TCP listener"):
        async with open_listener(
            echo_handler, address=str(tmp_path / "s"), flags=FREE, agent_port=0
        ):
            pass  # pragma: no cover


async def test_agent_port_in_use_names_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"agent port '127.0.0.1':{port}"):
            async with open_listener(
                echo_handler, address=LOCAL, flags=FREE, agent_port=port
            ):
                pass  # pragma: no cover


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (65536, ValueError), ("80", TypeError), (True, TypeError)],
)
async def test_agent_port_checked(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="agent_port must be"):
        async with open_listener(
            echo_handler,
            address=LOCAL,
            flags=FREE,
            agent_port=value,  # type: ignore[arg-type]
        ):
            pass  # pragma: no cover


async def test_drain_lameduck_checked() -> None:
    async with open_listener(echo_handler, address=LOCAL, flags=FREE) as listener:
        with pytest.raises(ValueError, match="lameduck must be"):
            await listener.drain(lameduck=-1)
        await listener.drain(0, lameduck=0)


async def test_handler_keeps_serving_during_the_lame_duck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without an agent, the lame duck runs its full length, and a handler
    running through it sees lameduck, then draining."""
    seen: list[tuple[float, bool, bool]] = []

    async def handler(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        seen.append((trio.current_time(), listener.lameduck, listener.draining))
        await listener.wait_draining()
        seen.append((trio.current_time(), listener.lameduck, listener.draining))
        await conn.send_all(b"bye")

    with trio.fail_after(30):
        async with (
            open_listener(handler, address=LOCAL, flags=FREE, lameduck=4) as listener,
            await open_stream_to(listener) as conn,
        ):
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            result = await listener.drain(1)
            assert await recv_exactly(conn, 3) == b"bye"
    assert result.finished == 1
    assert seen[1] == (t0 + 4, True, True)
    assert seen[0][1:] == (False, False)


# ----------------------------------------------------------------------
# The workers: the supervisor answers for the set


@pytest.mark.slow
async def test_workers_supervisor_answers_for_the_set_and_sigterm_lames() -> None:
    from tests.test_workers import ask_pid, started, supervisor

    with trio.fail_after(40):
        async with supervisor(
            "--workers", "2", "--port", "0", "--agent-port", "0",
            "--lameduck", "1.5", "--drain-timeout", "1",
            "tests.workers_app:pid_echo",
        ) as (proc, log):  # fmt: skip
            port, pids = await started(log, 2)
            agent = next(
                int(m[1])
                for line in log.lines
                if (m := re.search(r"agent check answered on port (\d+)", line))
            )
            assert await ask(agent) == "up ready 100%"
            proc.send_signal(signal.SIGTERM)
            while (reply := await ask(agent)) != "drain":
                assert reply == "up ready 100%"
                await trio.sleep(0.02)
            # The lame duck: the workers still serve while the agent says drain.
            assert await ask_pid(port) in pids
            assert await ask(agent) == "drain"
            assert await proc.wait() == 0
        # The workers' own listeners did not bind the agent port: only one
        # process could have, and the log says nothing failed.
        assert not [line for line in log.lines if "ERROR" in line or "died" in line]
