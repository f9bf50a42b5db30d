"""hand_off() and notify_ready(): zero-downtime restart, under real load."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from benchmarks.pyservers import EchoProtocol
from tests.conftest import recv_exactly
from trio_evlisten import Flag, hand_off, notify_ready, open_listener

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "restart_server.py"

# A successor that says READY=1 and reports what it was given (before and
# after activation_sockets()). With "serve-one" it then answers
# one connection on its first socket with its pid, and exits.
REPORTER = """
import json, os, socket, stat, sys
from trio_evlisten import activation_sockets, notify_ready

env = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
notify = os.environ.get("NOTIFY_SOCKET")
socket_fds = {}
for name in os.listdir("/proc/self/fd"):
    fd = int(name)
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            socket_fds[fd] = os.get_inheritable(fd)
    except OSError:
        pass  # the fd listdir used, closed by now
found = activation_sockets()
notify_ready()
report = {
    "pid": os.getpid(),
    "env": env,
    "notify": notify,
    "socket_fds": sorted(socket_fds.items()),
    "sockets": {
        name: [[s.fileno(), s.getsockname(), os.get_inheritable(s.fileno())]
               for s in socks]
        for name, socks in found.items()
    },
    "left": sorted(k for k in os.environ if k.startswith(("LISTEN_", "NOTIFY_"))),
}
print(json.dumps(report), flush=True)
if sys.argv[1:] == ["serve-one"]:
    sock = next(iter(found.values()))[0]
    sock.setblocking(True)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(str(os.getpid()).encode())
"""


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


@pytest.fixture
def reporter(tmp_path: Path) -> Path:
    path = tmp_path / "reporter.py"
    path.write_text(REPORTER)
    return path


class Lines:
    """Lines from a process's stdout pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = b""

    async def next(self) -> str:
        """The next line, or ``""`` at EOF."""
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                rest, self._buf = self._buf, b""
                return rest.decode()
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode() + "\n"


async def _report(proc: trio.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await Lines(proc.stdout).next()
    assert line, "the successor exited without a report"
    report: dict[str, Any] = json.loads(line)
    return report


async def _reap(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for init to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family)
    sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    sock.listen()
    return sock


# ----------------------------------------------------------------------
# The restart, under load: the example, SIGHUP, clients all along


@pytest.fixture
def no_stray_pids() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end if still running (successors are not our children)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_sighup_restart_refuses_and_resets_nothing(
    no_stray_pids: list[int],
) -> None:
    clients = 8
    served: collections.Counter[int] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    stop = trio.Event()
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLE), "0"], stdout=subprocess.PIPE, env=_env()
    )
    no_stray_pids.append(proc.pid)
    try:
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        with trio.fail_after(20):
            first = await lines.next()
            old = proc.pid
            prefix = f"pid {old} listening on 127.0.0.1:"
            assert first.startswith(prefix), first
            port = int(first[len(prefix) :])

            async def client(i: int) -> None:
                nonlocal slowest
                n = 0
                while not stop.is_set():
                    n += 1
                    line = f"client {i} request {n}\n".encode()
                    start = trio.current_time()
                    try:
                        async with await trio.open_tcp_stream(
                            "127.0.0.1", port
                        ) as stream:
                            await stream.send_all(line)
                            reply = await _read_line(stream)
                    except (OSError, trio.BrokenResourceError) as exc:
                        failures[f"{type(exc).__name__}: {exc}"] += 1
                        continue
                    slowest = max(slowest, trio.current_time() - start)
                    pid, _, echoed = reply.partition(b": ")
                    if echoed != line or not pid.isdigit():
                        failures[f"bad reply {reply!r} to {line!r}"] += 1
                        continue
                    served[int(pid)] += 1
                    _check_goal()

            goal: list[tuple[int, int, trio.Event]] = []

            async def until_served(pid: int, count: int) -> None:
                reached = trio.Event()
                goal[:] = [(pid, count, reached)]
                _check_goal()
                await reached.wait()

            def _check_goal() -> None:
                if goal and served[goal[0][0]] >= goal[0][1]:
                    goal.pop()[2].set()

            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, i)
                await until_served(old, 100)
                os.kill(old, signal.SIGHUP)
                # The successor's line and the old one's come through the
                # same pipe: the successor inherited our stdout.
                got = [await lines.next() for _ in range(3)]
                new_line = next(x for x in got if "listening" in x)
                new = int(new_line.split()[1])
                no_stray_pids.append(new)
                assert sorted(got) == sorted(
                    [
                        f"pid {new} listening on 127.0.0.1:{port}\n",
                        f"pid {old} handed off to pid {new}; draining\n",
                        f"pid {old} exited\n",
                    ]
                )
                assert await proc.wait() == 0  # drained and exited on its own
                after_exit = served[new]
                await until_served(new, after_exit + 100)
                stop.set()
            assert new != old
            # Stop the successor as an operator would, and see it exit.
            os.kill(new, signal.SIGTERM)
            assert await lines.next() == f"pid {new} exited\n"
            assert await lines.next() == ""  # EOF: its stdout is closed
    finally:
        await _reap(proc)
    assert dict(failures) == {}
    assert set(served) == {old, new}
    assert served[old] >= 100
    assert served[new] >= after_exit + 100
    # Nobody waited long: the socket was accepted on all along.
    assert slowest < 2.0, slowest
    print(f"served {dict(served)}, slowest {slowest * 1000:.1f} ms")


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionResetError(f"EOF after {buf!r}")
        buf += chunk
    return buf


