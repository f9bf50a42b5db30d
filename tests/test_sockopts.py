"""What each socket option sets, and what a socket refuses: keep-alive, Unix modes.

Every option is read back from the socket (or from one it accepted), and
every refusal names the bad value and what would be right.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten._socket import KEEPALIVE_PROBES

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE


def keepalive_of(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


class Capture:
    """A handler that reports the keep-alive options of its accepted socket."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, int]] = []

    async def __call__(self, listener: ConnListener, conn: Any, addr: Any) -> None:
        self.seen.append(keepalive_of(conn.socket))
        await conn.send_all(b"k")


async def accepted_keepalive(**options: Any) -> tuple[int, int, int, int]:
    handler = Capture()
    with trio.fail_after(5):
        async with (
            open_listener(handler, address=LOCAL, flags=FREE, **options) as lst,
            await trio.open_tcp_stream(*lst.sockname) as client,
        ):
            assert await recv_exactly(client, 1) == b"k"
    [seen] = handler.seen
    return seen


async def test_tcp_keepalive_is_on_by_default_as_in_libevent_2_2() -> None:
    # libevent's evutil_set_tcp_keepalive(fd, 1, 300): idle 300 s, then a
    # probe every 100 s, 3 of them.
    assert await accepted_keepalive() == (1, 300, 100, KEEPALIVE_PROBES)


async def test_keepalive_takes_the_idle_seconds() -> None:
    assert await accepted_keepalive(keepalive=60) == (1, 60, 20, 3)
    assert await accepted_keepalive(keepalive=2) == (1, 2, 1, 3)


async def test_keepalive_none_turns_it_off() -> None:
    assert (await accepted_keepalive(keepalive=None))[0] == 0


async def test_a_wrapped_socket_keeps_its_own_keepalive_unless_asked() -> None:
    with socket.socket() as sock:
        sock.bind(LOCAL)
        async with open_listener(None, sock=sock):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    with socket.socket() as sock:
        sock.bind(LOCAL)
        async with open_listener(None, sock=sock, keepalive=30):
            assert keepalive_of(sock) == (1, 30, 10, 3)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0, ValueError, r"keepalive must be None or 1\.\.32767 seconds, not 0"),
        (40000, ValueError, "not 40000"),
        (1.5, TypeError, r"keepalive must be None or whole seconds \(an int\)"),
        (True, TypeError, "not True"),
    ],
)
async def test_bad_keepalive_is_refused(
    bad: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with open_listener(None, address=LOCAL, keepalive=bad):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_keepalive_on_a_unix_socket_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="TCP keep-alive, which a Unix socket"):
        async with open_listener(None, address=tmp_path / "k.sock", keepalive=60):
            pass  # pragma: no cover
    assert not (tmp_path / "k.sock").exists()


# ----------------------------------------------------------------------
# Unix sockets


async def test_unix_mode_is_set_before_listen(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.sock"
    old = os.umask(0)
    try:
        async with open_listener(
            echo_handler, address=path, flags=FREE, unix_mode=0o600
        ) as lst:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            async with await trio.open_unix_socket(str(path)) as client:
                await client.send_all(b"m")
                assert await recv_exactly(client, 1) == b"m"
            assert lst.sockname == str(path)
        # Without it, the umask decides (0o777 at umask 0: anyone may connect).
        async with open_listener(echo_handler, address=path, flags=FREE):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    finally:
        os.umask(old)


@pytest.fixture
def public_dir() -> Iterator[pathlib.Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="trio-evlisten-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


NOBODY = 65534
#: A Python that the nobody user may run (the venv's sits under /root).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
CONNECT_AS_NOBODY = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
s.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\\r\\nx")
s.recv(1)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="needs root and /usr/bin/python3 to connect as another user",
)
@pytest.mark.parametrize(("mode", "admitted"), [(0o600, False), (0o666, True)])
async def test_the_unix_mode_decides_who_may_send_a_proxy_header(
    public_dir: pathlib.Path, mode: int, admitted: bool
) -> None:
    """Unix peers are trusted for PROXY headers: the mode decides who they are."""
    assert SYSTEM_PYTHON is not None
    path = public_dir / "p.sock"
    seen: list[object] = []

    async def record(listener: ConnListener, conn: Any, addr: Any) -> None:
        seen.append(addr)
        await conn.send_all(await conn.receive_some())

    with trio.fail_after(10):
        async with open_listener(
            record, address=path, flags=FREE, proxy_protocol=True, unix_mode=mode
        ):
            done = await trio.run_process(
                [SYSTEM_PYTHON, "-I", "-c", CONNECT_AS_NOBODY, str(path)],
                check=False,
                preexec_fn=lambda: os.setuid(NOBODY),
            )
    if admitted:
        assert done.returncode == 0
        assert seen == [("192.0.2.1", 1)]
    else:
        assert done.returncode == 13  # EACCES: refused by the file's mode
        assert seen == []


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0o10000, ValueError, r"unix_mode must be a mode 0o0\.\.0o7777"),
        ("660", TypeError, r"unix_mode must be None or a mode like 0o660"),
    ],
)
async def test_bad_unix_mode_is_refused(
    tmp_path: pathlib.Path, bad: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with open_listener(None, address=tmp_path / "x.sock", unix_mode=bad):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_unix_mode_where_it_cannot_apply_is_refused() -> None:
    with pytest.raises(ValueError, match="unix_mode= is for Unix socket paths"):
        async with open_listener(None, address=LOCAL, unix_mode=0o600):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="abstract name"):
        async with open_listener(None, address="\0trio-evlisten-m", unix_mode=0o600):
            pass  # pragma: no cover
    with socket.socket() as sock:
        sock.bind(LOCAL)
        with pytest.raises(ValueError, match="with sock= the socket is already bound"):
            async with open_listener(None, sock=sock, unix_mode=0o600):
                pass  # pragma: no cover


