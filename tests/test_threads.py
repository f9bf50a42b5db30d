"""Flag.THREADSAFE: the non-blocking methods called from other threads."""

from __future__ import annotations

import contextlib
import errno
import math
import socket
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from collections.abc import Callable

LOCAL = ("127.0.0.1", 0)
SAFE = Flag.THREADSAFE | Flag.CLOSE_ON_FREE

#: Threads hammering enable/disable, and the toggles each one makes.
THREADS = 4
TOGGLES = 2000
#: Clients that connect while the threads hammer.
CLIENTS = 20


class Served:
    """An accept callback that reports each connection's peer and returns."""

    def __init__(self, name: str = "served") -> None:
        self.name = name
        self.calls = 0
        self._send, self.addrs = trio.open_memory_channel[Any](math.inf)

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any, *args: Any
    ) -> None:
        self.calls += 1
        self._send.send_nowait((addr, args))


def sockname_of(stream: trio.SocketStream) -> Any:
    return stream.socket.getsockname()


# ----------------------------------------------------------------------
# Without THREADSAFE


def _calls(listener: ConnListener) -> dict[str, Callable[[], None]]:
    return {
        "enable": listener.enable,
        "disable": listener.disable,
        "set_cb": lambda: listener.set_cb(None),
        "set_error_cb": lambda: listener.set_error_cb(None),
        "close": listener.close,
    }


