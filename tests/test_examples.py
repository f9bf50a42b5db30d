"""The echo examples: echo.py behaves as the chapter's C example does, and
tls_echo.py is the same over TLS, as ``openssl s_client`` and Python's
``ssl`` client see it."""

from __future__ import annotations

import errno
import importlib.util
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trustme

from tests.conftest import recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ECHO = EXAMPLES / "echo.py"
TLS_ECHO = EXAMPLES / "tls_echo.py"


def load_echo(path: Path = ECHO) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{path.stem}_example", path)
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
    args: Sequence[str] = (str(ECHO),),
    banner: str = "Echo server listening on 0.0.0.0:{port}\n",
) -> tuple[subprocess.Popen[str], int]:
    """Start an echo example on a port from ``pick_port``, once it listens.

    ``args`` is the example and the arguments before the port; it listens
    once it prints ``banner`` for the port. A port taken between the probe
    and the example's bind makes the example exit with "Address already in
    use": then it is started again on another port, up to ``MAX_STARTS``
    times.

    Resource handling:
        The returned process is the caller's to ``stop``; one that did not
        start is reaped here.
    """
    tried = []
    for _ in range(MAX_STARTS):
        port = pick_port()
        proc = subprocess.Popen(
            [sys.executable, *args, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line == banner.format(port=port):
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


# ----------------------------------------------------------------------
# tls_echo.py: the same server over TLS


@attrs.frozen
class TLSFiles:
    """What ``python -m trustme`` writes: the server's chain and key, the CA."""

    cert: Path
    key: Path
    ca: Path


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TLSFiles:
    files = TLSFiles(
        tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    )
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files.cert.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


@pytest.fixture
def tls_echo_server(tls_files: TLSFiles) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """tls_echo.py on a free port, with a certificate from the test CA."""
    proc, port = start_echo(
        args=(str(TLS_ECHO), str(tls_files.cert), str(tls_files.key)),
        banner="TLS echo server listening on 0.0.0.0:{port}\n",
    )
    try:
        yield proc, port
    finally:
        stop(proc)


def test_tls_echo_echoes_to_pythons_ssl_client_and_stops_quietly(
    tls_echo_server: tuple[subprocess.Popen[str], int], client_ctx: ssl.SSLContext
) -> None:
    proc, port = tls_echo_server
    payload = b"over TLS\n" * 2000
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload) and (chunk := tls.recv(65536)):
            got += chunk
        assert got == payload
    out, err = stop(proc)
    assert proc.returncode == 0
    assert (out, err) == ("", "")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_gets_its_line_back(
    tls_echo_server: tuple[subprocess.Popen[str], int], tls_files: TLSFiles
) -> None:
    """As the example's header says to poke at it."""
    _, port = tls_echo_server
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
    argv += ["-CAfile", str(tls_files.ca), "-verify_return_error"]
    # s_client hangs up when its input ends, maybe before the echo is back:
    # so its input stays open until the line has come back.
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as client:
        assert client.stdin is not None
        assert client.stdout is not None
        try:
            client.stdin.write(b"hello over TLS\n")
            client.stdin.flush()
            seen = read_until(client.stdout, b"hello over TLS\n", timeout=20)
        finally:
            client.kill()
            client.communicate()
    assert b"Verify return code: 0 (ok)" in seen
    assert seen.endswith(b"hello over TLS\n")


def read_until(pipe: IO[bytes], wanted: bytes, timeout: float) -> bytes:
    """What ``pipe`` gives until it ends with ``wanted`` (AssertionError at
    EOF, or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    seen = b""
    while not seen.endswith(wanted):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([pipe], [], [], max(left, 0))
        assert ready, f"no {wanted!r} after {timeout} s: {seen!r}"
        chunk = os.read(pipe.fileno(), 65536)
        assert chunk, f"EOF before {wanted!r}: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize("args", [[], ["c.pem", "k.pem", "0"], ["c.pem", "k.pem", "x"]])
def test_tls_echo_refuses_a_bad_command_line(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(TLS_ECHO), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: tls_echo.py [-h] certfile keyfile [port]")


def test_tls_echo_reports_a_certificate_it_cannot_load(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    for cert, key in (
        (tmp_path / "missing.pem", tls_files.key),
        (tls_files.key, tls_files.key),
    ):
        result = subprocess.run(
            [sys.executable, str(TLS_ECHO), str(cert), str(key)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert result.stderr.startswith("Couldn't load the certificate:")


def test_tls_echo_parses_the_port() -> None:
    tls_echo = load_echo(TLS_ECHO)
    assert tls_echo.parse_args(["c", "k"]).port == 9876
    assert tls_echo.parse_args(["c", "k", "65535"]).port == 65535


def test_every_example_is_listed_in_the_readme_and_run_by_a_test() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    examples = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert "tls_echo.py" in examples
    for name in examples:
        assert f"`examples/{name}`" in readme, name
        assert f'"{name}"' in tests, name  # the path a test runs
