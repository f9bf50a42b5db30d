"""proxy_protocol=True: PROXY v1/v2 headers, parsed, read exactly, or rejected."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_evlisten._proxy_reader
from tests.conftest import recv_exactly
from tests.test_tls import alive, cyclic_gc_disabled, server_end
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten._proxy import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    header_length,
    parse_header,
    read_header,
)
from trio_evlisten._proxy_reader import is_trusted, trusted_networks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

LOCAL = ("127.0.0.1", 0)
TCP4_V1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
# The spec's longest v1 line: exactly 107 bytes.
LONGEST_V1 = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".replace(
    b"f...f", b"ffff:ffff:ffff:ffff:ffff:ffff"
)


def v2(cmd: int, fam: int, body: bytes, *, version: int = 2) -> bytes:
    """A v2 header: signature, version/command, family, length, body."""
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | cmd, fam])
        + len(body).to_bytes(2, "big")
        + body
    )


def inet(family: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(family, src)
        + socket.inet_pton(family, dst)
        + struct.pack("!HH", sport, dport)
    )


TLVS = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN "h2", an empty NOOP
TCP4_V2 = v2(1, 0x11, inet(socket.AF_INET, "192.0.2.1", "198.51.100.2", 56324, 443))
TCP6_V2 = v2(
    1, 0x21, inet(socket.AF_INET6, "2001:db8::1", "2001:db8::2", 1, 65535) + TLVS
)


# ----------------------------------------------------------------------
# The parser, on bytes


def test_v1_tcp4() -> None:
    assert header_length(TCP4_V1 + b"GET /") == len(TCP4_V1)
    assert parse_header(TCP4_V1) == ProxyHeader(
        1, "PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443), len(TCP4_V1)
    )


def test_v1_tcp6_is_canonicalised_like_accept() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.9 0 65535\r\n"
    header = parse_header(line)
    assert header.source == ("2001:db8::1", 0, 0, 0)
    assert header.destination == ("::ffff:192.0.2.9", 65535, 0, 0)


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 junk we ignore\r\n"]
)
def test_v1_unknown_means_use_the_real_peer(line: bytes) -> None:
    assert parse_header(line) == ProxyHeader(1, "LOCAL", None, None, len(line))


def test_v1_longest_line_is_accepted_and_one_more_byte_is_not() -> None:
    assert len(LONGEST_V1) == V1_MAX == 107
    assert header_length(LONGEST_V1) == 107
    assert parse_header(LONGEST_V1).command == "LOCAL"
    too_long = LONGEST_V1[:-2] + b"5\r\n"
    with pytest.raises(ProxyHeaderError, match="without CRLF in its first 107"):
        header_length(too_long)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "bad IPv4 address '1.2.3'"),
        (b"PROXY TCP4 256.1.1.1 1.2.3.4 1 2\r\n", "bad IPv4 address"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "bad IPv4 address '::1'"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 address '1.2.3.4'"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "bad port '65536'"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad port '01'"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "must be 'PROXY TCP4"),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "must be 'PROXY TCP4"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "must be 'PROXY TCP4"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "not ended by CRLF"),
        (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n", "not ended by CRLF"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xb2\r\n", "not ASCII"),
    ],
)
def test_v1_malformed(line: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_header(line)


def test_v2_tcp4() -> None:
    assert header_length(TCP4_V2[:16]) == len(TCP4_V2) == 28
    assert parse_header(TCP4_V2) == ProxyHeader(
        2, "PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443), 28
    )


def test_v2_tcp6_with_tlvs_skipped() -> None:
    header = parse_header(TCP6_V2)
    assert header.source == ("2001:db8::1", 1, 0, 0)
    assert header.destination == ("2001:db8::2", 65535, 0, 0)
    assert header.length == 16 + 36 + len(TLVS)


def test_v2_unix_paths_and_abstract_names() -> None:
    body = b"/run/haproxy.sock".ljust(108, b"\0") + b"\0abstract".ljust(108, b"\0")
    header = parse_header(v2(1, 0x31, body))
    assert header.source == "/run/haproxy.sock"
    assert header.destination == b"\0abstract"


def test_v2_unix_unnamed_source_is_the_empty_str_accept_gives() -> None:
    # A client socket is usually unnamed; accept() gives '' (a str) for it.
    body = b"\0" * 108 + b"/run/app.sock".ljust(108, b"\0")
    header = parse_header(v2(1, 0x31, body))
    assert header.source == ""
    assert header.destination == "/run/app.sock"


@pytest.mark.parametrize("fam", [0x00, 0x11, 0x99, 0xFF])
def test_v2_local_ignores_the_address_block(fam: int) -> None:
    data = v2(0, fam, b"\xaa" * 5)
    assert parse_header(data) == ProxyHeader(2, "LOCAL", None, None, len(data))


def test_v2_proxy_with_unspec_family_means_the_real_peer() -> None:
    data = v2(1, 0x00, b"")
    assert parse_header(data) == ProxyHeader(2, "LOCAL", None, None, 16)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", "does not start with a PROXY"),
        (b"GET / HTTP/1.1\r\n", "does not start with a PROXY"),
        (v2(1, 0x11, b"\0" * 12, version=1), "version 1, not 2"),
        (v2(1, 0x11, b"\0" * 12, version=3), "version 3, not 2"),
        (v2(2, 0x11, b"\0" * 12), "command 0x2"),
        (v2(1, 0x13, b"\0" * 12), "family/protocol byte 0x13"),
        (v2(1, 0x10, b"\0" * 12), "family/protocol byte 0x10"),
        (v2(1, 0x41, b"\0" * 12), "family/protocol byte 0x41"),
        (v2(1, 0x11, b"\0" * 11), "address block of 11 bytes"),
        (v2(1, 0x21, b"\0" * 12), "needs 36"),
        (v2(1, 0x31, b"\0" * 215), "needs 216"),
    ],
)
def test_v2_malformed(data: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_header(data)


def test_v2_oversized_is_refused_from_the_first_16_bytes() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + (V2_MAX - 16 + 1).to_bytes(2, "big")
    with pytest.raises(ProxyHeaderError, match=f"over our limit of {V2_MAX}"):
        header_length(fixed)
    assert header_length(fixed[:14] + (V2_MAX - 16).to_bytes(2, "big")) == V2_MAX


@pytest.mark.parametrize("header", [TCP4_V1, LONGEST_V1, TCP4_V2, TCP6_V2])
def test_every_prefix_asks_for_more_and_never_over_reads(header: bytes) -> None:
    for n in range(1, len(header)):
        need = header_length(header[:n])
        assert need is None or need == len(header), n
        with pytest.raises(ProxyHeaderError, match="expected one complete"):
            parse_header(header[:n])


def test_trusted_networks_and_the_default() -> None:
    assert trusted_networks(None) == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    nets = trusted_networks(n for n in ["10.0.0.0/8", ipaddress.ip_network("::/0")])
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::/0"))
    assert is_trusted(("10.9.8.7", 1), nets)
    assert not is_trusted(("11.0.0.1", 1), nets)
    loop = trusted_networks(None)
    assert is_trusted(("::ffff:127.0.0.2", 1, 0, 0), loop)  # dual-stack view
    assert not is_trusted(("::ffff:10.0.0.1", 1, 0, 0), loop)
    assert is_trusted(("::1", 1, 0, 0), loop)
    assert is_trusted("", ())  # a Unix-socket peer


# ----------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"proxy_trusted": "10.0.0.0/8"}, TypeError, "iterable of networks"),
        ({"proxy_trusted": 10}, TypeError, "not 10"),
        ({"proxy_trusted": ["10.0.0.1/8"]}, ValueError, "'10.0.0.1/8' is not a net"),
        ({"proxy_trusted": ["localhost"]}, ValueError, "'localhost'"),
        ({"proxy_trusted": [b"10.0.0.0/8"]}, TypeError, "b'10.0.0.0/8'"),
        ({"proxy_timeout": -1.0}, ValueError, "proxy_timeout must be >= 0"),
        ({"proxy_timeout": None}, TypeError, "proxy_timeout must be seconds"),
        ({"proxy_protocol": "yes"}, TypeError, "proxy_protocol must be True or"),
    ],
)
async def test_bad_proxy_options(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with trio.fail_after(10), pytest.raises(error, match=match):
        async with open_listener(None, address=LOCAL, **kwargs):
            pass  # pragma: no cover


# ----------------------------------------------------------------------
# Real sockets

Seen = tuple[Any, bytes]


@asynccontextmanager
async def proxy_server(
    address: Any = LOCAL,
    **kwargs: Any,
) -> AsyncIterator[tuple[ConnListener, trio.MemoryReceiveChannel[Seen]]]:
    """A listener whose handler reports (addr, bytes until EOF) and echoes them."""
    send, receive = trio.open_memory_channel[Seen](100)

    async def handler(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        data = b""
        async for chunk in conn:
            data += chunk
        await conn.send_all(data)
        await send.send((addr, data))

    async with open_listener(
        handler,
        address=address,
        flags=Flag.CLOSE_ON_FREE,
        proxy_protocol=True,
        **kwargs,
    ) as listener:
        yield listener, receive


async def connect(
    listener: ConnListener, source: str = "127.0.0.1"
) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", listener.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(stream: trio.SocketStream, *parts: bytes) -> bytes:
    """Send the parts, EOF, and return all that comes back until EOF."""
    for part in parts:
        await stream.send_all(part)
    await stream.send_eof()
    back = b""
    async for chunk in stream:
        back += chunk
    return back


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TCP4_V1, ("192.0.2.1", 56324)),
        (TCP4_V2, ("192.0.2.1", 56324)),
        (TCP6_V2, ("2001:db8::1", 1, 0, 0)),
    ],
)
async def test_handler_sees_the_original_client_and_exactly_its_bytes(
    header: bytes, expected: Any
) -> None:
    # The header and the application's first bytes in one segment: the
    # reader must take the header and not one byte more.
    payload = b"\r\n\r\nPROXY app bytes that look like a header\x00"
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            async with await connect(listener) as client:
                assert await exchange(client, header + payload) == payload
            assert await seen.receive() == (expected, payload)
            stats = listener.statistics()
            assert (stats.accepted, stats.proxy_rejected) == (1, 0)


async def test_the_header_is_read_from_a_non_blocking_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # accept() returns blocking sockets; a header read from one would stall
    # the whole loop until the client sent something (a silent client: for
    # ever). Checked at the reader's door, so a regression fails here at once
    # instead of hanging the suite.
    blocking: list[bool] = []
    real = read_header

    async def spy(sock: socket.socket) -> ProxyHeader:
        blocking.append(sock.getblocking())
        return await real(sock)

    monkeypatch.setattr(trio_evlisten._proxy_reader, "read_header", spy)
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            async with await connect(listener) as client:
                assert await exchange(client, TCP4_V1, b"hi") == b"hi"
            assert await seen.receive() == (("192.0.2.1", 56324), b"hi")
    assert blocking == [False]


async def test_clients_yet_to_send_their_header_hold_up_no_one() -> None:
    with trio.fail_after(10):
        async with (
            proxy_server() as (listener, seen),
            await connect(listener) as silent,
            await connect(listener) as partial,
            await connect(listener) as honest,
        ):
            await partial.send_all(TCP4_V1[:10])
            await trio.testing.wait_all_tasks_blocked()
            assert await exchange(honest, TCP4_V1 + b"hi") == b"hi"
            assert await seen.receive() == (("192.0.2.1", 56324), b"hi")
            assert listener.statistics().pending == 2
            await silent.send_all(b"")


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2(0, 0, b"")])
async def test_local_and_unknown_give_the_real_peer(header: bytes) -> None:
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            async with await connect(listener, "127.0.0.3") as client:
                assert await exchange(client, header, b"x") == b"x"
                real = client.socket.getsockname()
            assert await seen.receive() == (real, b"x")


UNIX_V2 = v2(1, 0x31, b"/run/client.sock".ljust(108, b"\0") + b"\0" * 108)


async def test_unix_family_header_on_a_tcp_listener_gives_the_real_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The handler of a TCP listener expects (host, port): a path in its
    # place would break it. As the spec allows for an unsupported family,
    # and as HAProxy and nginx do, fall back to the real peer's address;
    # the header is valid and its sender trusted, so this is no rejection.
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            async with await connect(listener, "127.0.0.3") as client:
                assert await exchange(client, UNIX_V2, b"x") == b"x"
                real = client.socket.getsockname()
            assert await seen.receive() == (real, b"x")
            assert listener.statistics().proxy_rejected == 0
    assert "names a Unix-socket client '/run/client.sock'" in caplog.text


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # What PROXY over a Unix socket is for: a TCP client, relayed.
        (TCP4_V1, ("192.0.2.1", 56324)),
        (TCP4_V2, ("192.0.2.1", 56324)),
        (TCP6_V2, ("2001:db8::1", 1, 0, 0)),
        (UNIX_V2, "/run/client.sock"),
        (v2(1, 0x31, b"\0" * 216), ""),
        (v2(0, 0, b""), ""),  # LOCAL: the real, unnamed peer
    ],
)
async def test_unix_listener_hands_over_the_headers_address(
    tmp_path: Path, header: bytes, expected: Any
) -> None:
    path = str(tmp_path / "s")
    with trio.fail_after(10):
        async with proxy_server(path) as (listener, seen):
            sock = trio.socket.socket(socket.AF_UNIX)
            with sock:
                await sock.connect(path)
                async with trio.SocketStream(sock) as client:
                    assert await exchange(client, header, b"y") == b"y"
            assert await seen.receive() == (expected, b"y")
            assert listener.statistics().proxy_rejected == 0


async def test_header_in_pieces_is_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    header = TCP6_V2
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            async with await connect(listener) as client:
                # Pieces 0.5 s apart (virtual time), 2.5 s in all: within
                # proxy_timeout, and cut inside the signature, the fixed
                # part, the addresses and the TLVs.
                start = 0
                for cut in (1, 10, 16, 17, len(header) - 1, len(header)):
                    await client.send_all(header[start:cut])
                    start = cut
                    await trio.sleep(0.5)
                assert await exchange(client, b"after") == b"after"
            assert await seen.receive() == (("2001:db8::1", 1, 0, 0), b"after")
            assert listener.statistics().proxy_rejected == 0


def stdlib(sock: trio.socket.SocketType) -> socket.socket:
    """The stdlib socket inside a trio socket (what the listener reads from)."""
    inner = sock._sock  # type: ignore[attr-defined]
    assert isinstance(inner, socket.socket)
    return inner


class CountingSocket:
    """A stdlib socket's ``recv()`` and ``fileno()``, counting the recv calls."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = stdlib(sock)
        self.recvs = 0

    def __repr__(self) -> str:
        return f"<CountingSocket recvs={self.recvs}>"

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def family(self) -> int:
        return self._sock.family

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        self._sock.setsockopt(level, option, value)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        self.recvs += 1
        return self._sock.recv(bufsize, flags)


