"""Accept errors: the three classes by errno, and the backoff that follows them.

docs/contract.md, "Accept errors". The errno paths are driven by
:class:`trio_evlisten.testing.ScriptedSocket` under ``autojump_clock``, so the
backoff schedule is asserted exactly; a subprocess with a lowered
``RLIMIT_NOFILE`` checks that a real ``EMFILE`` neither spins nor stops the
server.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from tests.conftest import LineReader, echo_handler, recv_exactly
from trio_evlisten import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    ConnListener,
    Flag,
    ListenerStatistics,
    open_listener,
    serve_listener,
)
from trio_evlisten._errors import Backoff, ErrorClass, classify
from trio_evlisten.testing import ScriptedSocket, open_stream_to

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

RETRY_NAMES = (
    "EAGAIN",
    "EINTR",
    "ECONNABORTED",
    "EPROTO",
    "EPERM",
    "ENETDOWN",
    "ENOPROTOOPT",
    "EHOSTDOWN",
    "ENONET",
    "EHOSTUNREACH",
    "EOPNOTSUPP",
    "ENETUNREACH",
    # The rest of trio's per-connection list (_ignorable_accept_errno_names).
    "ENOSR",
    "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT",
    "ETIMEDOUT",
    "ECONNRESET",
)
RESOURCE_NAMES = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
FATAL_NAMES = ("EBADF", "EINVAL", "ENOTSOCK")
UNKNOWN_ERRNO = 9999

#: The pauses after 1, 2, 3, ... consecutive errors: 10 ms doubling to 1 s.
SCHEDULE = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0)

#: The retried errnos whose OSError is not a BlockingIOError: the accept loop
#: counts these in ``statistics().retried``. (EAGAIN surfaces as
#: BlockingIOError, which the loop reads as "batch done": tested on its own.)
COUNTED_RETRY_NAMES = tuple(name for name in RETRY_NAMES if name != "EAGAIN")


def oserror(code: int) -> OSError:
    """An OSError as ``accept()`` would raise it (the subclass Python picks)."""
    return OSError(code, os.strerror(code))


def by_name(name: str) -> OSError:
    return oserror(getattr(errno, name))


def diffs(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


class ErrorRecorder:
    """An error callback that records each call and reports it on a channel."""

    def __init__(self) -> None:
        self.calls: list[tuple[ConnListener, OSError, tuple[object, ...]]] = []
        self.times: list[float] = []
        self.stats: list[ListenerStatistics] = []
        self._send, self.receive = trio.open_memory_channel[OSError](math.inf)

    def __call__(self, listener: ConnListener, exc: OSError, *args: object) -> None:
        self.calls.append((listener, exc, args))
        self.times.append(trio.current_time())
        self.stats.append(listener.statistics())
        self._send.send_nowait(exc)


async def echo_once(client: trio.SocketStream, data: bytes = b"ping") -> None:
    """Show the listener served ``client``: the echo handler sends it back."""
    await client.send_all(data)
    assert await recv_exactly(client, len(data)) == data


# ----------------------------------------------------------------------
# Unit: classify() and Backoff


@pytest.mark.parametrize("name", RETRY_NAMES)
def test_classify_retry(name: str) -> None:
    assert classify(by_name(name)) is ErrorClass.RETRY


@pytest.mark.parametrize("name", RESOURCE_NAMES)
def test_classify_resources(name: str) -> None:
    assert classify(by_name(name)) is ErrorClass.RESOURCES


@pytest.mark.parametrize(
    "exc",
    [
        *(by_name(name) for name in FATAL_NAMES),
        oserror(UNKNOWN_ERRNO),
        OSError("no errno at all"),
    ],
    ids=[*FATAL_NAMES, "unknown-9999", "errno-None"],
)
def test_classify_fatal(exc: OSError) -> None:
    assert classify(exc) is ErrorClass.FATAL


def test_backoff_schedule_and_reset() -> None:
    assert (BACKOFF_MIN, BACKOFF_MAX) == (0.010, 1.0)
    backoff = Backoff()
    assert backoff.current == 0.0
    delays = [backoff.next_delay() for _ in SCHEDULE]
    assert delays == pytest.approx(SCHEDULE)
    assert backoff.current == 1.0
    backoff.reset()
    assert backoff.current == 0.0
    assert backoff.next_delay() == pytest.approx(0.01)
    assert backoff.next_delay() == pytest.approx(0.02)


# ----------------------------------------------------------------------
# Class 1: retried at once, silently


async def test_retry_errors_are_retried_at_once_silently(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    script = [by_name(name) for name in COUNTED_RETRY_NAMES]
    recorder = ErrorRecorder()
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=recorder) as listener,
            await open_stream_to(listener) as client,
        ):
            await echo_once(client)
            stats = listener.statistics()
        assert recorder.calls == []
        assert not ssock.script
        # The scripted errors, the real accept, then the EAGAIN that ends the
        # batch: one instant, no pause anywhere.
        assert len(ssock.calls) == len(script) + 2
        assert set(ssock.calls) == {ssock.calls[0]}
        assert stats.retried == len(script)
        assert stats.errors == 0
        assert stats.accepted == 1
        assert stats.backoff == 0.0
        assert not stats.paused_by_errors
    assert [r for r in caplog.records if r.name == "trio_evlisten"] == []


@pytest.mark.parametrize("name", COUNTED_RETRY_NAMES)
async def test_a_new_connections_failure_does_not_end_a_listener_without_error_cb(
    name: str, autojump_clock: trio.testing.MockClock
) -> None:
    # Every errno trio.SocketListener skips as one connection's failure is
    # skipped here too, with no error callback to decide: the listener goes
    # on and serves the next connection.
    with trio.fail_after(10), ScriptedSocket([by_name(name)]) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock) as listener,
            await open_stream_to(listener) as client,
        ):
            await echo_once(client)
            stats = listener.statistics()
        assert (stats.retried, stats.errors, stats.accepted) == (1, 0, 1)


async def test_eagain_ends_the_batch_without_a_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = ErrorRecorder()
    script = [by_name("EAGAIN"), by_name("EAGAIN")]
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=recorder) as listener,
            await open_stream_to(listener) as client,
        ):
            await echo_once(client)
            stats = listener.statistics()
        assert recorder.calls == []
        assert len(ssock.calls) == 4
        assert set(ssock.calls) == {ssock.calls[0]}
        assert stats.errors == 0
        assert stats.accepted == 1


# ----------------------------------------------------------------------
# Class 2: out of resources


async def test_resource_errors_call_error_cb_and_back_off_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = len(SCHEDULE)
    first = [oserror(errno.EMFILE) for _ in range(n)]
    recorder = ErrorRecorder()
    with trio.fail_after(30), ScriptedSocket(first) as ssock:
        async with open_listener(echo_handler, sock=ssock) as listener:
            listener.set_error_cb(recorder, "tag", 2)
            async with await open_stream_to(listener) as client:
                await client.send_all(b"first")
                # Right after the first error the accept task is pausing.
                assert await recorder.receive.receive() is first[0]
                stats = listener.statistics()
                assert stats.paused_by_errors
                assert stats.errors == 1
                assert stats.backoff == pytest.approx(0.01)
                assert stats.accepted == 0
                assert await recv_exactly(client, 5) == b"first"
                after = listener.statistics()

            # n errors, then the real accept, then the EAGAIN ending the batch.
            assert len(ssock.calls) == n + 2
            assert diffs(ssock.calls[: n + 1]) == pytest.approx(SCHEDULE)
            assert ssock.calls[n + 1] == ssock.calls[n]
            assert [c[0] for c in recorder.calls] == [listener] * n
            assert [c[1] for c in recorder.calls] == first  # the very objects
            assert all(c[1] is e for c, e in zip(recorder.calls, first, strict=True))
            assert [c[2] for c in recorder.calls] == [("tag", 2)] * n
            # The callback runs at the failed accept() itself, before the pause.
            assert recorder.times == ssock.calls[:n]
            assert [s.errors for s in recorder.stats] == list(range(1, n + 1))
            assert [s.backoff for s in recorder.stats] == pytest.approx(SCHEDULE)
            assert after.errors == n
            assert after.accepted == 1
            assert after.retried == 0
            assert after.backoff == 0.0
            assert not after.paused_by_errors

            # The success reset the schedule: a second burst starts at 10 ms.
            second = [oserror(errno.ENOBUFS) for _ in range(3)]
            ssock.script.extend(second)
            mark = len(ssock.calls)
            async with await open_stream_to(listener) as client2:
                await echo_once(client2, b"second")
            burst = ssock.calls[mark:]
            assert len(burst) == 3 + 2
            assert diffs(burst[:4]) == pytest.approx([0.01, 0.02, 0.04])
            assert [c[1] for c in recorder.calls[n:]] == second
            stats = listener.statistics()
            assert stats.errors == n + 3
            assert stats.accepted == 2


@pytest.mark.parametrize("name", RESOURCE_NAMES)
async def test_each_resource_errno_calls_cb_once_per_error_and_pauses(
    autojump_clock: trio.testing.MockClock, name: str
) -> None:
    script = [by_name(name) for _ in range(3)]
    recorder = ErrorRecorder()
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with open_listener(
            echo_handler, sock=ssock, error_cb=recorder
        ) as listener:
            async with await open_stream_to(listener) as client:
                await echo_once(client)
            stats = listener.statistics()
        assert [c[1] for c in recorder.calls] == script
        assert [c[1].errno for c in recorder.calls] == [getattr(errno, name)] * 3
        # error_cb= given to open_listener: no extra arguments.
        assert [c[2] for c in recorder.calls] == [()] * 3
        assert diffs(ssock.calls[:4]) == pytest.approx([0.01, 0.02, 0.04])
        assert stats.errors == 3
        assert stats.accepted == 1


async def test_resource_errors_without_cb_are_logged_grouped_and_go_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    script = [oserror(errno.EMFILE), oserror(errno.ENFILE), oserror(errno.ENOMEM)]
    caplog.set_level(logging.DEBUG, logger="trio_evlisten")
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with open_listener(echo_handler, sock=ssock) as listener:
            async with await open_stream_to(listener) as client:
                await echo_once(client)
            stats = listener.statistics()
            assert not listener.closed
    # Grouped: the first error at once; the two within ERROR_LOG_INTERVAL of
    # it are counted, and reported by one line when the listener ends.
    records = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert [r.levelno for r in records] == [logging.ERROR] * 2
    assert [getattr(r, "accept_errors", None) for r in records] == [1, 2]
    assert str(script[0]) in records[0].getMessage()
    summary = records[1].getMessage()
    assert "ENFILE \u00d71, ENOMEM \u00d71 in 0.1 s" in summary, summary
    assert str(script[2]) in summary  # the last error, in full
    assert summary.endswith("listener closed")
    assert diffs(ssock.calls[:4]) == pytest.approx([0.01, 0.02, 0.04])
    assert stats.errors == 3
    assert stats.accepted == 1


async def test_existing_connections_keep_working_during_a_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = ErrorRecorder()
    with trio.fail_after(10), ScriptedSocket() as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=recorder) as listener,
            await open_stream_to(listener) as served,
        ):
            await echo_once(served, b"before")
            ssock.script.extend(oserror(errno.EMFILE) for _ in range(8))
            async with await open_stream_to(listener) as waiting:
                await recorder.receive.receive()
                # Deep in the backoff (1.27 s of pauses so far), the
                # connection already served still echoes at once.
                while len(recorder.calls) < 8:
                    await recorder.receive.receive()
                start = trio.current_time()
                assert listener.statistics().paused_by_errors
                await echo_once(served, b"during")
                assert trio.current_time() == start
                await echo_once(waiting, b"after")
                assert trio.current_time() == pytest.approx(start + 1.0)


# ----------------------------------------------------------------------
# Class 3: anything else


async def test_fatal_errors_with_cb_back_off_like_resource_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = [by_name(name) for name in FATAL_NAMES] + [oserror(UNKNOWN_ERRNO)]
    recorder = ErrorRecorder()
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with open_listener(
            echo_handler, sock=ssock, error_cb=recorder
        ) as listener:
            async with await open_stream_to(listener) as client:
                await echo_once(client)
            stats = listener.statistics()
            assert not listener.closed
        assert [c[1] for c in recorder.calls] == script
        assert diffs(ssock.calls[:5]) == pytest.approx([0.01, 0.02, 0.04, 0.08])
        assert stats.errors == 4
        assert stats.accepted == 1


@pytest.mark.parametrize("close_on_free", [False, True])
async def test_fatal_error_cb_may_close_the_listener(
    autojump_clock: trio.testing.MockClock, close_on_free: bool
) -> None:
    seen: list[OSError] = []
    called = trio.Event()

    def close_on_error(listener: ConnListener, exc: OSError) -> None:
        seen.append(exc)
        listener.close()
        assert listener.closed
        called.set()

    flags = Flag.CLOSE_ON_FREE if close_on_free else Flag(0)
    script = [oserror(errno.EBADF)]
    with trio.fail_after(100), ScriptedSocket(script) as ssock:
        # Connected before the listener starts: the error (and the close)
        # then happens at its first wake-up.
        port = ssock.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as client:
            await client.send_all(b"queued")
            async with open_listener(
                echo_handler, sock=ssock, flags=flags, error_cb=close_on_error
            ) as listener:
                await called.wait()
                assert seen == script
                assert listener.closed
                if close_on_free:
                    # The socket went with the listener, and the kernel reset
                    # the connection still queued on it.
                    assert ssock.fileno() == -1
                    with pytest.raises(trio.BrokenResourceError):
                        await client.receive_some()
                    await trio.sleep(60)
                else:
                    with trio.move_on_after(60) as waited:
                        await client.receive_some()
                    assert waited.cancelled_caught
                # Long after any backoff would have ended: nothing accepted.
                assert len(ssock.calls) == 1
                assert listener.statistics().accepted == 0
            assert listener.statistics().errors == 1
            if not close_on_free:
                # The socket is still the caller's, the connection still
                # queued on it, never taken by the closed listener.
                conn, _ = ssock.accept()
                with conn:
                    assert conn.recv(100) == b"queued"


async def test_fatal_error_cb_may_cancel_the_nursery_loopexit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def loopexit(listener: ConnListener, exc: OSError) -> None:
        listener.nursery.cancel_scope.cancel()

    script = [oserror(errno.EINVAL)]
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=loopexit) as lst,
            await open_stream_to(lst) as client,
        ):
            await client.send_all(b"x")
            # Cancelled by the callback; fail_after would end a hang.
            await trio.sleep_forever()
        # The body was cancelled and the block exited without an error, at
        # the instant of the error (no pause first).
        assert trio.current_time() == ssock.calls[0]
        assert len(ssock.calls) == 1
        assert lst.closed
        assert lst.statistics().accepted == 0


@pytest.mark.parametrize(
    "code",
    [errno.EBADF, errno.EINVAL, errno.ENOTSOCK, UNKNOWN_ERRNO],
    ids=[*FATAL_NAMES, "unknown-9999"],
)
async def test_fatal_error_without_cb_raises_out_of_open_listener(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    error = oserror(code)
    listeners: list[ConnListener] = []
    body_finished = False
    with trio.fail_after(10), ScriptedSocket([error]) as ssock:
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, check=lambda e: e is error)):
            async with open_listener(echo_handler, sock=ssock) as listener:
                listeners.append(listener)
                async with await open_stream_to(listener) as client:
                    await client.send_all(b"x")
                    await trio.sleep_forever()
                body_finished = True
        assert not body_finished
        [listener] = listeners
        assert listener.closed
        assert listener.statistics().errors == 1
        assert listener.statistics().accepted == 0
        assert len(ssock.calls) == 1
        # Raised, not logged as well.
        assert [r for r in caplog.records if r.name == "trio_evlisten"] == []


async def test_fatal_error_without_cb_raises_out_of_serve_listener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    error = oserror(errno.EBADF)
    with trio.fail_after(10), ScriptedSocket([error]) as ssock:
        # serve_listener raises open_listener's group, and the caller's
        # nursery wraps it once more.
        with pytest.RaisesGroup(
            pytest.RaisesGroup(pytest.RaisesExc(OSError, check=lambda e: e is error))
        ):
            async with trio.open_nursery() as nursery:
                listener: ConnListener = await nursery.start(
                    functools.partial(serve_listener, echo_handler, sock=ssock)
                )
                async with await open_stream_to(listener) as client:
                    await client.send_all(b"x")
                    await trio.sleep_forever()
        assert listener.closed
        assert len(ssock.calls) == 1


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EBADF])
async def test_error_cb_that_raises_ends_the_listener(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    def broken(listener: ConnListener, exc: OSError) -> None:
        raise ValueError(f"error_cb bug on errno {exc.errno}")

    with trio.fail_after(10), ScriptedSocket([oserror(code)]) as ssock:
        with pytest.RaisesGroup(
            pytest.RaisesExc(ValueError, match=f"^error_cb bug on errno {code}$")
        ):
            async with (
                open_listener(echo_handler, sock=ssock, error_cb=broken) as listener,
                await open_stream_to(listener) as client,
            ):
                await client.send_all(b"x")
                await trio.sleep_forever()
        assert listener.closed
        assert len(ssock.calls) == 1


# ----------------------------------------------------------------------
# Errors and the enable/disable gate


async def test_disable_in_error_cb_stops_accepting_until_enable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = ErrorRecorder()

    def disable_first(listener: ConnListener, exc: OSError) -> None:
        recorder(listener, exc)
        if len(recorder.calls) == 1:
            listener.disable()

    script = [oserror(errno.EMFILE), oserror(errno.ENFILE)]
    with trio.fail_after(200), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=disable_first) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"late")
            await recorder.receive.receive()
            assert not listener.enabled
            await trio.sleep(100)
            assert len(ssock.calls) == 1
            stats = listener.statistics()
            assert stats.errors == 1
            assert stats.accepted == 0
            assert not stats.paused_by_errors  # disabled, not pausing

            enabled_at = trio.current_time()
            listener.enable()
            assert await recv_exactly(client, 4) == b"late"
        # Re-enabled: accept() at once; the next error backs off from where
        # the schedule stood (no success in between), then success.
        assert ssock.calls[1:] == pytest.approx(
            [enabled_at, enabled_at + 0.02, enabled_at + 0.02]
        )
        assert [c[1] for c in recorder.calls] == script
        assert listener.statistics().accepted == 1


# ----------------------------------------------------------------------
# A real EMFILE, in a child process with a lowered RLIMIT_NOFILE

CHILD_SCRIPT = r'''
"""Run a listener whose accept() hits a real EMFILE; print JSON summaries."""
import errno
import json
import logging
import os
import resource
import sys
import time

import trio

from trio_evlisten import Flag, open_listener

MODE, N_CLIENTS, WINDOW = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
HEADROOM = 8


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    errors = []
    first_error = trio.Event()
    all_served = trio.Event()
    served = []

    def on_error(listener, exc, *args):
        errors.append([time.monotonic(), exc.errno, list(args)])
        first_error.set()

    class Recorder(logging.Handler):
        def emit(self, record):
            errors.append([time.monotonic(), record.levelname, record.getMessage()])
            first_error.set()

    log = logging.getLogger("trio_evlisten")
    log.addHandler(Recorder())
    log.propagate = False

    async def handler(listener, conn, addr):
        data = await conn.receive_some(1024)
        await conn.send_all(data)
        served.append(data.decode())
        if len(served) == N_CLIENTS:
            all_served.set()

    ballast = []
    with trio.fail_after(20):
        async with open_listener(
            handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE
        ) as listener:
            if MODE == "cb":
                listener.set_error_cb(on_error, "tag")
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + HEADROOM, hard))
            try:
                while True:
                    ballast.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
            try:
                print(json.dumps({"port": listener.port}), flush=True)
                await first_error.wait()
                wall0, cpu0, n0 = time.monotonic(), cpu(), len(errors)
                await trio.sleep(WINDOW)
                wall1, cpu1, n1 = time.monotonic(), cpu(), len(errors)
                during = listener.statistics()
            finally:
                for fd in ballast:
                    os.close(fd)
            freed = time.monotonic()
            await all_served.wait()
            recovery = time.monotonic() - freed
            after = listener.statistics()
    print(
        json.dumps(
            {
                "ballast": len(ballast),
                "errors": errors,
                "window_errors": n1 - n0,
                "window_wall": wall1 - wall0,
                "window_cpu": cpu1 - cpu0,
                "accepted_during": during.accepted,
                "paused_during": during.paused_by_errors,
                "served": sorted(served),
                "recovery": recovery,
                "accepted_after": after.accepted,
                "errors_after": after.errors,
                "backoff_after": after.backoff,
            }
        ),
        flush=True,
    )


trio.run(main)
'''


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "emfile_child.py"
    path.write_text(CHILD_SCRIPT)
    return path


async def drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    async for chunk in stream:
        into += chunk


N_CLIENTS = 3
WINDOW = 2.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cb", "log"])
async def test_real_emfile_backs_off_without_busy_loop_then_serves(
    child_script: Path, mode: str
) -> None:
    stderr = bytearray()
    summary: dict[str, Any] = {}
    with trio.fail_after(15):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(child_script), mode, str(N_CLIENTS), str(WINDOW)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, proc.stderr, stderr)
                lines = LineReader(proc.stdout)
                try:
                    port = json.loads(await lines.readline())["port"]
                    async with trio.open_nursery() as clients:
                        for i in range(N_CLIENTS):
                            clients.start_soon(echo_client, port, f"ping-{i}".encode())
                    summary = json.loads(await lines.readline())
                except EOFError as exc:
                    await proc.wait()
                    raise AssertionError(
                        f"{exc}\nchild stderr:\n{stderr.decode()}"
                    ) from exc
                await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                await proc.stdout.aclose()
                await proc.stderr.aclose()
    assert proc.returncode == 0, stderr.decode()

    errors = summary["errors"]
    # Never a busy loop: the process mostly asleep while accept() keeps
    # failing.
    assert summary["window_wall"] >= WINDOW
    assert summary["window_cpu"] < 0.5, summary
    assert summary["accepted_during"] == 0
    assert summary["paused_during"] is True
    if mode == "cb":
        # Every error reaches the callback, on the backoff schedule: each
        # gap of the real clock at least the pause.
        assert 3 <= summary["window_errors"] < 30, summary
        gaps = diffs([e[0] for e in errors])
        assert len(gaps) >= 3
        for gap, pause in zip(gaps, SCHEDULE, strict=False):
            assert gap >= pause * 0.9, (gaps, SCHEDULE)
        assert [e[1:] for e in errors] == [[errno.EMFILE, ["tag"]]] * len(errors)
        assert summary["errors_after"] == len(errors)
    else:
        # Logged grouped: the first error at once, then nothing within
        # ERROR_LOG_INTERVAL (10 s) of it; the rest in one line at the end.
        assert summary["window_errors"] == 0, summary
        assert [e[1] for e in errors] == ["ERROR", "ERROR"], errors
        assert os.strerror(errno.EMFILE) in errors[0][2]
        assert "pausing accepts for 0.010 s" in errors[0][2]
        grouped = re.search(r"EMFILE \u00d7(\d+) in ", errors[1][2])
        assert grouped is not None, errors[1]
        assert int(grouped[1]) >= 3
        assert summary["errors_after"] == 1 + int(grouped[1])
    # Freed fds: every queued connection is served, within the longest pause.
    assert summary["served"] == [f"ping-{i}" for i in range(N_CLIENTS)]
    assert summary["recovery"] < BACKOFF_MAX + 1.0
    assert summary["accepted_after"] == N_CLIENTS
    assert summary["backoff_after"] == 0.0


async def echo_client(port: int, data: bytes) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        await client.send_all(data)
        assert await recv_exactly(client, len(data)) == data
        assert await client.receive_some() == b""
