"""One capacity gate: max_connections, and EMFILE/ENFILE resuming on a freed fd."""

from __future__ import annotations

import errno
import os
import resource
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import (
    FD_RESERVE,
    ConnListener,
    Flag,
    ResourceLimitWarning,
    open_listener,
)
from trio_evlisten.testing import ScriptedSocket, open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


class Held:
    """A handler that echoes once, then holds its connection until released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = trio.Semaphore(0)
        self.accepted_at: list[float] = []

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        self.accepted_at.append(trio.current_time())
        data = await conn.receive_some()
        await conn.send_all(data)
        self.started.release()
        await self.release.wait()


# ----------------------------------------------------------------------
# EMFILE/ENFILE: a handler that finishes ends the pause


@pytest.mark.parametrize(
    ("name", "resumes_on_fd"),
    [("EMFILE", True), ("ENFILE", True), ("ENOBUFS", False), ("ENOMEM", False)],
)
async def test_out_of_fds_resumes_when_a_handler_finishes_not_at_the_backoff(
    autojump_clock: trio.testing.MockClock, name: str, resumes_on_fd: bool
) -> None:
    code = getattr(errno, name)
    errors: list[float] = []
    fifth_error = trio.Event()

    def on_error(listener: ConnListener, exc: OSError) -> None:
        errors.append(trio.current_time())
        if len(errors) == 5:
            fifth_error.set()

    held = Held()
    with trio.fail_after(10), ScriptedSocket() as ssock:
        async with (
            open_listener(held, sock=ssock, error_cb=on_error) as listener,
            await open_stream_to(listener) as first,
        ):
            await first.send_all(b"1")
            assert await recv_exactly(first, 1) == b"1"
            await held.started.acquire()
            # Out of fds from now on, for five accept() calls.
            ssock.script.extend(OSError(code, os.strerror(code)) for _ in range(5))
            async with await open_stream_to(listener) as second:
                await second.send_all(b"2")
                await fifth_error.wait()
                t1 = errors[0]
                # Five errors: at t1 + 0, 10, 30, 70, 150 ms; the next pause
                # (160 ms) would end at t1 + 310 ms. Free an fd at t1 + 200 ms.
                assert [t - t1 for t in errors] == pytest.approx(
                    [0, 0.01, 0.03, 0.07, 0.15]
                )
                await trio.sleep_until(t1 + 0.2)
                held.release.set()  # the first handler finishes now
                assert await recv_exactly(second, 1) == b"2"
                accepted_at = held.accepted_at[1]
                held_stats = listener.statistics()
    if resumes_on_fd:
        assert accepted_at == pytest.approx(t1 + 0.2)
    else:
        assert accepted_at == pytest.approx(t1 + 0.31)
    assert held_stats.accepted == 2
    assert held_stats.errors == 5
    assert held_stats.backoff == 0.0  # the accept() succeeded: reset


async def test_a_handler_finishing_without_an_fd_error_does_not_cut_a_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # EINVAL (with an error callback: pause, no fd involved) keeps its pause
    # even when a handler finishes inside it.
    held = Held()
    errors: list[float] = []
    with trio.fail_after(10), ScriptedSocket() as ssock:
        async with (
            open_listener(
                held, sock=ssock, error_cb=lambda _l, _e: errors.append(0.0)
            ) as listener,
            await open_stream_to(listener) as first,
        ):
            await first.send_all(b"1")
            assert await recv_exactly(first, 1) == b"1"
            await held.started.acquire()
            ssock.script.append(OSError(errno.EINVAL, "not listening"))
            async with await open_stream_to(listener) as second:
                await second.send_all(b"2")
                await trio.testing.wait_all_tasks_blocked()
                t1 = ssock.calls[-1]  # the EINVAL
                assert trio.current_time() == t1  # inside its 10 ms pause
                held.release.set()
                assert await recv_exactly(second, 1) == b"2"
                assert held.accepted_at[1] == pytest.approx(t1 + 0.01)
    assert len(errors) == 1


# ----------------------------------------------------------------------
# set_max_connections


async def test_set_max_connections_on_a_running_listener() -> None:
    held = Held()
    with trio.fail_after(10):
        async with (
            open_listener(held, address=LOCAL, flags=FREE, max_connections=1) as lst,
            await open_stream_to(lst) as a,
            await open_stream_to(lst) as b,
            await open_stream_to(lst) as c,
        ):
            for client in (a, b, c):
                await client.send_all(b"x")
            assert await recv_exactly(a, 1) == b"x"
            await held.started.acquire()
            await trio.testing.wait_all_tasks_blocked()
            assert (lst.statistics().accepted, lst.statistics().active) == (1, 1)
            # Raising the cap wakes the accept task: b is taken at once.
            lst.set_max_connections(2)
            assert await recv_exactly(b, 1) == b"x"
            await held.started.acquire()
            await trio.testing.wait_all_tasks_blocked()
            stats = lst.statistics()
            assert (stats.accepted, stats.active) == (2, 2)
            assert stats.max_connections == 2
            # Lowering it cancels nobody; c still waits.
            lst.set_max_connections(1)
            await trio.testing.wait_all_tasks_blocked()
            assert (lst.statistics().accepted, lst.statistics().active) == (2, 2)
            # No cap: c is taken.
            lst.set_max_connections(None)
            assert await recv_exactly(c, 1) == b"x"
            assert lst.statistics().max_connections is None
            held.release.set()


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-3, ValueError), (True, TypeError), ("5", TypeError)],
)
async def test_set_max_connections_checks_like_the_option(
    bad: Any, error: type[Exception]
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, max_connections=3
        ) as listener:
            with pytest.raises(error, match=rf"max_connections .*{bad!r}"):
                listener.set_max_connections(bad)
            assert listener.statistics().max_connections == 3
            listener.close()
            with pytest.raises(trio.ClosedResourceError, match="closed listener"):
                listener.set_max_connections(4)


# ----------------------------------------------------------------------
# RLIMIT_NOFILE warning


def soft_nofile() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_NOFILE is unlimited here: nothing to warn about")
    return soft


async def test_max_connections_above_the_fd_limit_warns_once_at_start() -> None:
    soft = soft_nofile()
    too_many = soft - FD_RESERVE + 1
    with trio.fail_after(10):
        with pytest.warns(ResourceLimitWarning) as caught:
            async with open_listener(
                echo_handler, address=LOCAL, flags=FREE, max_connections=too_many
            ):
                pass
        assert len(caught) == 1
        message = str(caught[0].message)
        assert f"max_connections={too_many}" in message
        assert f"soft limit is {soft}" in message
        assert caught[0].filename == __file__  # points at the async with


async def test_max_connections_within_the_fd_limit_does_not_warn() -> None:
    soft = soft_nofile()
    with trio.fail_after(10):
        async with open_listener(
            echo_handler,
            address=LOCAL,
            flags=FREE,
            max_connections=soft - FD_RESERVE,
        ) as listener:
            async with await open_stream_to(listener) as client:
                await client.send_all(b"ok")
                assert await recv_exactly(client, 2) == b"ok"
            # Raising it past the limit later warns too.
            with pytest.warns(ResourceLimitWarning, match="RLIMIT_NOFILE"):
                listener.set_max_connections(soft)
            assert listener.statistics().max_connections == soft
