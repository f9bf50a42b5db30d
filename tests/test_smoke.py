from __future__ import annotations

import trio

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import open_stream_to


async def test_echo_roundtrip() -> None:
    with trio.fail_after(10):
        async with (
            open_listener(
                echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"hello")
            assert await recv_exactly(client, 5) == b"hello"
        assert listener.closed
        assert listener.fd == -1
