"""The WebSocket example echoes for a client library nobody here wrote.

The example runs as a subprocess on port 0; the client is the ``websockets``
package's synchronous client, run in threads (``trio.to_thread.run_sync``)
so several can talk at once while the test stays bounded by trio.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

try:
    import trio_websocket  # noqa: F401  (the example's)
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
except ImportError:  # not among the package's own test needs (.ci/wheel-check)
    pytest.skip(
        "trio-websocket or websockets is not installed: pip install -e '.[test]'",
        allow_module_level=True,
    )

from tests.test_http_example import Example, load_example, run_example

if TYPE_CHECKING:
    from collections.abc import Iterator

WEBSOCKET_SERVER = (
    Path(__file__).resolve().parent.parent / "examples" / ("websocket_server.py")
)
app = load_example(WEBSOCKET_SERVER)
#: Seconds any one client operation may take (the test is bounded anyway).
TIMEOUT = 10.0

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[Example]:
    with run_example(WEBSOCKET_SERVER, "WebSocket server listening on") as example:
        yield example


def uri(example: Example) -> str:
    return f"ws://127.0.0.1:{example.port}/echo"


def echo_session(
    url: str, messages: list[str | bytes]
) -> tuple[list[str | bytes], int]:
    """Send each message, collect each echo, close: (echoes, close code)."""
    echoes: list[str | bytes] = []
    with connect(url, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        for message in messages:
            ws.send(message)
            echoes.append(ws.recv(timeout=TIMEOUT))
    assert ws.close_code is not None
    return echoes, ws.close_code


async def test_text_binary_and_a_mebibyte_come_back(server: Example) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, trio-websocket's default limit
    messages: list[str | bytes] = ["hello", "héllo wörld ✓", b"\x00\xff\x01", big, ""]
    with trio.fail_after(30):
        echoes, code = await trio.to_thread.run_sync(
            echo_session, uri(server), messages
        )
    assert echoes == messages
    assert [type(e) for e in echoes] == [type(m) for m in messages]
    assert code == 1000  # the server answered our close handshake
    assert server.interrupt() == (0, "", "")


async def test_several_clients_at_once(server: Example) -> None:
    results: dict[int, tuple[list[str | bytes], int]] = {}

    async def client(i: int) -> None:
        messages: list[str | bytes] = [f"{i}:{n}" * (1 + n) for n in range(20)]
        messages.append(bytes([i]) * 70000)
        results[i] = await trio.to_thread.run_sync(echo_session, uri(server), messages)
        assert results[i] == (messages, 1000)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(client, i)
    assert sorted(results) == list(range(8))


async def test_message_over_the_limit_closes_with_1009(server: Example) -> None:
    def too_big() -> int | None:
        with connect(uri(server), max_size=None, open_timeout=TIMEOUT) as ws:
            ws.send(b"x" * (app.MAX_MESSAGE_SIZE + 1))
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
        return ws.close_code

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(too_big) == 1009


async def test_ctrl_c_closes_open_websockets_with_1001_and_exits_quietly(
    server: Example,
) -> None:
    def wait_for_close(ws_url: str, connected: trio.Event) -> tuple[int | None, str]:
        with connect(ws_url, open_timeout=TIMEOUT) as ws:
            ws.send("ping")
            assert ws.recv(timeout=TIMEOUT) == "ping"
            trio.from_thread.run_sync(connected.set)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
        return ws.close_code, ws.close_reason or ""

    closes: list[tuple[int | None, str]] = []

    async def client(connected: trio.Event) -> None:
        closes.append(
            await trio.to_thread.run_sync(wait_for_close, uri(server), connected)
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            events = [trio.Event() for _ in range(3)]
            for event in events:
                nursery.start_soon(client, event)
            for event in events:
                await event.wait()
            status, out, err = await trio.to_thread.run_sync(server.interrupt)
    assert (status, out, err) == (0, "", "")
    assert closes == [(1001, "server shutting down")] * 3


@pytest.mark.parametrize("arg", ["-1", "65536", "abc"])
def test_invalid_port(arg: str) -> None:
    done = subprocess.run(
        [sys.executable, str(WEBSOCKET_SERVER), arg],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "Invalid port\n")


def test_parse_args() -> None:
    assert app.parse_args(["websocket_server.py"]) == ("127.0.0.1", 8765)
    assert app.parse_args(["x", "0", "--host", "::1"]) == ("::1", 0)
