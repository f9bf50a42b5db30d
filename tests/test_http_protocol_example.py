"""examples/http_protocol.py behaves as examples/http_server.py does.

The same checks as tests/test_http_example.py, whose helpers this reuses:
the example as a real process driven by wrk, curl and http.client; and in
process, its :class:`HTTPServer` behind a listener in protocol mode (under
both engines), talked to by h11's client side, with the autojump clock for
the idle timeout, the linger and the drain.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.test_http_example import (
    EXAMPLES,
    GET,
    Client,
    Example,
    FakeDrain,
    header,
    load_example,
    needs_wrk,
    read_all,
    read_to_eof,
    run_example,
    wrk_requests,
)
from trio_evlisten import ConnListener, Flag, _engine, open_listener
from trio_evlisten.testing import open_stream_to

try:
    import h11
except ImportError:  # not among the package's own test needs (.ci/wheel-check)
    pytest.skip(
        "h11 is not installed: pip install -e '.[test]'", allow_module_level=True
    )

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

HTTP_PROTOCOL = EXAMPLES / "http_protocol.py"
app = load_example(HTTP_PROTOCOL)


@pytest.fixture
def server() -> Iterator[Example]:
    with run_example(HTTP_PROTOCOL, "HTTP server listening on") as example:
        yield example


# As a process, driven by clients nobody here wrote (the cases both examples
# share are in tests/test_http_example.py, run on each).


@pytest.mark.slow
@needs_wrk
def test_wrk_counts_the_404s_and_nothing_else(server: Example) -> None:
    out = subprocess.run(
        ["wrk", "-t1", "-c10", "-d1s", f"http://127.0.0.1:{server.port}/nope"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert match is not None, out
    assert int(match.group(1)) == wrk_requests(out)
    assert "Socket errors" not in out, out
    assert server.interrupt() == (0, "", "")


@pytest.mark.slow
def test_ctrl_c_answers_the_request_under_way_then_exits(server: Example) -> None:
    """Mid-request at Ctrl-C: answered whole with Connection: close, then
    the process exits 0 with nothing printed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        time.sleep(0.3)  # a subprocess: nothing in-process to wait on
        server.proc.send_signal(signal.SIGINT)
        wait_until_refused(server.port)  # the drain began
        s.sendall(b"st: t\r\n\r\n")
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
    assert b"\r\nConnection: close\r\n" in reply
    assert reply.endswith(b"Hello, world!\n")
    out, err = server.proc.communicate(timeout=15)
    assert (server.proc.returncode, out, err) == (0, "", "")


def wait_until_refused(port: int) -> None:
    """Wait until the server no longer accepts: its drain began."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)  # a subprocess: nothing in-process to wait on
    raise AssertionError("the server still accepts")


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(server: Example) -> None:
    """A request never finished would hold the drain for DRAIN_TIMEOUT; a
    second Ctrl-C does not wait for it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        time.sleep(0.3)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGINT)
        out, err = server.proc.communicate(timeout=15)
        took = time.monotonic() - start
    assert (server.proc.returncode, out, err) == (0, "", "")
    assert took < app.DRAIN_TIMEOUT


@pytest.mark.parametrize("arg", ["-1", "65536", "abc"])
def test_invalid_port(arg: str) -> None:
    done = subprocess.run(
        [sys.executable, str(HTTP_PROTOCOL), arg],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "Invalid port\n")


def test_bind_failure_is_reported() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(HTTP_PROTOCOL), str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert done.stderr.startswith("Couldn't create listener:")
    assert "Address already in use" in done.stderr


def test_parse_args() -> None:
    assert app.parse_args(["http_protocol.py"]) == ("127.0.0.1", 8080)
    assert app.parse_args(["x", "9000", "--host", "::1"]) == ("::1", 9000)


# In process: HTTPServer behind a listener in protocol mode.