@pytest.mark.parametrize(
    "method", ["enable", "disable", "set_cb", "set_error_cb", "close"]
)
async def test_without_threadsafe_a_call_from_a_thread_raises(method: str) -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(
            served, address=LOCAL, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            call = _calls(listener)[method]
            with pytest.raises(RuntimeError, match=r"THREADSAFE") as excinfo:
                await trio.to_thread.run_sync(call)
            assert method in str(excinfo.value)
            # The refused call changed nothing: the listener still serves.
            assert listener.enabled
            assert not listener.closed
            async with await open_stream_to(listener) as client:
                addr, _ = await served.addrs.receive()
                assert addr == sockname_of(client)


# ----------------------------------------------------------------------
# With THREADSAFE: hammering enable/disable


def _toggle(listener: ConnListener, times: int) -> None:
    for i in range(times):
        if i % 2:
            listener.enable()
        else:
            listener.disable()


async def _hammer(
    listener: ConnListener, stack: contextlib.AsyncExitStack
) -> list[Any]:
    """Toggle from THREADS threads while CLIENTS clients connect.

    Returns the clients' addresses; the streams stay open on ``stack``.
    """
    addrs: list[Any] = []

    async def connect_all() -> None:
        for _ in range(CLIENTS):
            client = await stack.enter_async_context(await open_stream_to(listener))
            addrs.append(sockname_of(client))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(THREADS):
            nursery.start_soon(trio.to_thread.run_sync, _toggle, listener, TOGGLES)
        nursery.start_soon(connect_all)
    return addrs


async def test_threadsafe_hammering_then_a_final_disable_from_a_thread() -> None:
    served = Served()
    with trio.fail_after(10):
        async with (
            open_listener(served, address=LOCAL, flags=SAFE) as listener,
            contextlib.AsyncExitStack() as stack,
        ):
            await _hammer(listener, stack)
            await trio.to_thread.run_sync(listener.disable)
            assert listener.enabled is False
            await trio.testing.wait_all_tasks_blocked()
            calls, accepted = served.calls, listener.statistics().accepted
            async with await open_stream_to(listener) as late:
                await trio.testing.wait_all_tasks_blocked()
                assert served.calls == calls
                assert listener.statistics().accepted == accepted
                seen = []
                while True:
                    try:
                        seen.append(served.addrs.receive_nowait()[0])
                    except trio.WouldBlock:
                        break
                assert sockname_of(late) not in seen
            assert listener.enabled is False


async def test_threadsafe_hammering_then_a_final_enable_from_a_thread() -> None:
    served = Served()
    with trio.fail_after(10):
        async with (
            open_listener(served, address=LOCAL, flags=SAFE) as listener,
            contextlib.AsyncExitStack() as stack,
        ):
            addrs = await _hammer(listener, stack)
            await trio.to_thread.run_sync(listener.enable)
            assert listener.enabled is True
            async with await open_stream_to(listener) as late:
                addrs.append(sockname_of(late))
                # Every client, those queued during the hammering included,
                # is served now.
                seen = [(await served.addrs.receive())[0] for _ in addrs]
                assert sorted(seen) == sorted(addrs)
            assert listener.statistics().accepted == CLIENTS + 1
            assert listener.enabled is True


# ----------------------------------------------------------------------
# With THREADSAFE: close and set_cb from a thread


def _close_then_connect(listener: ConnListener) -> socket.socket | None:
    """In a thread: close the listener, then at once try to connect to it.

    The socket itself is closed by the Trio thread moments later, so the
    connect may still be queued by the kernel (the listener must then not
    accept it), be refused, or be reset (queued, then the socket closes).
    """
    listener.close()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(listener.sockname)
    except (ConnectionRefusedError, ConnectionResetError):
        client.close()
        return None
    except BaseException:
        client.close()
        raise
    return client


async def test_close_from_a_thread_stops_accepting_and_closes_the_socket() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(served, address=LOCAL, flags=SAFE) as listener:
            async with await open_stream_to(listener) as client:
                addr, _ = await served.addrs.receive()
                assert addr == sockname_of(client)
            late = await trio.to_thread.run_sync(_close_then_connect, listener)
            try:
                assert listener.closed
                await trio.testing.wait_all_tasks_blocked()
                assert listener.fd == -1
                assert served.calls == 1
                assert listener.statistics().accepted == 1
            finally:
                if late is not None:
                    late.close()
            with pytest.raises(trio.ClosedResourceError):
                listener.enable()
        # The block exits cleanly, and a second close is harmless.
        listener.close()
    assert listener.statistics().closed


async def test_set_cb_from_a_thread_takes_effect_for_the_next_connection() -> None:
    first, second = Served("first"), Served("second")
    with trio.fail_after(10):
        async with open_listener(first, 1, address=LOCAL, flags=SAFE) as listener:
            async with await open_stream_to(listener) as client:
                assert await first.addrs.receive() == (sockname_of(client), (1,))
            await trio.to_thread.run_sync(
                lambda: listener.set_cb(second, "from", "thread")
            )
            async with await open_stream_to(listener) as client:
                assert await second.addrs.receive() == (
                    sockname_of(client),
                    ("from", "thread"),
                )
            assert (first.calls, second.calls) == (1, 1)


async def test_set_cb_none_then_a_callback_from_threads() -> None:
    served = Served()
    with trio.fail_after(10):
        async with open_listener(served, address=LOCAL, flags=SAFE) as listener:
            await trio.to_thread.run_sync(lambda: listener.set_cb(None))
            async with await open_stream_to(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                assert served.calls == 0
                # Setting a callback from a thread wakes the accept task.
                await trio.to_thread.run_sync(lambda: listener.set_cb(served, 7))
                assert await served.addrs.receive() == (sockname_of(client), (7,))


async def test_enable_from_a_thread_wakes_a_disabled_listener() -> None:
    served = Served()
    with trio.fail_after(10):
        async with (
            open_listener(
                served, address=LOCAL, flags=SAFE | Flag.DISABLED
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await trio.testing.wait_all_tasks_blocked()
            assert served.calls == 0
            await trio.to_thread.run_sync(listener.enable)
            addr, _ = await served.addrs.receive()
            assert addr == sockname_of(client)


async def test_statistics_from_a_thread_agree_on_the_error_pause(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The pause after an accept() error ends at a time on Trio's clock, which
    # another thread cannot read: the state forgets a pause once it is over,
    # so both threads see the same thing.
    emfile = OSError(errno.EMFILE, "Too many open files")

    def disable_on_error(listener: ConnListener, error: OSError) -> None:
        listener.disable()

    with trio.fail_after(10), ScriptedSocket([emfile]) as sock:
        async with (
            open_listener(
                None, sock=sock, flags=SAFE, error_cb=disable_on_error
            ) as listener,
            await open_stream_to(listener),
        ):
            listener.set_cb(echo_handler)
            await trio.testing.wait_all_tasks_blocked()
            here = listener.statistics()
            there = await trio.to_thread.run_sync(listener.statistics)
            assert here.paused_by_errors
            assert there.paused_by_errors
            # A clock that moves only when told, so the pause cannot run out
            # while the other thread reads it.
            mock_clock.jump(1)  # the 10 ms pause is long over
            await trio.testing.wait_all_tasks_blocked()
            here = listener.statistics()
            there = await trio.to_thread.run_sync(listener.statistics)
            assert (here.errors, here.enabled) == (1, False)
            assert not here.paused_by_errors
            assert not there.paused_by_errors
