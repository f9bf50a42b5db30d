"""``python -m trio_evlisten echo``: the command line, run for real.

Most tests start the CLI as a subprocess on 127.0.0.1 and talk to it with
blocking stdlib sockets that carry timeouts; argument parsing and the
accept-error path are checked in-process, where that is cheaper.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_evlisten
from trio_evlisten import Flag
from trio_evlisten._cli import (
    PROG,
    EchoOptions,
    format_address,
    main,
    parse_args,
    serve_echo,
)
from trio_evlisten.testing import ScriptedSocket

if TYPE_CHECKING:
    from collections.abc import Iterator

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
LISTENING = re.compile(r"Echo server listening on (?P<host>.+):(?P<port>\d+)")
TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_evlisten", *args]


class Server:
    """A running ``python -m trio_evlisten echo`` and what it printed first."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pending = b""  # stdout read past the first line
        self.first_line = self._read_line()
        match = LISTENING.fullmatch(self.first_line)
        assert match is not None, f"unexpected first line {self.first_line!r}"
        self.host = match["host"]
        self.port = int(match["port"])

    def _read_line(self) -> str:
        """The first stdout line, read from the fd with a deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line within {TIMEOUT} s, got {buf!r}"
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                assert chunk, f"stdout closed before a line, got {buf!r}"
                buf += chunk
        line, _, self.pending = buf.partition(b"\n")
        return line.decode()

    def stop(self, signum: int = signal.SIGINT) -> tuple[int, str, str]:
        """Send ``signum``; return the exit status, the rest of stdout, stderr."""
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, (self.pending + out).decode(), err.decode()


@contextlib.contextmanager
def running(*args: str) -> Iterator[Server]:
    """The echo CLI with ``args``, killed afterwards if still running."""
    proc = subprocess.Popen(
        command("echo", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield Server(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=TIMEOUT)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def error_lines(stderr: str) -> list[str]:
    """The lines of argparse's (or our) output that state an error."""
    return [line for line in stderr.splitlines() if "error:" in line]


# --- the server, as a subprocess --------------------------------------------


def test_prints_its_address_and_echoes_a_real_client() -> None:
    port = free_port()
    payload = bytes(range(256)) * 400  # 100 KiB, every byte value
    with running("--host", "127.0.0.1", "--port", str(port)) as server:
        assert server.first_line == f"Echo server listening on 127.0.0.1:{port}"
        with connect(port) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(client, len(payload) + 1) == payload  # then EOF
        status, out, err = server.stop()
    assert status == 0
    assert out == (
        "Stopped (SIGINT): accepted=1 active=0 errors=0 retried=0 handler_errors=0\n"
    )
    assert err == ""


def test_sigint_exits_0_with_a_summary_and_no_traceback() -> None:
    with running("--host", "127.0.0.1", "--port", "0") as server:
        clients = [connect(server.port) for _ in range(3)]
        try:
            for i, client in enumerate(clients):
                client.sendall(b"client %d" % i)
                assert recv_exactly(client, 8) == b"client %d" % i
            # All three handlers are running (each echoed), so the summary
            # counts them as active: Ctrl-C cut them.
            status, out, err = server.stop(signal.SIGINT)
            for client in clients:
                assert client.recv(1) == b""  # closed by the server as it stopped
        finally:
            for client in clients:
                client.close()
    assert status == 0
    assert out == (
        "Stopped (SIGINT): accepted=3 active=3 errors=0 retried=0 handler_errors=0\n"
    )
    assert err == ""


def test_sigterm_stops_it_like_ctrl_c() -> None:
    with running("--host", "127.0.0.1", "--port", "0") as server:
        status, out, err = server.stop(signal.SIGTERM)
    assert status == 0
    assert out == (
        "Stopped (SIGTERM): accepted=0 active=0 errors=0 retried=0 handler_errors=0\n"
    )
    assert err == ""


