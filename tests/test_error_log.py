"""Grouped accept-error logging: one line at once, then one per 10 s at most."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ERROR_LOG_INTERVAL, Flag, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class TrioTimes(logging.Handler):
    """Records (trio time, accept_errors, message) of each record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[float, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        count = getattr(record, "accept_errors", -1)
        self.seen.append((trio.current_time(), count, record.getMessage()))


@pytest.fixture
def log_times() -> Iterator[TrioTimes]:
    handler = TrioTimes()
    logger = logging.getLogger("trio_evlisten")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_burst_is_one_line_at_once_then_a_summary_at_the_interval(
    autojump_clock: trio.testing.MockClock, log_times: TrioTimes
) -> None:
    assert ERROR_LOG_INTERVAL == 10.0
    first_burst = [oserror(errno.EMFILE)] * 2 + [oserror(errno.ENFILE)]
    with trio.fail_after(100), ScriptedSocket(first_burst) as ssock:
        async with open_listener(echo_handler, sock=ssock) as listener:
            t0 = trio.current_time()
            async with await open_stream_to(listener) as client:
                await client.send_all(b"a")
                assert await recv_exactly(client, 1) == b"a"  # served at +70 ms
            # Quiet for a long while: the summary comes out at t0 + 10 s,
            # while the listener idles, not at the next error.
            await trio.sleep_until(t0 + 30)
            # A new burst, long after the last line: logged at once again.
            ssock.script.append(oserror(errno.ENOBUFS))
            async with await open_stream_to(listener) as client:
                await client.send_all(b"b")
                assert await recv_exactly(client, 1) == b"b"
            t1 = ssock.calls[-3]  # the ENOBUFS (then the accept, then EAGAIN)
            stats = listener.statistics()
    assert [t - t0 for t, _, _ in log_times.seen] == pytest.approx([0.0, 10.0, t1 - t0])
    assert [n for _, n, _ in log_times.seen] == [1, 2, 1]
    assert t1 >= t0 + 30
    first, summary, again = (m for _, _, m in log_times.seen)
    assert "[Errno 24] Too many open files; pausing accepts for 0.010 s" in first
    assert "EMFILE \u00d71, ENFILE \u00d71 in 10.0 s" in summary
    assert "(last: [Errno 23] Too many open files in system, then a 0.040 s pause)" in (
        summary
    )
    assert "No buffer space available; pausing accepts for 0.010 s" in again
    assert stats.errors == 4  # every error counted, whatever was logged


async def test_sustained_errors_never_log_more_than_one_line_per_interval(
    autojump_clock: trio.testing.MockClock, log_times: TrioTimes
) -> None:
    script = [oserror(errno.EMFILE) for _ in range(100)]
    with trio.fail_after(200), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"q")
            assert await recv_exactly(client, 1) == b"q"  # after all 100 errors
            end = trio.current_time()
            stats = listener.statistics()
        closed_at = trio.current_time()
    start = ssock.calls[0]
    times = [t - start for t, _, _ in log_times.seen]
    counts = [n for _, n, _ in log_times.seen]
    # 100 errors: 8 by 1.27 s, then one a second until 93.27 s.
    assert end - start == pytest.approx(94.27)
    assert times == pytest.approx([0.0, *(10.0 * k for k in range(1, 10)), 94.27])
    assert sum(counts) == 100 == stats.errors
    assert counts[0] == 1
    assert log_times.seen[-1][2].endswith("; listener closed")
    assert closed_at == pytest.approx(end)


async def test_handler_errors_are_grouped_like_accept_errors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that can make a handler raise must not be able to flood the log."""

    async def raises(listener: object, conn: trio.SocketStream, addr: object) -> None:
        kind = await conn.receive_some()
        raise {b"v": ValueError, b"k": KeyError}[kind](kind)

    async def make_it_raise(lst: object, kind: bytes) -> None:
        async with await open_stream_to(lst) as client:  # type: ignore[arg-type]
            await client.send_all(kind)
            assert await client.receive_some() == b""

    caplog.set_level(logging.ERROR, logger="trio_evlisten")
    with trio.fail_after(100):
        async with open_listener(raises, address=("127.0.0.1", 0)) as lst:
            t0 = trio.current_time()
            for kind in (b"v", b"v", b"k", b"v"):  # 4 at t0
                await make_it_raise(lst, kind)
            await trio.sleep(25)
            # t0 + 25: 10 s after the summary line, so a new burst, in full.
            await make_it_raise(lst, b"k")
            await trio.sleep(1)
            stats = lst.statistics()
            lst.socket.close()
    records = [(r.getMessage(), r.exc_info) for r in caplog.records]
    assert stats.handler_errors == 5
    assert len(records) == 3
    (first, first_exc), (summary, no_exc), (_, again_exc) = records
    assert first.startswith("handler for ")
    assert first_exc is not None
    assert first_exc[0] is ValueError
    # At t0 + 10, written by the log's own timer, not by a new error.
    assert summary.startswith(f"handlers of {lst.sockname!r} raised: ")
    assert "ValueError \u00d72, KeyError \u00d71 in 10.0 s" in summary
    assert "(last: ValueError(b'v') from " in summary
    assert no_exc is None
    assert again_exc is not None
    assert again_exc[0] is KeyError
    assert trio.current_time() >= t0 + 26


async def test_handler_error_summaries_come_after_the_block_with_handler_nursery(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The handlers outlive the block (they run in the caller's nursery), and
    # no accept task or host task is left to flush their grouped log: the
    # log's own timer writes the summary when it falls due.
    go = trio.Event()

    async def raises_later(listener: object, conn: object, addr: object) -> None:
        await go.wait()
        raise ValueError("late")

    caplog.set_level(logging.ERROR, logger="trio_evlisten")
    with trio.fail_after(100):
        async with trio.open_nursery() as outer:
            async with open_listener(
                raises_later,
                address=("127.0.0.1", 0),
                flags=Flag.CLOSE_ON_FREE,
                handler_nursery=outer,
            ) as lst:
                clients = [await open_stream_to(lst) for _ in range(3)]
                await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            go.set()
        await trio.sleep(ERROR_LOG_INTERVAL + 1)
        for client in clients:
            await client.aclose()
    assert lst.statistics().handler_errors == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("handler for ")
    assert "ValueError \u00d72 in 10.0 s" in messages[1]
    assert trio.current_time() >= t0 + ERROR_LOG_INTERVAL
