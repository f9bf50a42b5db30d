"""The listening socket closed underfoot, and sockets that cannot listen.

``listener.socket.close()`` from a handler or the body: the accept task must
not spin. With an error callback it gets ``EBADF`` once per backoff step;
without one, ``OSError(EBADF)`` ends the listener and comes out in the group.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler
from tests.faults._support import Counter
from tests.faults.test_exhaustion import expected_times
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

LOCAL = ("127.0.0.1", 0)


async def closing_handler(
    listener: ConnListener, conn: trio.SocketStream, addr: Any
) -> None:
    await conn.send_all(b"bye")
    listener.socket.close()


@pytest.mark.parametrize("where", ["body", "handler"])
@pytest.mark.parametrize("flags", [Flag.CLOSE_ON_FREE, Flag(0)])
async def test_socket_closed_underfoot_with_error_cb_backs_off(
    autojump_clock: trio.testing.MockClock, where: str, flags: Flag
) -> None:
    counter = Counter()
    with trio.fail_after(100):
        async with open_listener(
            closing_handler, address=LOCAL, flags=flags, error_cb=counter
        ) as lst:
            if where == "body":
                lst.socket.close()
            else:
                async with await open_stream_to(lst) as client:
                    assert await client.receive_some() == b"bye"
            await trio.testing.wait_all_tasks_blocked()
            assert counter.times, "the closed socket was never reported"
            start = counter.times[0]
            await trio.sleep(10 - (trio.current_time() - start))
            stats = lst.statistics()
            assert not lst.closed  # the callback decides; it did not close
    # Once per backoff step over 10 s: 17 reports, not thousands.
    assert [t - start for t in counter.times] == pytest.approx(expected_times(10.0))
    assert set(counter.errnos) == {errno.EBADF}
    assert stats.paused_by_errors
    assert stats.errors == len(counter.times)


@pytest.mark.parametrize("where", ["body", "handler"])
async def test_socket_closed_underfoot_without_error_cb_raises_ebadf(
    autojump_clock: trio.testing.MockClock, where: str
) -> None:
    with trio.fail_after(10):
        with pytest.RaisesGroup(
            pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.EBADF)
        ):
            async with open_listener(
                closing_handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE
            ) as lst:
                if where == "body":
                    lst.socket.close()
                else:
                    async with await open_stream_to(lst) as client:
                        assert await client.receive_some() == b"bye"
                await trio.sleep_forever()
        assert lst.closed
        assert lst.statistics().errors == 1


async def test_wrapped_subclass_socket_closed_underfoot_goes_to_error_cb(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = Counter()
    with trio.fail_after(100), ScriptedSocket() as ssock:
        async with open_listener(
            echo_handler, sock=ssock, flags=Flag.CLOSE_ON_FREE, error_cb=counter
        ) as lst:
            lst.socket.close()
            await trio.sleep(5)
            assert not lst.closed
    assert set(counter.errnos) == {errno.EBADF}
    assert 5 <= len(counter.times) <= len(expected_times(5.0))


# ----------------------------------------------------------------------
# Sockets that are not listening stream sockets: a clear ValueError at open


async def test_seqpacket_socket_is_a_value_error() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            async with open_listener(echo_handler, sock=sock):
                pytest.fail("opened")  # pragma: no cover
        assert sock.fileno() != -1  # still the caller's


async def test_connected_socket_is_a_clear_value_error() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="connected"):
        async with open_listener(echo_handler, sock=a):
            pytest.fail("opened")  # pragma: no cover


async def test_connected_socket_is_refused_somehow_and_left_open() -> None:
    """Whatever the message, a connected socket never becomes a listener."""
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises((ValueError, OSError)):
            async with open_listener(echo_handler, sock=a):
                pytest.fail("opened")  # pragma: no cover
        assert a.fileno() != -1
        b.sendall(b"still a pair")
        assert a.recv(100) == b"still a pair"


async def test_unbound_socket_is_a_value_error() -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="bound"):
        async with open_listener(echo_handler, sock=sock):
            pytest.fail("opened")  # pragma: no cover
