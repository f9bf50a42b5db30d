"""The echo example behaves as the chapter's C example does."""

from __future__ import annotations

import errno
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import trio

from tests.conftest import recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from collections.abc import Iterator

ECHO = Path(__file__).resolve().parent.parent / "examples" / "echo.py"


def load_echo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_example", ECHO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def echo_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The example, started on a free port, stopped with SIGINT afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ECHO), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"Echo server listening on 0.0.0.0:{port}"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nc") is None, reason="nc is not installed")
def test_nc_gets_its_lines_back(echo_server: tuple[subprocess.Popen[str], int]) -> None:
    _, port = echo_server
    lines = "hello\nworld\n" + "x" * 5000 + "\n"
    result = subprocess.run(
        ["nc", "-q", "1", "127.0.0.1", str(port)],
        input=lines,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout == lines


@pytest.mark.slow
async def test_200_concurrent_clients(
    echo_server: tuple[subprocess.Popen[str], int],
) -> None:
    _, port = echo_server
    results: dict[int, bytes] = {}

    async def client(i: int) -> None:
        payload = f"client {i}: ".encode() * (1 + i % 50)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(payload)
            await stream.send_eof()
            results[i] = await recv_exactly(stream, len(payload) + 1)
        assert results[i] == payload

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(client, i)
    assert len(results) == 200


@pytest.mark.slow
def test_ctrl_c_ends_it_quietly(echo_server: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = echo_server
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err == ""
    assert "Traceback" not in out


@pytest.mark.parametrize("arg", ["0", "-5", "65536", "abc", ""])
def test_invalid_port(arg: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ECHO), arg], capture_output=True, text=True, timeout=30
    )
    assert result.stdout == "Invalid port\n"
    assert result.returncode == 1


def test_parse_port_default() -> None:
    echo = load_echo()
    assert echo.parse_port(["echo.py"]) == 9876
    assert echo.parse_port(["echo.py", "65535"]) == 65535
    assert echo.parse_port(["echo.py", "1"]) == 1


def test_bind_failure_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ECHO), str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.startswith("Couldn't create listener:")
    assert "Address already in use" in result.stderr


async def test_error_callback_prints_and_stops(
    capsys: pytest.CaptureFixture[str], autojump_clock: trio.abc.Clock
) -> None:
    echo = load_echo()
    sock = ScriptedSocket([OSError(errno.EBADF, "Bad file descriptor")])
    with trio.fail_after(10):
        async with (
            open_listener(
                echo.echo,
                sock=sock,
                flags=Flag.CLOSE_ON_FREE,
                error_cb=echo.accept_error,
            ) as listener,
            await open_stream_to(listener),
        ):
            await trio.sleep_forever()  # cancelled by accept_error's loopexit
    assert listener.closed
    assert listener.statistics().errors == 1
    assert capsys.readouterr().err == (
        f"Got an error {errno.EBADF} (Bad file descriptor) on the listener. "
        "Shutting down.\n"
    )