@pytest.fixture(params=["epoll", "tasks"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each in-process test under the epoll engine and under the fallback."""
    name: str = request.param
    monkeypatch.setattr(_engine, "ENGINE", name)
    return name


@contextlib.asynccontextmanager
async def serving(
    idle_timeout: float | None = app.IDLE_TIMEOUT,
) -> AsyncIterator[ConnListener]:
    """A listener serving the example's HTTPServer, as its main() does."""
    http = app.HTTPServer(idle_timeout)
    async with open_listener(
        address=("127.0.0.1", 0),
        flags=Flag.CLOSE_ON_FREE,
        protocol=http.protocol,
        drain_timeout=app.DRAIN_TIMEOUT,
    ) as listener:
        listener.nursery.start_soon(http.run, listener)
        yield listener


@contextlib.asynccontextmanager
async def client(
    idle_timeout: float | None = app.IDLE_TIMEOUT,
) -> AsyncIterator[Client]:
    async with serving(idle_timeout) as listener, await open_stream_to(listener) as s:
        yield Client(s)


@pytest.mark.usefixtures("engine")
async def test_idle_keep_alive_connection_is_closed_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with client(idle_timeout=7) as c:
            response, body = await c.request()
            assert (response.status_code, body) == (200, b"Hello, world!\n")
            assert header(response, b"Connection") is None  # kept alive
            start = trio.current_time()
            assert await c.at_eof()
            # The sweep's resolution: never early, at most one sweep late.
            assert 7 <= trio.current_time() - start <= 7 + app.SWEEP


@pytest.mark.usefixtures("engine")
async def test_each_request_moves_the_idle_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with client(idle_timeout=7) as c:
            for _ in range(4):
                assert (await c.request())[0].status_code == 200
                await trio.sleep(5)
            last = trio.current_time() - 5
            assert await c.at_eof()
            assert 7 <= trio.current_time() - last <= 7 + app.SWEEP


@pytest.mark.usefixtures("engine")
async def test_request_begun_but_not_finished_gets_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with client(idle_timeout=7) as c:
            await c.stream.send_all(b"GET / HTTP/1.1\r\nHo")
            reply = await read_all(c.stream)
            assert 7 <= trio.current_time() <= 7 + app.SWEEP
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close\r\n" in reply


@pytest.mark.usefixtures("engine")
async def test_pipelined_requests_are_answered_in_order() -> None:
    with trio.fail_after(10):
        async with client() as c:
            await c.stream.send_all(
                b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            reply = await read_all(c.stream)
    assert re.findall(rb"HTTP/1.1 (\d+) ", reply) == [b"404", b"200", b"200"]
    assert reply.count(b"Connection: close") == 1


@pytest.mark.usefixtures("engine")
async def test_client_eof_between_requests_ends_quietly() -> None:
    with trio.fail_after(10):
        async with client() as c:
            assert (await c.request())[0].status_code == 200
            await c.stream.send_eof()
            assert await c.at_eof()


@pytest.mark.usefixtures("engine")
async def test_request_then_eof_is_answered() -> None:
    """A client that half-closes right after its request still gets the answer."""
    with trio.fail_after(10):
        async with client() as c:
            await c.stream.send_all(GET)
            await c.stream.send_eof()
            reply = await read_all(c.stream)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
    assert reply.endswith(b"Hello, world!\n")


@pytest.mark.usefixtures("engine")
async def test_body_over_the_limit_gets_413_and_close() -> None:
    with trio.fail_after(10):
        async with client() as c:
            response, _ = await c.request(b"POST", b"/", b"x" * (app.MAX_BODY + 1))
            assert response.status_code == 413
            assert header(response, b"Connection") == b"close"
            assert await c.at_eof()


@pytest.mark.usefixtures("engine")
async def test_expect_100_continue_is_answered_before_the_body() -> None:
    with trio.fail_after(10):
        async with client() as c:
            await c.send_head(
                b"PUT", b"/", [(b"Content-Length", b"5"), (b"Expect", b"100-continue")]
            )
            while not c.informational:
                event = c.h11.next_event()
                if event is h11.NEED_DATA:
                    c.h11.receive_data(bytes(await c.stream.receive_some()))
                else:
                    assert isinstance(event, h11.InformationalResponse), event
                    c.informational.append(event.status_code)
            assert c.informational == [100]
            await c.send_body(b"hello")
            response, _ = await c.response()
            assert response.status_code == 405
            assert header(response, b"Connection") is None
            assert (await c.request())[0].status_code == 200


@pytest.mark.usefixtures("engine")
async def test_oversized_head_gets_h11s_status_and_close() -> None:
    with trio.fail_after(10):
        async with client() as c:
            await c.stream.send_all(
                b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70000
            )
            reply = await read_all(c.stream)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


async def keep_sending(stream: trio.abc.SendStream) -> None:
    """Send a byte now and then until the peer resets the connection."""
    while True:
        await stream.send_all(b"x")
        await trio.sleep(0.25)


@pytest.mark.usefixtures("engine")
async def test_a_client_that_never_closes_is_aborted_after_the_linger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After our FIN we read for LINGER seconds, not for ever."""
    with trio.fail_after(60):
        async with client() as c:
            await c.stream.send_all(
                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            reply = await read_all(c.stream)  # up to our FIN
            assert reply.endswith(b"Hello, world!\n")
            start = trio.current_time()
            # Still read (and dropped) while we linger.
            await c.stream.send_all(b"more")
            with pytest.raises(trio.BrokenResourceError):
                await keep_sending(c.stream)
            assert (
                app.LINGER <= trio.current_time() - start <= app.LINGER + 2 * app.SWEEP
            )


@pytest.mark.usefixtures("engine")
async def test_drain_finishes_requests_and_closes_idle_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Idle keep-alive: closed at once. Mid-request: answered with
    Connection: close. Accepted but silent: its first request is still
    served. Nobody waits for a timeout, nobody is cancelled."""
    with trio.fail_after(60):
        async with (
            serving() as listener,
            await open_stream_to(listener) as idle_stream,
            await open_stream_to(listener) as busy_stream,
            await open_stream_to(listener) as fresh_stream,
        ):
            idle, busy = Client(idle_stream), Client(busy_stream)
            assert (await idle.request())[0].status_code == 200
            assert (await busy.request())[0].status_code == 200
            await busy_stream.send_all(b"GET / HTTP/1.1\r\nHo")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            results = []
            async with trio.open_nursery() as nursery:

                async def drain() -> None:
                    results.append(await listener.drain(grace=60))

                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert listener.draining
                assert await idle.at_eof()
                await idle_stream.aclose()
                await busy_stream.send_all(b"st: t\r\n\r\n")
                await fresh_stream.send_all(GET)
                for stream in (busy_stream, fresh_stream):
                    reply = await read_all(stream)
                    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
                    assert b"\r\nConnection: close\r\n" in reply
                    assert reply.endswith(b"Hello, world!\n")
                    await stream.aclose()
            # No idle timeout nor linger ran out: the clock would have moved.
            assert trio.current_time() == start
    assert [(r.finished, r.cancelled) for r in results] == [(3, 0)]


@pytest.mark.usefixtures("engine")
async def test_drain_aborts_an_unfinished_request_at_the_end_of_its_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The listener ends the drain; the sweep task then returns at once."""
    with trio.fail_after(60):
        async with (
            serving() as listener,
            await open_stream_to(listener) as stream,
        ):
            await stream.send_all(b"GET / HTTP/1.1\r\nHo")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            result = await listener.drain(grace=3)
            assert trio.current_time() - start == pytest.approx(3)
            assert (result.finished, result.cancelled) == (0, 1)
            assert await read_all(stream) == b""
        # Leaving the block waited for the sweep task, which ended with
        # the last connection.
        assert trio.current_time() - start == pytest.approx(3)


class FakeTransport:
    """What HTTPProtocol uses of a transport, recording what it is told."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_request_answered_before_the_sweep_task_wakes_says_close() -> None:
    """The drain began, but the sweep task has not run yet (the listener's
    task may serve a ready connection first): the answer still says
    Connection: close, and the connection ends after it."""
    with trio.fail_after(10):
        http = app.HTTPServer()
        drain = FakeDrain()
        transport = FakeTransport()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.run, drain)
            await trio.testing.wait_all_tasks_blocked()
            conn = http.protocol()
            conn.connection_made(transport)
            conn.data_received(GET)
            assert b"Connection: close" not in transport.data
            del transport.data[:]
            drain.draining = True  # set, but nobody woken yet
            conn.data_received(GET)
            assert transport.data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nConnection: close\r\n" in transport.data
            assert transport.eof
            drain.start()
            conn.connection_lost(None)  # the client's FIN came: run() returns