@asynccontextmanager
async def socket_pair(
    kind: str,
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    """A connected (sender, receiver) pair: AF_UNIX, or TCP on 127.0.0.1."""
    if kind == "unix":
        a, b = trio.socket.socketpair()
        with a, b:
            yield a, b
        return
    with trio.socket.socket() as lsock:
        await lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        with trio.socket.socket() as a:
            await a.connect(lsock.getsockname())
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            b, _ = await lsock.accept()
            with b:
                yield a, b


class TaskSteps(trio.abc.Instrument):
    """Counts how many times one task is scheduled to run."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("header", [TCP4_V1, TCP6_V2, LONGEST_V1])
async def test_header_in_one_segment_costs_one_peek(kind: str, header: bytes) -> None:
    # One peek finds the whole header; one read (not through the trio
    # socket, so not counted here) takes exactly it.
    with trio.fail_after(10):
        async with socket_pair(kind) as (a, b):
            await a.send(header + b"app")
            counting = CountingSocket(b)
            assert (await read_header(counting)).length == len(header)
            assert counting.recvs == 1
            assert await b.recv(100) == b"app"


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_a_header_in_pieces_costs_nothing_while_no_byte_arrives(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    # A slowloris: pieces 100 s apart (virtual time). Polling for the rest
    # would peek and be scheduled thousands of times in each pause; waiting
    # on readability peeks once per piece, and the reader runs twice per
    # piece (woken, then back from the peek's schedule point), however long
    # the pauses.
    header = TCP4_V1
    cuts = [1, 2, 6, 20, len(header) - 1, len(header)]
    with trio.fail_after(10_000):
        async with socket_pair(kind) as (a, b), trio.open_nursery() as nursery:
            counting = CountingSocket(b)
            steps = TaskSteps(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(steps)

            async def dribble() -> None:
                start = 0
                for cut in cuts:
                    await trio.sleep(100)
                    await a.send(
                        header[start:cut] + (b"app" if cut == cuts[-1] else b"")
                    )
                    start = cut

            nursery.start_soon(dribble)
            parsed = await read_header(counting)
            trio.lowlevel.remove_instrument(steps)
            assert parsed.source == ("192.0.2.1", 56324)
            assert trio.current_time() >= 100 * len(cuts)
            # One peek per piece, and one first look before any byte came.
            assert counting.recvs <= len(cuts) + 1
            assert steps.steps <= 2 * len(cuts) + 1
            assert await b.recv(100) == b"app"


async def rejected(
    listener: ConnListener, *parts: bytes, source: str = "127.0.0.1"
) -> None:
    """Send the parts; assert the server closes without answering."""
    async with await connect(listener, source) as client:
        for part in parts:
            await client.send_all(part)
        await closed_by_server(client)


async def closed_by_server(client: trio.SocketStream) -> None:
    # A reset (the server closed with our bytes unread) is a close too.
    with contextlib.suppress(trio.BrokenResourceError):
        assert await client.receive_some() == b""


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nhello",
        v2(1, 0x11, b"\0" * 12, version=1),
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB: oversized
        b"PROXY " + b"x" * 200,  # no CRLF in 107 bytes
    ],
)
async def test_bad_header_closes_without_calling_the_handler(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        async with proxy_server() as (listener, seen):
            await rejected(listener, garbage)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().proxy_rejected == 1
            assert listener.statistics().active == 0
            assert seen.statistics().current_buffer_used == 0
    [record] = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert record.levelno == logging.WARNING
    assert "dropped a connection from ('127.0.0.1'" in record.getMessage()


async def test_truncated_header_then_eof_is_rejected_at_once() -> None:
    # proxy_timeout is long: only noticing the EOF can end this quickly.
    with trio.fail_after(5):
        async with proxy_server(proxy_timeout=3600) as (listener, _):
            async with await connect(listener) as client:
                await client.send_all(TCP6_V2[:20])
                await client.send_eof()
                await closed_by_server(client)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().proxy_rejected == 1


async def test_slow_header_times_out(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with proxy_server(proxy_timeout=7.5) as (listener, seen):
            async with await connect(listener) as client:
                start = trio.current_time()
                await client.send_all(b"PROXY TCP4 ")
                await closed_by_server(client)
                assert 7.5 <= trio.current_time() - start < 7.6
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().proxy_rejected == 1
            assert seen.statistics().current_buffer_used == 0


async def test_untrusted_peer_is_dropped_before_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with proxy_server(proxy_trusted=["127.0.0.5/32"]) as (listener, seen):
            await rejected(listener, TCP4_V1, source="127.0.0.1")
            async with await connect(listener, "127.0.0.5") as client:
                assert await exchange(client, TCP4_V1, b"ok") == b"ok"
            assert await seen.receive() == (("192.0.2.1", 56324), b"ok")
            assert listener.statistics().proxy_rejected == 1
    assert "the peer is not in proxy_trusted" in caplog.text


async def test_rejections_are_logged_once_per_10_seconds(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "trio_evlisten" and r.levelno == logging.WARNING
        ]

    with trio.fail_after(60):
        async with proxy_server() as (listener, _):
            for _ in range(3):
                await rejected(listener, b"nope\r\n")
            await trio.testing.wait_all_tasks_blocked()
            assert len(warnings()) == 1
            await trio.sleep(9.9)
            await rejected(listener, b"nope\r\n")
            await trio.testing.wait_all_tasks_blocked()
            assert len(warnings()) == 1
            await trio.sleep(0.2)
            await rejected(listener, b"nope\r\n")
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().proxy_rejected == 5
    first, second = warnings()
    assert "dropped a connection from" in first
    # The one grouped log: the three suppressed ones, by reason, since the
    # first line (10 s before).
    assert "dropped connections: bad header \u00d73 in 10.0 s" in second


async def test_statistics_without_proxy_protocol() -> None:
    with trio.fail_after(10):
        async with open_listener(None, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
            assert lst.statistics().proxy_rejected == 0


async def test_blocking_sockets_get_the_header_address_and_the_rest() -> None:
    results: list[tuple[Any, bytes, bool]] = []
    done = trio.Event()

    async def handler(listener: ConnListener, conn: socket.socket, addr: Any) -> None:
        def work() -> bytes:
            data = b""
            while chunk := conn.recv(100):
                data += chunk
            conn.sendall(data)
            return data

        blocking = conn.getblocking()
        data = await trio.to_thread.run_sync(work)
        conn.close()
        results.append((addr, data, blocking))
        done.set()

    with trio.fail_after(10):
        async with open_listener(
            handler,
            address=LOCAL,
            flags=Flag.CLOSE_ON_FREE | Flag.LEAVE_SOCKETS_BLOCKING,
            proxy_protocol=True,
        ) as listener:
            async with await connect(listener) as client:
                assert await exchange(client, TCP4_V2 + b"thread") == b"thread"
            await done.wait()
    assert results == [(("192.0.2.1", 56324), b"thread", True)]


async def test_header_comes_before_the_tls_handshake() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    seen: list[tuple[Any, bytes, bool]] = []

    async def handler(listener: ConnListener, conn: trio.abc.Stream, addr: Any) -> None:
        data = await recv_exactly(conn, 6)
        seen.append((addr, data, isinstance(conn, trio.SSLStream)))
        await conn.send_all(data)

    with trio.fail_after(10):
        async with (
            open_listener(
                handler,
                address=LOCAL,
                flags=Flag.CLOSE_ON_FREE,
                proxy_protocol=True,
                ssl_context=server_ctx,
            ) as listener,
            await connect(listener) as raw,
        ):
            await raw.send_all(TCP4_V1)
            tls = trio.SSLStream(raw, client_ctx, server_hostname="127.0.0.1")
            await tls.send_all(b"secret")
            assert await recv_exactly(tls, 6) == b"secret"
    assert seen == [(("192.0.2.1", 56324), b"secret", True)]


# ----------------------------------------------------------------------
# What a connection leaves behind: nothing the cyclic GC must find


@pytest.mark.parametrize(
    "client_sends", [b"", b"PROXY TCP4 ", b"GET / HTTP/1.0\r\n\r\n"]
)
async def test_rejected_header_is_freed_by_reference_counting(
    client_sends: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    # Nothing or a partial header: it times out; garbage: rejected at once.
    with trio.fail_after(60), cyclic_gc_disabled():
        async with proxy_server(proxy_timeout=7.5) as (listener, _):
            async with await connect(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(client)
                assert alive(refs) == ["socket"]
                await client.send_all(client_sends)
                await closed_by_server(client)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().proxy_rejected == 1
            assert alive(refs) == []


async def test_served_proxied_connection_is_freed_by_reference_counting() -> None:
    with trio.fail_after(10), cyclic_gc_disabled():
        async with proxy_server() as (listener, seen):
            async with await connect(listener) as client:
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(client)
                assert alive(refs) == ["socket"]
                assert await exchange(client, TCP4_V1, b"ok") == b"ok"
            assert await seen.receive() == (("192.0.2.1", 56324), b"ok")
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().active == 0
            assert alive(refs) == []


async def test_handshake_timing_out_after_a_header_is_freed_by_reference_counting(
    server_ctx: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60), cyclic_gc_disabled():
        async with proxy_server(ssl_context=server_ctx, tls_handshake_timeout=3) as (
            listener,
            _,
        ):
            async with await connect(listener) as client:
                await client.send_all(TCP4_V1)
                await trio.testing.wait_all_tasks_blocked()
                refs = server_end(client)
                assert alive(refs) == ["SSLObject", "SSLStream", "socket"]
                await closed_by_server(client)
            await trio.testing.wait_all_tasks_blocked()
            stats = listener.statistics()
            assert (stats.proxy_rejected, stats.tls_failures) == (0, 1)
            assert alive(refs) == []


# ----------------------------------------------------------------------
# Fuzzing the reader on real sockets


def _valid_headers() -> st.SearchStrategy[bytes]:
    ip4 = st.ip_addresses(v=4).map(str)
    ip6 = st.ip_addresses(v=6).map(str)
    port = st.integers(0, 65535)
    tlvs = st.binary(max_size=300)
    return st.one_of(
        st.builds(
            lambda a, b, p, q: f"PROXY TCP4 {a} {b} {p} {q}\r\n".encode(),
            ip4,
            ip4,
            port,
            port,
        ),
        st.builds(
            lambda a, b, p, q: f"PROXY TCP6 {a} {b} {p} {q}\r\n".encode(),
            ip6,
            ip6,
            port,
            port,
        ),
        st.just(b"PROXY UNKNOWN\r\n"),
        st.builds(
            lambda a, b, p, q, t: v2(1, 0x11, inet(socket.AF_INET, a, b, p, q) + t),
            ip4,
            ip4,
            port,
            port,
            tlvs,
        ),
        st.builds(
            lambda a, b, p, q, t: v2(1, 0x21, inet(socket.AF_INET6, a, b, p, q) + t),
            ip6,
            ip6,
            port,
            port,
            tlvs,
        ),
        st.builds(lambda t: v2(0, 0, t), tlvs),
    )


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    """A valid header, maybe mutated, followed by application bytes."""
    data = bytearray(draw(_valid_headers()))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=64))


def _check_parser(data: bytes) -> None:
    try:
        need = header_length(data)
    except ProxyHeaderError:
        return
    if need is None or need > len(data):
        return
    try:
        header = parse_header(data[:need])
    except ProxyHeaderError:
        return
    assert header.length == need


async def test_a_tcp_dribble_wakes_the_reader_only_when_a_header_could_be_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One byte every 100 s (virtual): on TCP, SO_RCVLOWAT keeps the reader
    # asleep until 15 bytes (the shortest v1 header) could be there; then
    # the socket is left with the kernel's default for the application.
    with trio.fail_after(10_000):
        async with socket_pair("tcp") as (a, b), trio.open_nursery() as nursery:
            counting = CountingSocket(b)
            steps = TaskSteps(trio.lowlevel.current_task())

            async def dribble() -> None:
                await a.send(TCP4_V1[:1])
                for i in range(1, len(TCP4_V1)):
                    await trio.sleep(100)
                    await a.send(TCP4_V1[i : i + 1] + (b"app" if i == 44 else b""))

            nursery.start_soon(dribble)
            trio.lowlevel.add_instrument(steps)
            parsed = await read_header(counting)
            trio.lowlevel.remove_instrument(steps)
            assert parsed.source == ("192.0.2.1", 56324)
            # 45 bytes, 44 pauses: a first look (nothing yet), the first byte,
            # asleep until 15 are there, then a wake-up per byte once the
            # header could end with any of them (46 looks without the mark).
            assert counting.recvs <= 3 + (len(TCP4_V1) - 15)
            assert steps.steps <= 2 * (3 + len(TCP4_V1) - 15)
            lowat = stdlib(b).getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
            assert lowat == 1
            assert await b.recv(100) == b"app"


async def _read_through_a_socket(data: bytes, pieces: Iterable[int]) -> None:
    a, b = trio.socket.socketpair()
    with a, b:

        async def sender() -> None:
            start = 0
            for cut in [*sorted(min(p, len(data)) for p in pieces), len(data)]:
                while start < cut:
                    start += await a.send(data[start:cut])
                await trio.sleep(0.01)
            a.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                with trio.fail_after(60):  # virtual time
                    header: ProxyHeader | None = await read_header(stdlib(b))
            except ProxyHeaderError:
                header = None
            rest = b""
            while chunk := await b.recv(65536):
                rest += chunk
        consumed = len(data) - len(rest)
        assert rest == data[consumed:]
        if header is not None:
            assert consumed == header.length
            assert parse_header(data[:consumed]) == header
        else:
            # Rejected: what was taken is a prefix of the header (taken
            # while waiting for the rest), or exactly the length the header
            # announced (then found malformed); never a byte past it.
            need = header_length(data[:consumed]) if consumed else 0
            assert need is None or need >= consumed


_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_parser_random_bytes(data: bytes) -> None:
    _check_parser(data)
    _check_parser(V2_SIGNATURE + data)
    _check_parser(b"PROXY " + data)


@_FUZZ
@given(_streams())
def test_fuzz_parser_mutated_headers(data: bytes) -> None:
    _check_parser(data)


@_FUZZ
@given(
    st.one_of(_streams(), st.binary(max_size=200)),
    st.lists(st.integers(0, 400), max_size=4),
)
def test_fuzz_reader_never_reads_past_the_header(
    data: bytes, pieces: list[int]
) -> None:
    trio.run(
        _read_through_a_socket,
        data,
        pieces,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


async def test_dropped_connections_are_summed_up_even_when_drops_stop(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The one grouped log: the first drop in full, then the count of the
    # rest by reason when the interval is up, whether or not drops go on.
    with trio.fail_after(60):
        async with proxy_server() as (listener, _):
            t0 = trio.current_time()
            for _ in range(3):
                await rejected(listener, b"nope\r\n")
            await trio.sleep(4)
            await rejected(listener, b"PROXY TCP4 1.2.3.4\r\n")
            await trio.sleep(20)
            assert listener.statistics().proxy_rejected == 4
    warnings = [
        (r.getMessage(), getattr(r, "proxy_rejected", None))
        for r in caplog.records
        if r.name == "trio_evlisten" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    (first, one), (summary, three) = warnings
    assert "dropped a connection from" in first
    assert "dropped connections: bad header \u00d73 in 10.0 s" in summary
    assert (one, three) == (1, 3)
    assert trio.current_time() >= t0 + 24