def test_ipv6_address_is_printed_in_brackets() -> None:
    try:
        free_port("::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with running("--host", "::1", "--port", "0", "--flags") as server:
        assert server.host == "[::1]"
        with connect(server.port, "::1") as client:
            client.sendall(b"six")
            assert recv_exactly(client, 3) == b"six"
        status, out, _ = server.stop()
    assert status == 0
    assert "accepted=1" in out


@pytest.mark.slow
def test_max_connections_really_caps() -> None:
    with running(
        "--host", "127.0.0.1", "--port", "0", "--max-connections", "1"
    ) as server:
        with connect(server.port) as first:
            first.sendall(b"one")
            assert recv_exactly(first, 3) == b"one"
            # The kernel completes the second handshake (backlog), but the
            # listener does not accept it while the first is served.
            second = connect(server.port)
            with second:
                second.sendall(b"two")
                second.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    second.recv(3)
                first.close()
                second.settimeout(TIMEOUT)
                assert recv_exactly(second, 3) == b"two"
        status, out, _ = server.stop()
    assert status == 0
    assert "accepted=2 " in out


def test_help_mentions_every_flag() -> None:
    result = subprocess.run(
        command("echo", "--help"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: {PROG} echo ")
    assert f"{PROG} echo --port 9999" in result.stdout  # the example
    for flag in Flag:
        assert re.search(rf"^  {flag.name} +\S", result.stdout, re.MULTILINE), flag.name
    for option in ("--host", "--port", "--flags", "--max-connections", "--backlog"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--port", "http"],
            "argument --port: port must be an integer from 0 to 65535, not 'http'",
        ),
        (
            ["--flags", "reuseable", "no_such_flag"],
            "argument --flags: unknown flag 'no_such_flag'",
        ),
        (
            ["--max-connections", "0"],
            "argument --max-connections: max_connections must be None or >= 1, not 0",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(
    args: list[str], message: str
) -> None:
    result = subprocess.run(
        command("echo", *args), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2
    assert result.stdout == ""
    # One line, no usage block: what is wrong, and where to look.
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{PROG} echo: error: {message}")
    assert line.endswith(f"(see {PROG} echo --help)")


def test_port_in_use_exits_1_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            command("echo", "--host", "127.0.0.1", "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    # The address is named once (by the library), with what holds it.
    assert result.stderr == (
        f"{PROG} echo: error: cannot listen on 127.0.0.1:{port}: "
        "Address already in use; another socket holds it: a server listening "
        "there, or connections of one that stopped (TIME_WAIT, a minute or so); "
        "stop that server or wait, or choose another port (port 0 lets the "
        "system pick a free one)\n"
    )


# --- in-process --------------------------------------------------------------


def test_defaults() -> None:
    assert parse_args(["echo"]) == EchoOptions(
        host="0.0.0.0",
        port=9876,
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=-1,
        listener={},
    )


def test_every_option_is_parsed() -> None:
    options = parse_args(
        [
            "echo",
            "--host",
            "::1",
            "--port",
            "0",
            "--max-connections",
            "5",
            "--backlog",
            "16",
            "--drain-timeout",
            "2.5",
            "--proxy-protocol",
            "--proxy-trusted",
            "10.0.0.0/8",
            "--proxy-trusted",
            "::1",
            "--proxy-timeout",
            "3",
        ]
    )
    assert options == EchoOptions(
        host="::1",
        port=0,
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        backlog=16,
        listener={
            "max_connections": 5,
            "drain_timeout": 2.5,
            "proxy_protocol": True,
            "proxy_trusted": ["10.0.0.0/8", "::1"],
            "proxy_timeout": 3.0,
        },
    )


def test_flag_names_are_case_insensitive() -> None:
    options = parse_args(
        [
            "echo",
            "--flags",
            "close_on_free",
            "Reuseable",
            "REUSEABLE_PORT",
            "lev_opt_close_on_exec",
            "deferred-accept",
        ]
    )
    assert options.flags == (
        Flag.CLOSE_ON_FREE
        | Flag.REUSEABLE
        | Flag.REUSEABLE_PORT
        | Flag.CLOSE_ON_EXEC
        | Flag.DEFERRED_ACCEPT
    )
    # --flags replaces the defaults; alone it means no flags at all.
    assert parse_args(["echo", "--flags", "threadsafe"]).flags == Flag.THREADSAFE
    assert parse_args(["echo", "--flags"]).flags == Flag(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--port", "65536"], "port must be an integer from 0 to 65535"),
        (["echo", "--port", "-1"], "port must be an integer from 0 to 65535"),
        (
            ["echo", "--flags", "leave_sockets_blocking"],
            "LEAVE_SOCKETS_BLOCKING is refused by the echo server",
        ),
        (["echo", "--flags", "disabled"], "DISABLED is refused by the echo server"),
        (["echo", "--max-connections", "-3"], "max_connections must be None or >= 1"),
        (["echo", "--max-connections", "many"], "expected N, not 'many'"),
        (["echo", "--drain-timeout", "-1"], "drain_timeout must be None or >= 0"),
        (["echo", "--proxy-trusted", "10.0.0.0/33"], "is not a network"),
        (["echo", "--backlog", "0"], "backlog must be -1 (the OS maximum) or >= 1"),
        (["echo", "--backlog", "x"], "backlog must be an integer"),
        (["echo", "--backlog", str(2**31)], "backlog must be -1 (the OS maximum), 0"),
        (["echo", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: COMMAND"),
        (["serve"], "invalid choice: 'serve'"),
    ],
)
def test_bad_arguments_in_process(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = error_lines(err)
    assert message in line


def test_help_and_version_return_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{PROG} {trio_evlisten.__version__}\n"
    assert main(["echo", "--help"]) == 0
    assert "BIND_IPV6ONLY" in capsys.readouterr().out


def test_options_the_listener_refuses_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Valid for argparse, refused by open_listener: one line, no traceback.
    args = ["echo", "--host", "127.0.0.1", "--port", "0", "--flags", "bind_ipv6only"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{PROG} echo: error: Flag.BIND_IPV6ONLY needs an IPv6 address, "
        "not ('127.0.0.1', 0)\n"
    )


def test_format_address() -> None:
    assert format_address(("0.0.0.0", 9876)) == "0.0.0.0:9876"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"
    assert format_address("/run/echo.sock") == "/run/echo.sock"


async def test_accept_error_prints_errno_and_stops(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sock = ScriptedSocket([OSError(errno.EBADF, "Bad file descriptor")])
    port = sock.getsockname()[1]
    status: list[int] = []

    async def serve() -> None:
        status.append(await serve_echo(EchoOptions(), sock=sock))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                # Queued in the backlog; the scripted accept() then fails.
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.aclose()
    finally:
        sock.close()  # a no-op once CLOSE_ON_FREE closed it
    assert status == [1]
    out, err = capsys.readouterr()
    assert out == (
        f"Echo server listening on 127.0.0.1:{port}\n"
        "Stopped (accept error): accepted=0 active=0 errors=1 retried=0 "
        "handler_errors=0\n"
    )
    assert err == (
        f"Got an error {errno.EBADF} (Bad file descriptor) on the listener. "
        "Shutting down.\n"
    )


@pytest.mark.parametrize("flags", [Flag(0), Flag.CLOSE_ON_FREE])
async def test_sigint_in_process_closes_the_socket_it_bound(
    flags: Flag, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without CLOSE_ON_FREE the listener leaves its socket open for the
    # caller; the server must still close it (the fd-leak fixture checks).
    options = EchoOptions(host="127.0.0.1", port=0, flags=flags)
    status: list[int] = []

    async def serve() -> None:
        status.append(await serve_echo(options))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            # Parked on its signal receiver only once it printed this line,
            # so the SIGINT below cannot reach pytest as KeyboardInterrupt.
            out = capsys.readouterr().out
            assert LISTENING.fullmatch(out.strip()), out
            os.kill(os.getpid(), signal.SIGINT)
    assert status == [0]
    assert capsys.readouterr().out == (
        "Stopped (SIGINT): accepted=0 active=0 errors=0 retried=0 handler_errors=0\n"
    )


# --- packaging ---------------------------------------------------------------


def test_version_matches_the_package_metadata() -> None:
    assert importlib.metadata.version("trio_evlisten") == trio_evlisten.__version__


def test_version_matches_pyproject() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python >= 3.11")
    else:
        import tomllib

        with PYPROJECT.open("rb") as f:
            project = tomllib.load(f)["project"]
        assert project["version"] == trio_evlisten.__version__


def test_the_cli_is_not_exported() -> None:
    assert not any("cli" in name.lower() for name in trio_evlisten.__all__)
    assert "main" not in trio_evlisten.__all__
