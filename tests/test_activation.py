"""activation_sockets(): systemd socket activation, for real and as systemd does it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.conftest import recv_exactly
from trio_evlisten import activation_sockets

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

# The child: report what activation_sockets() found, then serve one echo
# connection on the first socket named argv[1] with open_listener(sock=...).
CHILD = """
import json, os, sys
import trio
from trio_evlisten import Flag, activation_sockets, open_listener

try:
    found = activation_sockets()
except ValueError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(0)
report = {
    "pid": os.getpid(),
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "sockets": {
        name: [
            [s.fileno(), s.family.name, s.getsockname(), os.get_inheritable(s.fileno())]
            for s in socks
        ]
        for name, socks in found.items()
    },
    "second_call": list(activation_sockets()),
}
print(json.dumps(report), flush=True)
if len(sys.argv) < 2:
    sys.exit(0)

async def main():
    done = trio.Event()

    async def echo(listener, conn, addr):
        async for data in conn:
            await conn.send_all(data)
        done.set()

    async with open_listener(
        echo, sock=found[sys.argv[1]][0], backlog=0, flags=Flag.CLOSE_ON_FREE
    ):
        await done.wait()

trio.run(main)
"""


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    # The child imports trio_evlisten from this checkout, wherever it runs.
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


async def _read_report(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(4096)
        assert chunk, f"child exited without a report: {line!r}"
        line += chunk
    report: dict[str, Any] = json.loads(line)
    return report


async def _echo_through(port: int, data: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        await client.send_all(data)
        back = await recv_exactly(client, len(data))
        await client.send_eof()
        return back


@asynccontextmanager
async def reaped(proc: trio.Process) -> AsyncIterator[trio.Process]:
    """Kill ``proc`` if the block fails; always reap it and close its pipe."""
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package systemd)",
)
async def test_real_systemd_socket_activate(child: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    port = _free_port()
    cmd = [tool, f"--listen=127.0.0.1:{port}", "--fdname=web"]
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [*cmd, sys.executable, str(child), "web"],
            stdout=subprocess.PIPE,
            env=_env(),
        )
        async with reaped(proc):
            # It binds, listens, and starts the child on the first
            # connection: retry until it listens (a bounded poll, as it is
            # another process).
            for _ in range(250):
                try:
                    back = await _echo_through(port, b"activated!")
                    break
                except OSError:
                    await trio.sleep(0.02)
            else:
                raise AssertionError(f"{cmd} never listened on port {port}")
            report = await _read_report(proc)
            assert await proc.wait() == 0
    assert back == b"activated!"
    assert report["sockets"] == {"web": [[3, "AF_INET", ["127.0.0.1", port], False]]}
    assert report["env_left"] == []
    assert report["second_call"] == []


async def _spawn_like_systemd(
    child: Path, fds: list[int], names: str | None, *args: str
) -> trio.Process:
    """Start the child with ``fds`` as 3, 4, ... and the LISTEN_* variables.

    LISTEN_PID must be the child's own pid, known only once it runs: the
    shell sets it to its ``$$`` and then execs Python in the same process.
    """
    assert all(fd > 2 + len(fds) for fd in fds)  # dup2 must not clobber one
    moves = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(fds))
    closes = " ".join(f"{fd}<&-" for fd in fds)
    script = f'exec {moves} {closes}; LISTEN_PID=$$ exec "$0" "$@"'
    # bash, not sh: dash takes only one-digit fds in redirections.
    env = _env()
    env["LISTEN_FDS"] = str(len(fds))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return await trio.lowlevel.open_process(
        ["bash", "-c", script, sys.executable, str(child), *args],
        stdout=subprocess.PIPE,
        env=env,
        pass_fds=fds,
    )


async def test_fds_passed_as_systemd_does(child: Path, tmp_path: Path) -> None:
    web4 = socket.socket()
    web6 = socket.socket(socket.AF_INET6)
    admin = socket.socket(socket.AF_UNIX)
    with web4, web6, admin:
        web4.bind(("127.0.0.1", 0))
        web6.bind(("::1", 0))
        admin.bind(str(tmp_path / "admin.sock"))
        for s in (web4, web6, admin):
            s.listen()
        port, port6 = web4.getsockname()[1], web6.getsockname()[1]
        with trio.fail_after(20):
            proc = await _spawn_like_systemd(
                child,
                [web4.fileno(), web6.fileno(), admin.fileno()],
                "web:web:admin",
                "web",
            )
            async with reaped(proc):
                report = await _read_report(proc)
                assert await _echo_through(port, b"hello fd 3") == b"hello fd 3"
                assert await proc.wait() == 0
    assert report["sockets"] == {
        "web": [
            [3, "AF_INET", ["127.0.0.1", port], False],
            [4, "AF_INET6", ["::1", port6, 0, 0], False],
        ],
        "admin": [[5, "AF_UNIX", str(tmp_path / "admin.sock"), False]],
    }
    assert report["env_left"] == []
    assert report["second_call"] == []


async def test_unnamed_fds_are_unknown(child: Path) -> None:
    with socket.socket() as web, trio.fail_after(20):
        web.bind(("127.0.0.1", 0))
        web.listen()
        proc = await _spawn_like_systemd(child, [web.fileno()], None)
        async with reaped(proc):
            report = await _read_report(proc)
            assert await proc.wait() == 0
    assert list(report["sockets"]) == ["unknown"]
    assert report["sockets"]["unknown"][0][:2] == [3, "AF_INET"]


async def test_a_passed_fd_that_is_not_a_socket(child: Path) -> None:
    r, w = os.pipe()
    try:
        with trio.fail_after(20):
            proc = await _spawn_like_systemd(child, [r], "fifo")
            async with reaped(proc):
                report = await _read_report(proc)
                assert await proc.wait() == 0
    finally:
        os.close(r)
        os.close(w)
    assert "fd 3 (LISTEN_FDNAMES name 'fifo')" in report["error"]
    assert "not an open socket" in report["error"]


# In this process, only paths that never touch fds 3.. (pytest's own).


@pytest.fixture
def listen_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_not_activated(listen_env: pytest.MonkeyPatch) -> None:
    assert activation_sockets() == {}
    listen_env.setenv("LISTEN_FDS", "2")  # no LISTEN_PID: not for us
    assert activation_sockets() == {}
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize("unset", [True, False])
def test_variables_for_another_process(
    listen_env: pytest.MonkeyPatch, unset: bool
) -> None:
    listen_env.setenv("LISTEN_PID", str(os.getppid()))
    listen_env.setenv("LISTEN_FDS", "1")
    listen_env.setenv("LISTEN_FDNAMES", "web")
    assert activation_sockets(unset_environment=unset) == {}
    assert ("LISTEN_FDS" in os.environ) is not unset
    assert ("LISTEN_PID" in os.environ) is not unset
    assert ("LISTEN_FDNAMES" in os.environ) is not unset


def test_zero_fds(listen_env: pytest.MonkeyPatch) -> None:
    listen_env.setenv("LISTEN_PID", str(os.getpid()))
    listen_env.setenv("LISTEN_FDS", "0")
    assert activation_sockets() == {}


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        (
            {"LISTEN_PID": "12a"},
            "LISTEN_PID must be a decimal number, not LISTEN_PID='12a'",
        ),
        ({"LISTEN_PID": " 1"}, "LISTEN_PID='  ?1'"),
        (
            {"LISTEN_FDS": "-1"},
            "LISTEN_FDS must be a decimal number, not LISTEN_FDS='-1'",
        ),
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two'"),
        ({"LISTEN_FDS": "1_0"}, "LISTEN_FDS='1_0'"),
        (
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
            "LISTEN_FDNAMES='web' names 1 fds, but LISTEN_FDS='2' passes 2",
        ),
        (
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES='a:b' names 2 fds",
        ),
    ],
)
def test_malformed_variables(
    listen_env: pytest.MonkeyPatch, variables: dict[str, str], match: str
) -> None:
    listen_env.setenv("LISTEN_PID", str(os.getpid()))
    listen_env.setenv("LISTEN_FDS", "1")
    for name, value in variables.items():
        listen_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        activation_sockets()
    # Unset even on error, as sd_listen_fds(3) does.
    assert not any(k.startswith("LISTEN_") for k in os.environ)
