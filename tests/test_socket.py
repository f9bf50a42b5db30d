"""The listening socket: address forms, sock=, argument checks, backlog, flags.

Every behaviour is read back from the real socket (getsockopt, fcntl, fstat,
TCP_INFO) or seen by a real client, not taken from the listener's word.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import pathlib
import re
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING, NoReturn

import pytest
import trio

import trio_evlisten
from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import open_stream_to

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_evlisten import ConnListener


# ----------------------------------------------------------------------
# Helpers


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(
    not _have_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)"
)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads Linux's TCP_INFO / procfs"
)


def is_nonblocking(fd: int) -> bool:
    """Whether the fd has O_NONBLOCK set, as the kernel sees it."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


# struct tcp_info (linux/tcp.h) starts with eight u8 fields: tcpi_state,
# tcpi_ca_state, tcpi_retransmits, tcpi_probes, tcpi_backoff, tcpi_options,
# the snd/rcv wscale nibbles, and a flags byte; then u32 tcpi_rto, tcpi_ato,
# tcpi_snd_mss, tcpi_rcv_mss, tcpi_unacked, tcpi_sacked. For a listening
# socket the kernel reports the accept queue's length in tcpi_unacked
# (sk_ack_backlog) and its limit, the backlog, in tcpi_sacked
# (sk_max_ack_backlog).
_TCP_INFO_HEAD = struct.Struct("=8B6I")
_TCP_LISTEN = 10  # tcpi_state of a listening socket (TCP_LISTEN)


def tcp_listen_queue(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int]:
    """(current accept-queue length, backlog limit) from TCP_INFO."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    fields = _TCP_INFO_HEAD.unpack_from(raw)
    assert fields[0] == _TCP_LISTEN, f"not a listening socket: {fields}"
    unacked, sacked = fields[8 + 4], fields[8 + 5]
    return unacked, sacked


def somaxconn_backlog() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return min(int(f.read()), 65535)


@pytest.fixture
def bound_socket() -> Iterator[socket.socket]:
    """A bound, not yet listening TCP socket on 127.0.0.1 (closed afterwards)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


@pytest.fixture
def listening_socket(bound_socket: socket.socket) -> socket.socket:
    """A listening (backlog 5) TCP socket on 127.0.0.1 (closed afterwards)."""
    bound_socket.listen(5)
    return bound_socket


async def assert_echoes(listener: ConnListener, data: bytes = b"ping") -> None:
    async with await open_stream_to(listener) as client:
        await client.send_all(data)
        assert await recv_exactly(client, len(data)) == data


def assert_still_open_and_usable(sock: socket.socket) -> None:
    """The caller's socket survived a failed open: open, fd valid, queryable."""
    assert sock.fileno() != -1
    assert fd_is_open(sock.fileno())
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == sock.type


# ----------------------------------------------------------------------
# address=: the forms


async def test_ipv4_address_binds_a_port_and_echoes() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert listener.port != 0
            assert listener.socket.family == socket.AF_INET
            assert listener.sockname == ("127.0.0.1", listener.port)
            assert listener.socket.getsockname() == listener.sockname
            await assert_echoes(listener, b"ipv4")
        assert listener.fd == -1


@pytest.mark.parametrize("host", ["", None])
async def test_empty_host_is_the_ipv4_wildcard(host: str | None) -> None:
    # open_listener's docstring: "" is the IPv4 wildcard ("::" the IPv6 one).
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=(host, 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert listener.socket.family == socket.AF_INET
            assert listener.sockname == ("0.0.0.0", listener.port)
            async with await trio.open_tcp_stream("127.0.0.1", listener.port) as c:
                await c.send_all(b"any")
                assert await recv_exactly(c, 3) == b"any"


@requires_ipv6
@pytest.mark.parametrize("address", [("::1", 0), ("::1", 0, 0, 0)])
async def test_ipv6_address_forms(
    address: tuple[str, int] | tuple[str, int, int, int],
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=address, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert listener.socket.family == socket.AF_INET6
            assert listener.port != 0
            assert listener.sockname[:2] == ("::1", listener.port)
            assert listener.socket.getsockname() == listener.sockname
            await assert_echoes(listener, b"ipv6")
        assert listener.fd == -1


async def test_ipv4_host_in_a_4_tuple_is_a_value_error() -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="IPv6"):
        async with open_listener(echo_handler, address=("127.0.0.1", 0, 0, 0)):
            pytest.fail("the block must not run")  # pragma: no cover


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "PathLike"])
async def test_unix_path_echoes_and_close_on_free_unlinks(
    tmp_path: pathlib.Path, as_path: bool
) -> None:
    path = tmp_path / "l.sock"
    address: str | pathlib.Path = path if as_path else str(path)
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=address, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert listener.socket.family == socket.AF_UNIX
            assert listener.sockname == str(path)
            assert path.is_socket()
            with pytest.raises(AttributeError, match="no port"):
                _ = listener.port
            async with await trio.open_unix_socket(str(path)) as client:
                await client.send_all(b"unix")
                assert await recv_exactly(client, 4) == b"unix"
        assert listener.fd == -1
        assert not path.exists()


