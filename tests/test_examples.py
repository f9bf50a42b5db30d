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
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.conftest import recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ECHO = Path(__file__).resolve().parent.parent / "examples" / "echo.py"


def load_echo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_example", ECHO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Starts of the example tried before giving up: each retry follows an
#: "Address already in use", i.e. another program took the port between the
#: probe and the example's own bind.
MAX_STARTS = 5


def bind_as_echo(port: int) -> socket.socket:
    """A socket bound exactly as examples/echo.py binds its listener.

    IPv4 on 0.0.0.0 with ``SO_REUSEADDR`` (``Flag.REUSEABLE``): so a port
    bound on any local address (a client socket of another program on
    127.3.4.5, say) is seen as taken, as it is by the example, and a port
    only in TIME_WAIT as free, as it is for the example.

    Raises:
        OSError: where the example's bind would fail (``EADDRINUSE``).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def free_port() -> int:
    """A port the echo example can bind now (another program may take it)."""
    with bind_as_echo(0) as s:
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGINT the example if it runs, then reap it (killed after 10 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def start_echo(
    pick_port: Callable[[], int] = free_port,
) -> tuple[subprocess.Popen[str], int]:
    """Start the example on a port from ``pick_port``, once it listens.

    A port taken between the probe and the example's bind makes the example
    exit with "Address already in use": then it is started again on another
    port, up to ``MAX_STARTS`` times.

    Resource handling:
        The returned process is the caller's to ``stop``; one that did not
        start is reaped here.
    """
    tried = []
    for _ in range(MAX_STARTS):
        port = pick_port()
        proc = subprocess.Popen(
            [sys.executable, str(ECHO), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line == f"Echo server listening on 0.0.0.0:{port}\n":
            return proc, port
        out, err = stop(proc)
        if "Address already in use" not in err:
            raise AssertionError(f"the example did not start: {line + out!r} {err!r}")
        tried.append(port)
    raise AssertionError(f"ports {tried} were all taken by the time the example bound")


@pytest.fixture
def echo_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The example, started on a free port, stopped with SIGINT afterwards."""
    proc, port = start_echo()
    try:
        yield proc, port
    finally:
        stop(proc)


@pytest.fixture
def port_taken_elsewhere() -> Iterator[int]:
    """A port held by a listening socket on 127.0.0.2, not on 127.0.0.1.

    As other programs' sockets on other loopback addresses are (the fault
    tests' clients bind random 127.x.y.z sources): free for 127.0.0.1, taken
    for the example's 0.0.0.0.
    """
    with socket.socket() as other:
        other.bind(("127.0.0.2", 0))
        other.listen()
        yield other.getsockname()[1]


def test_probing_127_0_0_1_misses_a_port_the_example_cannot_bind(
    port_taken_elsewhere: int,
) -> None:
    port = port_taken_elsewhere
    # What free_port() used to probe: 127.0.0.1 binds fine...
    with socket.socket() as old_probe:
        old_probe.bind(("127.0.0.1", port))
    # ...but the example cannot bind the port, and the probe says so.
    result = subprocess.run(
        [sys.executable, str(ECHO), str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Address already in use" in result.stderr
    with pytest.raises(OSError, match="Address already in use"):
        bind_as_echo(port).close()


def test_free_port_probes_as_the_example_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    probes = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:
        reuse = self.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        probes.append((self.family, address, bool(reuse)))
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    free_port()
    assert probes == [(socket.AF_INET, ("0.0.0.0", 0), True)]


def test_start_echo_moves_on_when_the_port_is_taken(port_taken_elsewhere: int) -> None:
    # The race free_port() cannot close: the port it found is taken before
    # the example binds it (forced here by offering a taken port first).
    offered = [port_taken_elsewhere]

    def pick_port() -> int:
        offered.append(free_port())
        return offered[-2]

    proc, port = start_echo(pick_port)
    try:
        assert port == offered[1] != port_taken_elsewhere
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
    finally:
        stop(proc)


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
