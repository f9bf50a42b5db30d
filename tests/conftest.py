"""Shared fixtures: fd-leak checking and small handlers."""

from __future__ import annotations

import gc
import json
import os
import ssl
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trustme

import trio_evlisten
from trio_evlisten._options import OPTIONS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_evlisten import ConnListener


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stream",
        choices=("ours", "trio"),
        default="ours",
        help="the stream class listeners hand handlers by default in this run: "
        "trio_evlisten.SocketStream (ours) or trio.SocketStream (trio); CI runs "
        "the suite with both",
    )


@pytest.fixture(autouse=True)
def stream_class(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> type[trio.abc.HalfCloseableStream]:
    """The class handlers get by default in this run (see ``--stream``)."""
    if request.config.getoption("--stream") == "ours":
        return trio_evlisten.SocketStream
    trio_default = attrs.evolve(OPTIONS["stream"], default=trio.SocketStream)
    monkeypatch.setitem(OPTIONS, "stream", trio_default)
    return trio.SocketStream


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A certificate authority for TLS tests (trustme)."""
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 and localhost."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts :func:`ca`."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def count_fds() -> int:
    """How many fds this process has open, from /proc/self/fd."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Every test ends with no more fds than it started with.

    It is a sync fixture, so it runs outside the test's trio.run: Trio's own
    epoll fd and wake-up socketpair come and go within the measurement.
    ``gc.collect()`` is slow on a big heap, so it runs only when the counts
    differ: then garbage (this test's cycles, or an earlier test's) is
    collected and the count taken again. Fewer fds than before is fine (an
    earlier test's garbage went); more is a leak.
    """
    before = count_fds()
    yield
    after = count_fds()
    if after > before:
        gc.collect()
        after = count_fds()
    assert after <= before, f"fd leak: {before} fds before the test, {after} after"


async def echo_handler(
    listener: ConnListener, conn: trio.abc.HalfCloseableStream, addr: object
) -> None:
    """Echo every byte back until EOF."""
    async for data in conn:
        await conn.send_all(data)


async def recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Receive exactly ``n`` bytes (or fewer if the peer closes first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class LineReader:
    """Read newline-terminated lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError(f"EOF before a full line: {bytes(self._buf)!r}")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        return line

    async def read_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self.readline())
        return result