async def test_unix_path_without_close_on_free_stays_open(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "k.sock"
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=path) as listener:
            await assert_echoes(listener, b"x")
            # Taken: it outlives the block, and closing it is ours.
            sock = listener.socket
        try:
            assert listener.closed
            assert sock.fileno() != -1
            assert listener.fd == sock.fileno()
            assert path.is_socket()
            # Still listening: the kernel queues a new client.
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        finally:
            sock.close()


async def test_ipv4_without_close_on_free_leaves_the_socket_open() -> None:
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=("127.0.0.1", 0)) as listener:
            await assert_echoes(listener)
            fd = listener.fd  # taken, as an fd: ours to close
        try:
            assert listener.closed
            assert fd_is_open(fd)
            assert listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert listener.socket.getsockname() == listener.sockname
        finally:
            listener.socket.close()


# ----------------------------------------------------------------------
# A socket left listening with nobody to accept is a ResourceWarning


LEFT_LISTENING = (
    r"^the listener on {} was opened without Flag\.CLOSE_ON_FREE, so the socket "
    r"it bound still listens after the block, with nobody to accept: clients "
    r"that connect now wait\. Pass Flag\.CLOSE_ON_FREE to close it with the "
    r"listener, or take it inside the block \(listener\.socket or listener\.fd\) "
    r"and close it yourself$"
)


async def test_a_bound_socket_never_taken_warns_when_the_block_ends() -> None:
    with trio.fail_after(10):
        with pytest.warns(ResourceWarning) as record:
            async with open_listener(echo_handler, address=("127.0.0.1", 0)) as lst:
                await assert_echoes(lst)
        try:
            [warning] = record
            where = re.escape(f"127.0.0.1:{lst.port}")
            assert re.match(LEFT_LISTENING.format(where), str(warning.message))
            # It points at the caller's line, the async with above.
            assert warning.filename == __file__
            # And it is true: a client connects, and nobody accepts it.
            async with await open_stream_to(lst) as client:
                await client.send_all(b"anyone?")
                with trio.move_on_after(0.05):
                    await client.receive_some(1)
                    pytest.fail("nobody should answer")  # pragma: no cover
        finally:
            lst.socket.close()


async def test_a_bound_unix_socket_never_taken_warns_too(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "w.sock"
    with trio.fail_after(10):
        with pytest.warns(ResourceWarning) as record:
            async with open_listener(echo_handler, address=path) as lst:
                pass
        lst.socket.close()
    [warning] = record
    assert re.match(
        LEFT_LISTENING.format(re.escape(repr(str(path)))), str(warning.message)
    )


@pytest.mark.parametrize("take", ["socket", "fd"])
async def test_a_socket_taken_in_the_block_does_not_warn(take: str) -> None:
    # Warnings are errors in this suite: reaching the end is the test.
    with trio.fail_after(10):
        async with open_listener(echo_handler, address=("127.0.0.1", 0)) as lst:
            getattr(lst, take)
        assert lst.socket.fileno() != -1
        lst.socket.close()


async def test_nothing_left_listening_does_not_warn(
    listening_socket: socket.socket,
) -> None:
    with trio.fail_after(10):
        # CLOSE_ON_FREE closed it.
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ):
            pass
        # A socket given in sock= was never ours.
        async with open_listener(echo_handler, sock=listening_socket, backlog=0):
            pass


async def test_a_block_that_raises_does_not_warn_over_its_exception() -> None:
    # A warning turned error (as here) would replace the block's exception.
    with trio.fail_after(10), pytest.raises(KeyError):
        async with open_listener(echo_handler, address=("127.0.0.1", 0)) as lst:
            raise KeyError("the block's own")
    lst.socket.close()


# ----------------------------------------------------------------------
# listener.fd / socket / sockname / port


async def test_fd_socket_sockname_port_agree() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert isinstance(listener.socket, trio.socket.SocketType)
            assert listener.fd == listener.socket.fileno()
            assert listener.fd >= 0
            assert fd_is_open(listener.fd)
            host, port = listener.sockname
            assert host == "127.0.0.1"
            assert port == listener.port
            assert 0 < port <= 65535
            sockname = listener.sockname
        assert listener.fd == -1
        # Still readable once closed.
        assert listener.sockname == sockname
        assert listener.port == port


# ----------------------------------------------------------------------
# sock=: the three kinds


@pytest.mark.parametrize("close_on_free", [True, False])
async def test_sock_stdlib_socket(
    listening_socket: socket.socket, close_on_free: bool
) -> None:
    flags = Flag.CLOSE_ON_FREE if close_on_free else Flag(0)
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, flags=flags, backlog=0
        ) as listener:
            assert listener.fd == listening_socket.fileno()
            assert listener.sockname == listening_socket.getsockname()
            await assert_echoes(listener, b"stdlib")
    if close_on_free:
        assert listening_socket.fileno() == -1
    else:
        assert listening_socket.fileno() != -1
        assert listening_socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