# ----------------------------------------------------------------------
# What the successor gets


async def test_successor_gets_fds_3_up_and_its_own_listen_pid(
    reporter: Path, tmp_path: Path
) -> None:
    web4, web6 = _listening(), _listening(socket.AF_INET6)
    admin = socket.socket(socket.AF_UNIX)
    unrelated = _listening()  # open here, must not reach the successor
    with web4, web6, admin, unrelated, trio.fail_after(10):
        admin.bind(str(tmp_path / "admin.sock"))
        admin.listen()
        proc = await hand_off(
            {"web": [web4, web6], "admin": admin},
            [sys.executable, str(reporter)],
            env=_env(),
            stdout=subprocess.PIPE,
        )
        try:
            report = await _report(proc)
            assert await proc.wait() == 0
        finally:
            await _reap(proc)
        assert report["pid"] == proc.pid
        assert report["env"] == {
            "LISTEN_PID": str(proc.pid),
            "LISTEN_FDS": "3",
            "LISTEN_FDNAMES": "web:web:admin",
        }
        # Exactly fds 3, 4, 5 are sockets, inheritable as systemd leaves
        # them (activation_sockets() then makes them close-on-exec).
        assert report["socket_fds"] == [[3, True], [4, True], [5, True]]
        assert report["sockets"] == {
            "web": [
                [3, list(web4.getsockname()), False],
                [4, list(web6.getsockname()), False],
            ],
            "admin": [[5, str(tmp_path / "admin.sock"), False]],
        }
        assert report["left"] == []  # LISTEN_* and NOTIFY_SOCKET unset
        # The private notify socket, and its directory, are gone.
        notify = Path(report["notify"])
        assert notify.name == "notify"
        assert not notify.parent.exists()
        # Ours are still open and listening.
        for s in (web4, web6, admin):
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


async def test_fds_already_on_the_target_numbers_are_moved_right(
    reporter: Path, tmp_path: Path
) -> None:
    # In a fresh process the first sockets are fds 3 and 4; pass them
    # swapped, so the child's moves overlap: 4 -> 3 and 3 -> 4.
    parent = tmp_path / "parent.py"
    parent.write_text(
        textwrap.dedent(f"""
        import socket, sys, trio
        from trio_evlisten import hand_off
        a, b = socket.socket(), socket.socket()
        assert (a.fileno(), b.fileno()) == (3, 4), (a.fileno(), b.fileno())
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        print(a.getsockname()[1], b.getsockname()[1], flush=True)
        async def main():
            cmd = [sys.executable, {str(reporter)!r}]
            proc = await hand_off({{"b": b, "a": a}}, cmd)
            sys.exit(await proc.wait())
        trio.run(main)
        """)
    )
    with trio.fail_after(10):
        result = await trio.run_process(
            [sys.executable, str(parent)], capture_stdout=True, env=_env()
        )
    ports_line, report_line = result.stdout.decode().splitlines()
    port_a, port_b = map(int, ports_line.split())
    report = json.loads(report_line)
    assert report["env"]["LISTEN_FDNAMES"] == "b:a"
    assert report["socket_fds"] == [[3, True], [4, True]]
    assert report["sockets"] == {
        "b": [[3, ["127.0.0.1", port_b], False]],
        "a": [[4, ["127.0.0.1", port_a], False]],
    }