async def test_reuseable_on_a_unix_socket_is_refused(tmp_path: pathlib.Path) -> None:
    # libevent refuses it as well (#1625); SO_REUSEADDR was silently dropped.
    path = tmp_path / "r.sock"
    with pytest.raises(
        ValueError, match=r"Flag\.REUSEABLE \(SO_REUSEADDR\) is for TCP"
    ):
        async with open_listener(None, address=path, flags=Flag.REUSEABLE):
            pass  # pragma: no cover
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as usock:
        usock.bind(str(path))
        with pytest.raises(ValueError, match=r"Flag\.REUSEABLE"):
            async with open_listener(None, sock=usock, flags=Flag.REUSEABLE):
                pass  # pragma: no cover


async def test_deferred_accept_on_a_unix_socket_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    # It was silently dropped; libevent's bind fails on it (setsockopt
    # TCP_DEFER_ACCEPT on a Unix socket), and it could never apply there.
    path = tmp_path / "d.sock"
    with pytest.raises(ValueError, match=r"Flag\.DEFERRED_ACCEPT is for TCP"):
        async with open_listener(None, address=path, flags=Flag.DEFERRED_ACCEPT):
            pass  # pragma: no cover
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as usock:
        usock.bind(str(path))
        with pytest.raises(ValueError, match=r"Flag\.DEFERRED_ACCEPT"):
            async with open_listener(None, sock=usock, flags=Flag.DEFERRED_ACCEPT):
                pass  # pragma: no cover
        assert usock.fileno() != -1


@pytest.mark.parametrize(
    ("address", "suggestion"),
    [
        ("127.0.0.1:8080", "address=('127.0.0.1', 8080)"),
        ("localhost:80", "address=('localhost', 80)"),
        ("[::1]:9876", "address=('::1', 9876)"),
        (":8080", "address=('', 8080)"),
    ],
)
async def test_a_host_port_string_is_refused_with_the_tuple_to_use(
    address: str, suggestion: str, tmp_path: pathlib.Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"looks like host:port") as info:
        async with open_listener(None, address=address):
            pass  # pragma: no cover
    assert suggestion in str(info.value)
    assert os.listdir(tmp_path) == []  # no socket file was made


async def test_a_path_with_a_colon_is_still_a_path(
    tmp_path: pathlib.Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    async with open_listener(None, address="./127.0.0.1:8080", flags=FREE):
        assert (tmp_path / "127.0.0.1:8080").is_socket()
    async with open_listener(None, address=tmp_path / "a:1", flags=FREE):
        pass


@pytest.mark.parametrize("backlog", [2**31, 10**20])
async def test_a_backlog_listen_cannot_take_is_a_value_error(backlog: int) -> None:
    with pytest.raises(ValueError, match=rf"backlog must be .*not {backlog}"):
        async with open_listener(None, address=LOCAL, backlog=backlog):
            pass  # pragma: no cover