@pytest.mark.parametrize("close_on_free", [True, False])
async def test_sock_trio_socket(close_on_free: bool) -> None:
    flags = Flag.CLOSE_ON_FREE if close_on_free else Flag(0)
    with trio.fail_after(10), trio.socket.socket() as tsock:
        await tsock.bind(("127.0.0.1", 0))
        tsock.listen(5)
        async with open_listener(
            echo_handler, sock=tsock, flags=flags, backlog=0
        ) as listener:
            assert listener.socket is tsock
            assert listener.fd == tsock.fileno()
            await assert_echoes(listener, b"trio")
        if close_on_free:
            assert tsock.fileno() == -1
        else:
            assert tsock.fileno() != -1
            assert tsock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


class _SocketSubclass(socket.socket):
    """A socket.socket subclass, which trio itself refuses to wrap."""


@pytest.mark.parametrize("close_on_free", [True, False])
async def test_sock_stdlib_socket_subclass(close_on_free: bool) -> None:
    flags = Flag.CLOSE_ON_FREE if close_on_free else Flag(0)
    with _SocketSubclass(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        fd = sock.fileno()
        with trio.fail_after(10):
            async with open_listener(
                echo_handler, sock=sock, flags=flags, backlog=0
            ) as listener:
                assert listener.fd == fd
                assert listener.socket.fileno() == fd
                await assert_echoes(listener, b"subclass")
        if close_on_free:
            assert sock.fileno() == -1
            assert not fd_is_open(fd)
        else:
            assert sock.fileno() == fd
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def _detached_listening_fd() -> tuple[int, tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        name = sock.getsockname()
    except BaseException:
        sock.close()
        raise
    return sock.detach(), name


async def test_sock_int_fd_with_close_on_free_closes_the_fd() -> None:
    fd, name = _detached_listening_fd()
    try:
        with trio.fail_after(10):
            async with open_listener(
                echo_handler, sock=fd, flags=Flag.CLOSE_ON_FREE, backlog=0
            ) as listener:
                assert listener.fd == fd
                assert listener.sockname == name
                await assert_echoes(listener, b"fd")
        assert listener.fd == -1
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    finally:
        if fd_is_open(fd):  # only if the test failed: don't leak it
            os.close(fd)


async def test_sock_int_fd_without_close_on_free_stays_open() -> None:
    fd, name = _detached_listening_fd()
    try:
        with trio.fail_after(10):
            async with open_listener(echo_handler, sock=fd, backlog=0) as listener:
                assert listener.fd == fd
                await assert_echoes(listener, b"fd")
        assert fd_is_open(fd)
        # It is still the same listening socket.
        probe = socket.socket(fileno=os.dup(fd))
        with probe:
            assert probe.getsockname() == name
            assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        os.close(fd)


# systemd socket activation: the child finds its listening socket on fd 3.
_SYSTEMD_CHILD = """
import os, sys, trio
from trio_evlisten import Flag, open_listener

async def echo(listener, conn, addr):
    async for data in conn:
        await conn.send_all(data)

async def main():
    assert os.environ["LISTEN_FDS"] == "1", os.environ.get("LISTEN_FDS")
    async with open_listener(echo, sock=3, flags=Flag.CLOSE_ON_FREE, backlog=0) as lst:
        assert lst.fd == 3, lst.fd
        await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.slow
async def test_systemd_style_fd_3_in_a_child_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        env = dict(os.environ, LISTEN_FDS="1")
        env.pop("LISTEN_PID", None)
        # dup2 in the child makes fd 3 an inheritable copy of the socket;
        # close_fds=False keeps it (Python's own fds are non-inheritable, so
        # nothing else leaks into the child).
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _SYSTEMD_CHILD],
            env=env,
            close_fds=False,
            preexec_fn=functools.partial(os.dup2, lsock.fileno(), 3),
        )
    # The parent's copy is closed: only the child holds the listening socket.
    try:
        with trio.fail_after(20):
            async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                await client.send_all(b"activated")
                assert await recv_exactly(client, 9) == b"activated"
            assert proc.returncode is None
            proc.terminate()
            await proc.wait()
        assert proc.returncode == -signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await proc.wait()


# ----------------------------------------------------------------------
# Argument checks: exactly one of address/sock, shapes, values


async def test_neither_address_nor_sock_is_a_type_error() -> None:
    with trio.fail_after(10), pytest.raises(TypeError) as info:
        async with open_listener(echo_handler):
            pytest.fail("the block must not run")  # pragma: no cover
    assert "address=" in str(info.value)
    assert "sock=" in str(info.value)


async def test_both_address_and_sock_is_a_type_error(
    listening_socket: socket.socket,
) -> None:
    with trio.fail_after(10), pytest.raises(TypeError) as info:
        async with open_listener(
            echo_handler,
            address=("127.0.0.1", 0),
            sock=listening_socket,
            flags=Flag.CLOSE_ON_FREE,
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    assert "address=" in str(info.value)
    assert "sock=" in str(info.value)
    assert_still_open_and_usable(listening_socket)


@pytest.mark.parametrize(
    "address",
    [
        ("127.0.0.1",),
        ("127.0.0.1", 0, 0),
        ("127.0.0.1", 0, 0, 0, 0),
        ["127.0.0.1", 0],
        ("127.0.0.1", "80"),
        ("127.0.0.1", 80.0),
        ("127.0.0.1", True),
        ("127.0.0.1", None),
        (b"127.0.0.1", 0),
        (127, 0),
        8080,
        b"/tmp/not-a-str-path",
        None.__class__,
    ],
    ids=repr,
)
async def test_bad_address_shapes_and_types(address: object) -> None:
    with trio.fail_after(10), pytest.raises(TypeError, match="address"):
        async with open_listener(
            echo_handler,
            address=address,  # type: ignore[arg-type]
            flags=Flag.CLOSE_ON_FREE,
        ):
            pytest.fail("the block must not run")  # pragma: no cover


@pytest.mark.parametrize("port", [70000, 65536, -1])
async def test_port_out_of_range_is_a_value_error(port: int) -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match=str(port)):
        async with open_listener(
            echo_handler, address=("127.0.0.1", port), flags=Flag.CLOSE_ON_FREE
        ):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_backlog_zero_with_address_is_a_value_error() -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="backlog=0"):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), backlog=0, flags=Flag.CLOSE_ON_FREE
        ):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_backlog_zero_with_a_non_listening_sock_is_a_value_error(
    bound_socket: socket.socket,
) -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="not"):
        async with open_listener(
            echo_handler, sock=bound_socket, backlog=0, flags=Flag.CLOSE_ON_FREE
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    assert_still_open_and_usable(bound_socket)
    # listen() was not called behind our back.
    assert not bound_socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


@pytest.mark.parametrize("backlog", ["x", 5.0, None, True])
async def test_backlog_of_the_wrong_type_is_a_type_error(
    listening_socket: socket.socket, backlog: object
) -> None:
    with trio.fail_after(10):
        with pytest.raises(TypeError, match="backlog") as info:
            async with open_listener(
                echo_handler,
                address=("127.0.0.1", 0),
                backlog=backlog,  # type: ignore[arg-type]
            ):
                pytest.fail("the block must not run")  # pragma: no cover
        assert repr(backlog) in str(info.value)
        with pytest.raises(TypeError, match="backlog"):
            async with open_listener(
                echo_handler,
                sock=listening_socket,
                backlog=backlog,  # type: ignore[arg-type]
                flags=Flag.CLOSE_ON_FREE,
            ):
                pytest.fail("the block must not run")  # pragma: no cover
    assert_still_open_and_usable(listening_socket)


async def test_dgram_sock_is_a_value_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with trio.fail_after(10), pytest.raises(ValueError, match="SOCK_STREAM"):
            async with open_listener(echo_handler, sock=udp, flags=Flag.CLOSE_ON_FREE):
                pytest.fail("the block must not run")  # pragma: no cover
        assert_still_open_and_usable(udp)


async def test_dgram_int_fd_is_a_value_error_and_the_fd_stays_open() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with trio.fail_after(10), pytest.raises(ValueError, match="SOCK_STREAM"):
            async with open_listener(
                echo_handler, sock=udp.fileno(), flags=Flag.CLOSE_ON_FREE
            ):
                pytest.fail("the block must not run")  # pragma: no cover
        assert_still_open_and_usable(udp)


async def test_closed_stdlib_sock_is_a_value_error() -> None:
    sock = socket.socket()
    sock.close()
    with trio.fail_after(10), pytest.raises(ValueError, match="closed"):
        async with open_listener(echo_handler, sock=sock, flags=Flag.CLOSE_ON_FREE):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_closed_trio_sock_is_a_value_error() -> None:
    tsock = trio.socket.socket()
    tsock.close()
    with trio.fail_after(10), pytest.raises(ValueError, match="closed"):
        async with open_listener(echo_handler, sock=tsock, flags=Flag.CLOSE_ON_FREE):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_negative_fd_is_a_value_error() -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="-1"):
        async with open_listener(echo_handler, sock=-1, flags=Flag.CLOSE_ON_FREE):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_non_socket_fd_is_a_value_error_and_stays_open() -> None:
    r, w = os.pipe()
    try:
        with trio.fail_after(10), pytest.raises(ValueError, match=str(r)):
            async with open_listener(echo_handler, sock=r, flags=Flag.CLOSE_ON_FREE):
                pytest.fail("the block must not run")  # pragma: no cover
        assert fd_is_open(r)
        # Still the same pipe, working.
        os.write(w, b"!")
        assert os.read(r, 1) == b"!"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("sock", ["3", 3.0, True, object()], ids=repr)
async def test_sock_of_the_wrong_type_is_a_type_error(sock: object) -> None:
    with trio.fail_after(10), pytest.raises(TypeError, match="sock"):
        async with open_listener(
            echo_handler,
            sock=sock,  # type: ignore[arg-type]
            flags=Flag.CLOSE_ON_FREE,
        ):
            pytest.fail("the block must not run")  # pragma: no cover


# ----------------------------------------------------------------------
# backlog, read back from TCP_INFO


@linux_only
async def test_tcp_info_reading_sees_the_queue() -> None:
    # Checks the struct offsets used below: a client waiting in the accept
    # queue of a disabled listener shows up in tcpi_unacked.
    with trio.fail_after(10):
        async with open_listener(
            echo_handler,
            address=("127.0.0.1", 0),
            backlog=3,
            flags=Flag.CLOSE_ON_FREE | Flag.DISABLED,
        ) as listener:
            assert tcp_listen_queue(listener.socket) == (0, 3)
            async with await open_stream_to(listener) as client:
                assert tcp_listen_queue(listener.socket) == (1, 3)
                listener.enable()
                await client.send_all(b"q")
                assert await recv_exactly(client, 1) == b"q"
                assert tcp_listen_queue(listener.socket) == (0, 3)


@linux_only
async def test_backlog_negative_is_somaxconn_capped() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), backlog=-1, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert tcp_listen_queue(listener.socket)[1] == somaxconn_backlog()


@linux_only
async def test_backlog_default_is_somaxconn_capped() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert tcp_listen_queue(listener.socket)[1] == somaxconn_backlog()


@linux_only
async def test_backlog_positive_is_passed_to_listen() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), backlog=7, flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert tcp_listen_queue(listener.socket)[1] == 7


@linux_only
async def test_backlog_zero_keeps_an_existing_listen(
    listening_socket: socket.socket,
) -> None:
    assert tcp_listen_queue(listening_socket)[1] == 5
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, backlog=0
        ) as listener:
            assert tcp_listen_queue(listener.socket)[1] == 5
            await assert_echoes(listener)
    assert tcp_listen_queue(listening_socket)[1] == 5


@linux_only
@pytest.mark.parametrize(("backlog", "expected"), [(9, 9), (-1, None)])
async def test_backlog_with_a_bound_sock_calls_listen(
    bound_socket: socket.socket, backlog: int, expected: int | None
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=bound_socket, backlog=backlog
        ) as listener:
            want = somaxconn_backlog() if expected is None else expected
            assert tcp_listen_queue(listener.socket)[1] == want
            await assert_echoes(listener)


# ----------------------------------------------------------------------
# REUSEABLE


@pytest.mark.parametrize("flag", [True, False])
async def test_reuseable_sets_so_reuseaddr(flag: bool) -> None:
    flags = Flag.CLOSE_ON_FREE | (Flag.REUSEABLE if flag else Flag(0))
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=flags
        ) as listener:
            value = listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(value) is flag


async def test_reuseable_on_a_wrapped_sock(listening_socket: socket.socket) -> None:
    assert not listening_socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, backlog=0, flags=Flag.REUSEABLE
        ):
            assert listening_socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


# ----------------------------------------------------------------------
# REUSEABLE_PORT

requires_reuseport = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="this platform lacks SO_REUSEPORT"
)


@requires_reuseport
@pytest.mark.parametrize("flag", [True, False])
async def test_reuseable_port_sets_so_reuseport(flag: bool) -> None:
    flags = Flag.CLOSE_ON_FREE | (Flag.REUSEABLE_PORT if flag else Flag(0))
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=flags
        ) as listener:
            value = listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert bool(value) is flag


@requires_reuseport
async def test_reuseable_port_two_listeners_share_a_port() -> None:
    flags = Flag.CLOSE_ON_FREE | Flag.REUSEABLE_PORT
    with trio.fail_after(10):
        async with (
            open_listener(echo_handler, address=("127.0.0.1", 0), flags=flags) as first,
            open_listener(
                echo_handler, address=("127.0.0.1", first.port), flags=flags
            ) as second,
        ):
            assert second.port == first.port
            assert second.fd != first.fd
            await assert_echoes(second, b"shared")
            served = first.statistics().accepted + second.statistics().accepted
            assert served == 1


@requires_reuseport
@pytest.mark.parametrize(
    "first_flags", [Flag(0), Flag.REUSEABLE_PORT], ids=["neither", "first-only"]
)
async def test_without_reuseable_port_the_second_bind_fails(first_flags: Flag) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE | first_flags,
        ) as first:
            with pytest.raises(OSError, match=r"[Aa]ddress") as info:
                async with open_listener(
                    echo_handler,
                    address=("127.0.0.1", first.port),
                    flags=Flag.CLOSE_ON_FREE,
                ):
                    pytest.fail("the block must not run")  # pragma: no cover
            assert info.value.errno == errno.EADDRINUSE
            # The first one is unharmed.
            await assert_echoes(first)


async def test_reuseable_port_with_a_unix_path_is_a_value_error(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "p.sock"
    with trio.fail_after(10), pytest.raises(ValueError, match="Unix"):
        async with open_listener(
            echo_handler,
            address=path,
            flags=Flag.REUSEABLE_PORT | Flag.CLOSE_ON_FREE,
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    assert not path.exists()


async def test_reuseable_port_with_a_wrapped_unix_sock_is_a_value_error(
    tmp_path: pathlib.Path,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as usock:
        usock.bind(str(tmp_path / "w.sock"))
        usock.listen(1)
        with trio.fail_after(10), pytest.raises(ValueError, match="Unix"):
            async with open_listener(
                echo_handler,
                sock=usock,
                backlog=0,
                flags=Flag.REUSEABLE_PORT | Flag.CLOSE_ON_FREE,
            ):
                pytest.fail("the block must not run")  # pragma: no cover
        assert_still_open_and_usable(usock)


# ----------------------------------------------------------------------
# BIND_IPV6ONLY


@requires_ipv6
async def test_bind_ipv6only_refuses_ipv4_clients() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler,
            address=("::", 0),
            flags=Flag.CLOSE_ON_FREE | Flag.BIND_IPV6ONLY,
        ) as listener:
            assert listener.socket.family == socket.AF_INET6
            assert (
                listener.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            )
            with (
                trio.socket.socket(socket.AF_INET) as v4,
                pytest.raises(ConnectionRefusedError),
            ):
                await v4.connect(("127.0.0.1", listener.port))
            # IPv6 clients are served.
            await assert_echoes(listener, b"v6")
            assert listener.statistics().accepted == 1


@requires_ipv6
async def test_ipv6_wildcard_without_the_flag_is_dual_stack() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("::", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert (
                listener.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            )
            async with await trio.open_tcp_stream("127.0.0.1", listener.port) as client:
                await client.send_all(b"dual")
                assert await recv_exactly(client, 4) == b"dual"


async def test_bind_ipv6only_with_an_ipv4_address_is_a_value_error() -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="IPv6"):
        async with open_listener(
            echo_handler,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE | Flag.BIND_IPV6ONLY,
        ):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_bind_ipv6only_with_an_ipv4_sock_is_a_value_error(
    listening_socket: socket.socket,
) -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="IPv6"):
        async with open_listener(
            echo_handler,
            sock=listening_socket,
            backlog=0,
            flags=Flag.CLOSE_ON_FREE | Flag.BIND_IPV6ONLY,
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    assert_still_open_and_usable(listening_socket)


# ----------------------------------------------------------------------
# DEFERRED_ACCEPT

requires_defer_accept = pytest.mark.skipif(
    not hasattr(socket, "TCP_DEFER_ACCEPT"),
    reason="this platform's socket module lacks TCP_DEFER_ACCEPT",
)


@requires_defer_accept
@pytest.mark.parametrize("flag", [True, False])
async def test_deferred_accept_sets_tcp_defer_accept(flag: bool) -> None:
    flags = Flag.CLOSE_ON_FREE | (Flag.DEFERRED_ACCEPT if flag else Flag(0))
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=flags
        ) as listener:
            value = listener.socket.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT
            )
            assert (value != 0) is flag
            # A client that speaks first is served either way.
            await assert_echoes(listener, b"first")


@requires_defer_accept
async def test_deferred_accept_on_a_wrapped_sock(
    listening_socket: socket.socket,
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, backlog=0, flags=Flag.DEFERRED_ACCEPT
        ):
            assert listening_socket.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT
            )


# ----------------------------------------------------------------------
# CLOSE_ON_EXEC


@pytest.mark.parametrize("flag", [True, False])
async def test_close_on_exec_on_a_wrapped_sock(
    listening_socket: socket.socket, flag: bool
) -> None:
    os.set_inheritable(listening_socket.fileno(), True)
    assert os.get_inheritable(listening_socket.fileno())
    flags = Flag.CLOSE_ON_EXEC if flag else Flag(0)
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, backlog=0, flags=flags
        ) as listener:
            assert os.get_inheritable(listener.fd) is not flag
            flags_fd = fcntl.fcntl(listener.fd, fcntl.F_GETFD)
            assert bool(flags_fd & fcntl.FD_CLOEXEC) is flag


async def test_close_on_exec_on_an_int_fd() -> None:
    fd, _ = _detached_listening_fd()
    try:
        os.set_inheritable(fd, True)
        with trio.fail_after(10):
            async with open_listener(
                echo_handler, sock=fd, backlog=0, flags=Flag.CLOSE_ON_EXEC
            ):
                assert not os.get_inheritable(fd)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------
# LEAVE_SOCKETS_BLOCKING, and the non-blocking listening socket


async def _hand_over(
    listener: ConnListener,
    conn: object,
    addr: object,
    send: trio.MemorySendChannel[tuple[object, bool]],
) -> None:
    # Report what the handler got and whether its fd is O_NONBLOCK, as the
    # handler sees it (a trio stream is closed by the listener afterwards).
    if isinstance(conn, (trio.SocketStream, trio_evlisten.SocketStream)):
        fd = conn.socket.fileno()
    else:
        assert isinstance(conn, socket.socket)
        fd = conn.fileno()
    await send.send((conn, is_nonblocking(fd)))


@pytest.fixture(params=[None, 0.0, 5.0], ids=lambda t: f"defaulttimeout={t}")
def default_timeout(request: pytest.FixtureRequest) -> Iterator[float | None]:
    """Run with a process-wide socket.setdefaulttimeout, which Python's accept()
    applies to the sockets it returns; restored afterwards."""
    saved = socket.getdefaulttimeout()
    timeout: float | None = request.param
    socket.setdefaulttimeout(timeout)
    try:
        yield timeout
    finally:
        socket.setdefaulttimeout(saved)


async def test_leave_sockets_blocking_hands_over_a_blocking_socket(
    default_timeout: float | None,
) -> None:
    # Whatever socket.setdefaulttimeout says, the handler's socket is blocking.
    send, receive = trio.open_memory_channel[tuple[object, bool]](1)
    with trio.fail_after(10):
        async with send, receive:
            async with (
                open_listener(
                    _hand_over,
                    send,
                    address=("127.0.0.1", 0),
                    flags=Flag.CLOSE_ON_FREE | Flag.LEAVE_SOCKETS_BLOCKING,
                ) as listener,
                await open_stream_to(listener) as client,
            ):
                conn, nonblocking = await receive.receive()
                try:
                    assert type(conn) is socket.socket
                    assert conn.getblocking()
                    assert conn.gettimeout() is None
                    assert not nonblocking
                    await client.send_all(b"hi")
                    # Plain blocking stdlib I/O works on it (wait first, so a
                    # regression cannot hang the blocking recv()).
                    await trio.lowlevel.wait_readable(conn)
                    assert conn.recv(2) == b"hi"
                    conn.sendall(b"yo")
                    assert await recv_exactly(client, 2) == b"yo"
                except BaseException:
                    if isinstance(conn, socket.socket):
                        conn.close()
                    raise
            # Handlers are done: the listener left the handler's socket open.
            try:
                assert isinstance(conn, socket.socket)
                assert conn.fileno() != -1
                assert not is_nonblocking(conn.fileno())
            finally:
                if isinstance(conn, socket.socket):
                    conn.close()


async def test_without_leave_sockets_blocking_the_handler_gets_a_trio_stream(
    stream_class: type[trio.abc.HalfCloseableStream],
) -> None:
    send, receive = trio.open_memory_channel[tuple[object, bool]](1)
    with trio.fail_after(10):
        async with send, receive:
            async with (
                open_listener(
                    _hand_over,
                    send,
                    address=("127.0.0.1", 0),
                    flags=Flag.CLOSE_ON_FREE,
                ) as listener,
                await open_stream_to(listener) as client,
            ):
                conn, nonblocking = await receive.receive()
                assert type(conn) is stream_class
                assert nonblocking
                assert client is not conn
            # The listener closed the stream it handed out.
            assert isinstance(conn, trio.abc.SendStream)
            with pytest.raises(trio.ClosedResourceError):
                await conn.send_all(b"closed?")


async def test_listening_socket_is_nonblocking_with_address() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert is_nonblocking(listener.fd)


async def test_listening_socket_is_nonblocking_with_unix_address(
    tmp_path: pathlib.Path,
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=tmp_path / "n.sock", flags=Flag.CLOSE_ON_FREE
        ) as listener:
            assert is_nonblocking(listener.fd)


async def test_listening_socket_is_nonblocking_with_a_blocking_sock(
    listening_socket: socket.socket,
) -> None:
    assert listening_socket.getblocking()
    assert not is_nonblocking(listening_socket.fileno())
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, sock=listening_socket, backlog=0
        ) as listener:
            assert is_nonblocking(listener.fd)
            assert not listening_socket.getblocking()
            await assert_echoes(listener)


async def test_listening_socket_is_nonblocking_with_an_int_fd() -> None:
    fd, _ = _detached_listening_fd()
    try:
        assert not is_nonblocking(fd)
        with trio.fail_after(10):
            async with open_listener(echo_handler, sock=fd, backlog=0) as listener:
                assert is_nonblocking(listener.fd)
                await assert_echoes(listener)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------
# Errors binding an address name it, and say what holds it


async def bind_error(address: object, flags: Flag = Flag.CLOSE_ON_FREE) -> OSError:
    """The OSError open_listener raises binding ``address``, checked for shape.

    Same errno and class as the kernel's (its error is chained), and the
    message names the address once, then gives the kernel's words.
    """
    where = (
        f"{address[0]}:{address[1]}"
        if isinstance(address, tuple)
        else repr(os.fspath(address))  # type: ignore[call-overload]
    )
    with trio.fail_after(10), pytest.raises(OSError, match="cannot listen on ") as info:
        async with open_listener(echo_handler, address=address, flags=flags):  # type: ignore[arg-type]
            pytest.fail("the block must not run")  # pragma: no cover
    error, cause = info.value, info.value.__cause__
    assert isinstance(cause, OSError)
    assert type(error) is type(cause)
    assert error.errno == cause.errno
    assert error.strerror is not None
    assert error.strerror.startswith(f"cannot listen on {where}: {cause.strerror}")
    assert error.strerror.count(where) == 1 or "os.unlink" in error.strerror
    return error


async def test_a_tcp_port_in_use_names_the_address_and_keeps_the_errno() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = await bind_error(("127.0.0.1", port))
        assert error.errno == errno.EADDRINUSE
        assert str(error) == (
            f"[Errno {errno.EADDRINUSE}] cannot listen on 127.0.0.1:{port}: "
            "Address already in use; another socket holds it: a server listening "
            "there, or connections of one that stopped (TIME_WAIT, a minute or "
            "so); stop that server or wait, or choose another port (port 0 lets "
            "the system pick a free one)"
        )
        # The listener on it did not set SO_REUSEPORT: that flag would not help.
        assert "REUSEABLE_PORT" not in str(error)


@requires_reuseport
async def test_a_port_shared_with_so_reuseport_hints_at_reuseable_port() -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = await bind_error(("127.0.0.1", port))
        assert error.errno == errno.EADDRINUSE
        assert "the socket listening there set SO_REUSEPORT: with " in str(error)
        assert "Flag.REUSEABLE_PORT this one would listen beside it" in str(error)
        # And it is true: with the flag it binds.
        async with open_listener(
            echo_handler,
            address=("127.0.0.1", port),
            flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE_PORT,
        ):
            pass


async def test_a_port_held_by_time_wait_hints_at_reuseable() -> None:
    # The side that closes first keeps its address in TIME_WAIT: here the
    # server's, as when a server stops with clients connected.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()
            assert client.recv(1) == b""
    error = await bind_error(("127.0.0.1", port), Flag.CLOSE_ON_FREE)
    assert error.errno == errno.EADDRINUSE
    assert "(TIME_WAIT): Flag.REUSEABLE (SO_REUSEADDR) lets a restarted" in str(error)
    async with open_listener(
        echo_handler,
        address=("127.0.0.1", port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
    ):
        pass


async def test_a_stale_unix_socket_file_is_named_and_left_in_place(
    tmp_path: pathlib.Path,
) -> None:
    # What a process that died leaves: a socket file nobody listens on.
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    error = await bind_error(path)
    assert error.errno == errno.EADDRINUSE
    assert str(error) == (
        f"[Errno {errno.EADDRINUSE}] cannot listen on {str(path)!r}: Address "
        "already in use; no process listens on that socket file: it may be left "
        "from a process that died (or from a listener opened without "
        "Flag.CLOSE_ON_FREE); if no server uses it, remove it "
        f"(os.unlink({str(path)!r}), or rm) and try again"
    )
    assert path.is_socket()  # nothing removed on our behalf
    path.unlink()
    async with open_listener(echo_handler, address=path, flags=Flag.CLOSE_ON_FREE):
        pass


async def test_a_unix_socket_someone_listens_on_is_not_called_stale(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        error = await bind_error(path)
        assert "; a process is listening on it: stop that server" in str(error)
        assert "remove" not in str(error)
    assert path.is_socket()


async def test_a_regular_file_or_directory_at_the_path_is_named(
    tmp_path: pathlib.Path,
) -> None:
    regular = tmp_path / "data.txt"
    regular.write_text("keep me")
    error = await bind_error(regular)
    assert error.errno == errno.EADDRINUSE
    assert "; it is a regular file, not a socket: choose another path" in str(error)
    assert regular.read_text() == "keep me"
    error = await bind_error(tmp_path)
    assert error.errno == errno.EADDRINUSE
    assert "; it is a directory: give a path for the socket file inside it, like " + (
        repr(str(tmp_path / "server.sock"))
    ) in str(error)


async def test_any_bind_error_names_the_address(tmp_path: pathlib.Path) -> None:
    error = await bind_error(tmp_path / "no" / "such.sock")
    assert isinstance(error, FileNotFoundError)
    assert error.errno == errno.ENOENT


async def test_a_host_that_does_not_resolve_is_named() -> None:
    class Unresolvable(trio.abc.HostnameResolver):
        async def getaddrinfo(self, *args: object) -> NoReturn:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        async def getnameinfo(self, *args: object) -> NoReturn:
            raise NotImplementedError  # pragma: no cover

    previous = trio.socket.set_custom_hostname_resolver(Unresolvable())
    try:
        error = await bind_error(("nosuch.invalid", 8080))
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert isinstance(error, socket.gaierror)
    assert error.errno == socket.EAI_NONAME
