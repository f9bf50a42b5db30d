"""Tests for greeter.py, written as a user of trio_evlisten writes them.

With pytest-trio installed and ``trio_mode = true`` in the pytest
configuration, ``async def`` tests run under Trio, and the ``autojump_clock``
fixture makes waiting instant.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest
import trio
import trio.testing
from greeter import greet, on_accept_error

from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends until it hangs up."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_greets_the_client_by_name() -> None:
    with trio.fail_after(10):
        async with (
            open_listener(
                greet, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"Ada\n")
            assert await read_all(client) == b"hello Ada\n"


async def test_a_client_that_sends_no_name_is_a_stranger() -> None:
    with trio.fail_after(10):
        async with (
            open_listener(
                greet, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_eof()
            assert await read_all(client) == b"hello stranger\n"


async def test_keeps_serving_through_a_shortage_of_fds(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    with trio.fail_after(10), ScriptedSocket([emfile] * 3) as sock:
        async with (
            open_listener(
                greet, sock=sock, flags=Flag.CLOSE_ON_FREE, error_cb=on_accept_error
            ) as listener,
            # A client in the backlog makes accept() run, and fail on cue.
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"Grace\n")
            assert await read_all(client) == b"hello Grace\n"
    # Three failures, three warnings, and the listener's pauses before the
    # accept() that took the client (exact: the clock is trio's mock clock).
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3
    start = sock.calls[0]
    assert [round(t - start, 3) for t in sock.calls[:4]] == [0, 0.01, 0.03, 0.07]


async def test_stops_serving_when_the_socket_breaks(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ebadf = OSError(errno.EBADF, os.strerror(errno.EBADF))
    with trio.fail_after(10), ScriptedSocket([ebadf]) as sock:
        # This client waits in the backlog, so accept() runs at once.
        async with (
            await trio.open_tcp_stream(*sock.getsockname()),
            open_listener(
                greet, sock=sock, flags=Flag.CLOSE_ON_FREE, error_cb=on_accept_error
            ) as listener,
        ):
            await trio.testing.wait_all_tasks_blocked()
            assert listener.closed
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