async def test_without_wait_ready(reporter: Path) -> None:
    with _listening() as web, trio.fail_after(10):
        proc = await hand_off(
            {"web": web},
            [sys.executable, str(reporter)],
            env=_env(),
            wait_ready=False,
            stdout=subprocess.PIPE,
        )
        try:
            report = await _report(proc)
            assert await proc.wait() == 0
        finally:
            await _reap(proc)
    assert report["notify"] is None
    assert report["env"]["LISTEN_PID"] == str(proc.pid)


async def test_a_unix_listener_keeps_its_path_for_the_successor(
    reporter: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "app.sock")
    with trio.fail_after(10):
        async with open_listener(
            _never_called, address=path, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            proc = await hand_off(
                {"app": listener},
                [sys.executable, str(reporter), "serve-one"],
                env=_env(),
                stdout=subprocess.PIPE,
            )
        try:
            # Closed with CLOSE_ON_FREE, which unlinks a path it bound: not
            # this one, which the successor serves now.
            assert listener.fd == -1
            assert await trio.Path(path).exists()
            report = await _report(proc)
            client = trio.socket.socket(socket.AF_UNIX)
            with client:
                await client.connect(path)
                assert await client.recv(100) == str(proc.pid).encode()
            assert await proc.wait() == 0
        finally:
            await _reap(proc)
    assert report["sockets"] == {"app": [[3, path, False]]}


async def _never_called(*args: object) -> None:
    raise AssertionError("the old process accepted a connection")


async def test_queued_connections_go_to_the_successor(reporter: Path) -> None:
    # A connection waiting in the queue when the old process closes its fd
    # (CLOSE_ON_FREE) is accepted by the successor, not reset.
    with trio.fail_after(10):
        async with open_listener(
            _never_called, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            listener.disable()  # the old one accepts nothing, so it queues
            proc = await hand_off(
                {"web": listener},
                [sys.executable, str(reporter), "serve-one"],
                env=_env(),
                stdout=subprocess.PIPE,
            )
            client = await trio.open_tcp_stream("127.0.0.1", listener.port)
        try:
            async with client:
                assert listener.fd == -1
                report = await _report(proc)
                assert await recv_exactly(client, 10) == str(proc.pid).encode()
                assert await proc.wait() == 0
        finally:
            await _reap(proc)
    assert report["sockets"]["web"][0][0] == 3


async def test_a_protocol_mode_listener_is_handed_off(reporter: Path) -> None:
    # The engine's connections stay with the old process and are served to
    # their end; new ones go to the successor.
    with trio.fail_after(10):
        async with open_listener(
            address=("127.0.0.1", 0), protocol=EchoProtocol, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            old = await trio.open_tcp_stream("127.0.0.1", listener.port)
            await old.send_all(b"before")
            assert await recv_exactly(old, 6) == b"before"
            listener.disable()
            proc = await hand_off(
                {"web": listener},
                [sys.executable, str(reporter), "serve-one"],
                env=_env(),
                stdout=subprocess.PIPE,
            )
            client = await trio.open_tcp_stream("127.0.0.1", listener.port)
            await old.send_all(b"after")
            assert await recv_exactly(old, 5) == b"after"
            await old.send_eof()
            assert await old.receive_some() == b""
        try:
            await old.aclose()
            async with client:
                assert listener.fd == -1
                assert listener.statistics().active == 0
                report = await _report(proc)
                assert await recv_exactly(client, 10) == str(proc.pid).encode()
                assert await proc.wait() == 0
        finally:
            await _reap(proc)
    assert report["sockets"]["web"][0][0] == 3


# ----------------------------------------------------------------------
# When the successor does not come up


async def test_a_successor_that_dies_first(tmp_path: Path) -> None:
    with _listening() as web, trio.fail_after(10):
        with pytest.raises(RuntimeError, match=r"exited with status 3 before it was"):
            await hand_off({"web": web}, ["sh", "-c", "exit 3"], env=_env())
        assert web.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


@pytest.mark.parametrize("how", ["ready_timeout", "cancelled"])
async def test_a_successor_never_ready_is_killed(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "pid"
    command = ["sh", "-c", f'echo "$LISTEN_PID" > {pidfile}; exec sleep 30']
    with _listening() as web, trio.fail_after(10):
        if how == "ready_timeout":
            with pytest.raises(trio.TooSlowError, match=r"ready_timeout=0\.5 s"):
                await hand_off({"web": web}, command, env=_env(), ready_timeout=0.5)
        else:
            with trio.move_on_after(0.5) as scope:
                await hand_off({"web": web}, command, env=_env())
            assert scope.cancelled_caught
        pid = int(pidfile.read_text())
        # Killed and reaped (our child, so not even a zombie is left).
        assert not await trio.Path(f"/proc/{pid}").exists()


async def test_argument_errors(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "pass"]
    with _listening() as web:
        with pytest.raises(ValueError, match="sockets is empty"):
            await hand_off({}, cmd)
        for bad in ["a:b", "", "x" * 256, "tab\there", "é"]:
            with pytest.raises(ValueError, match=r"not a valid FileDescriptorName"):
                await hand_off({bad: web}, cmd)
        with pytest.raises(ValueError, match=r"sockets\['web'\] is an empty list"):
            await hand_off({"web": []}, cmd)
        with pytest.raises(TypeError, match=r"ConnListeners or sockets, not 3"):
            await hand_off({"web": [3]}, cmd)  # type: ignore[list-item]
        with pytest.raises(ValueError, match="command must name a program"):
            await hand_off({"web": web}, [])
        with pytest.raises(FileNotFoundError, match="no-such-program-here"):
            await hand_off({"web": web}, ["no-such-program-here"])
        with pytest.raises(FileNotFoundError, match="is not an executable file"):
            await hand_off({"web": web}, [str(tmp_path / "missing")])
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match=r"sockets\['web'\]: .* is closed"):
        await hand_off({"web": closed}, cmd)
    with socket.socket() as unlistened, socket.socket(type=socket.SOCK_DGRAM) as udp:
        unlistened.bind(("127.0.0.1", 0))
        udp.bind(("127.0.0.1", 0))
        for sock in (unlistened, udp):
            with pytest.raises(ValueError, match="must be a listening stream socket"):
                await hand_off({"web": sock}, cmd)
    async with open_listener(
        _never_called, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
    ) as listener:
        pass
    with pytest.raises(ValueError, match=r"sockets\['web'\]: .* is closed"):
        await hand_off({"web": listener}, cmd)


# ----------------------------------------------------------------------
# notify_ready(), in this process


def test_notify_ready_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_ready() is False


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready_sends_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, abstract: bool
) -> None:
    name = f"trio-evlisten-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name if abstract else str(tmp_path / "n"))
        server.settimeout(5)
        monkeypatch.setenv(
            "NOTIFY_SOCKET", "@" + name if abstract else server.getsockname()
        )
        assert notify_ready() is True
        assert server.recv(100) == b"READY=1"
    assert "NOTIFY_SOCKET" not in os.environ


def test_notify_ready_keeps_the_variable_if_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "n"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
        assert notify_ready(unset_environment=False) is True
        assert os.environ["NOTIFY_SOCKET"] == str(tmp_path / "n")


def test_notify_ready_rejects_other_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with pytest.raises(ValueError, match="not NOTIFY_SOCKET='vsock:2:1234'"):
        notify_ready()
    assert "NOTIFY_SOCKET" not in os.environ
