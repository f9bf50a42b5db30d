"""trio_evlisten.testing: the helpers users get for their own tests."""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

import pytest
import trio

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from pathlib import Path

    from trio_evlisten._socket import Address


async def _echo_through(address: Address) -> tuple[object, bytes]:
    async with (
        open_listener(echo_handler, address=address, flags=Flag.CLOSE_ON_FREE) as lst,
        await open_stream_to(lst) as client,
    ):
        await client.send_all(b"ping")
        return lst.sockname, await recv_exactly(client, 4)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1"])
async def test_open_stream_to_reaches_tcp_listeners(host: str) -> None:
    with trio.fail_after(10):
        sockname, got = await _echo_through((host, 0))
    assert got == b"ping"
    assert sockname[0] == host  # type: ignore[index]


async def test_open_stream_to_reaches_unix_listeners(tmp_path: Path) -> None:
    with trio.fail_after(10):
        sockname, got = await _echo_through(str(tmp_path / "s.sock"))
    assert got == b"ping"
    assert sockname == str(tmp_path / "s.sock")


async def test_scripted_socket_follows_its_script(
    autojump_clock: trio.abc.Clock,
) -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    sock = ScriptedSocket([emfile, None])
    seen: list[OSError] = []

    def on_error(listener: ConnListener, error: OSError) -> None:
        seen.append(error)

    with trio.fail_after(10):
        async with (
            open_listener(
                echo_handler, sock=sock, flags=Flag.CLOSE_ON_FREE, error_cb=on_error
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"x")
            assert await recv_exactly(client, 1) == b"x"
    # The error, then the scripted None (a real accept), then EAGAIN ends the
    # batch: three calls, the second one 10 ms (the first backoff) later.
    assert seen == [emfile]
    assert len(sock.calls) == 3
    assert sock.calls[1] - sock.calls[0] == pytest.approx(0.010)
    assert not sock.script
    assert listener.statistics().accepted == 1


def test_scripted_socket_is_a_listening_loopback_socket() -> None:
    with ScriptedSocket() as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1"
        assert port != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
