"""Resource exhaustion: EMFILE for real, ENFILE/ENOMEM/ENOBUFS scripted.

``tests/test_errors.py`` checks the backoff schedule for short bursts and a
real EMFILE caused by ballast fds. Here: a real EMFILE caused by the
connections themselves (held clients use up the fds; closing one lets a
queued one in), a simulated minute of sustained exhaustion for each errno
(reports counted against the schedule), and several errors or wake-ups
within one pause scheduling one resume.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import LineReader, echo_handler, recv_exactly
from tests.faults._support import Counter, child_process, oserror, stderr_of
from trio_evlisten import ERROR_LOG_INTERVAL, open_listener
from trio_evlisten.testing import ScriptedSocket, open_stream_to

RESOURCE_ERRNOS = {
    "EMFILE": errno.EMFILE,
    "ENFILE": errno.ENFILE,
    "ENOMEM": errno.ENOMEM,
    "ENOBUFS": errno.ENOBUFS,
}


def expected_times(duration: float) -> list[float]:
    """Offsets of accept() calls under sustained errors, from the first one.

    10 ms doubling to 1 s: 7 steps (1.27 s) to reach 1 s, then one a second.
    """
    times, t, delay = [0.0], 0.0, 0.01
    while t + delay <= duration:
        t += delay
        times.append(t)
        delay = min(delay * 2, 1.0)
    return times


def test_expected_times_matches_the_design() -> None:
    times = expected_times(60.0)
    assert times[:9] == pytest.approx(
        [0, 0.01, 0.03, 0.07, 0.15, 0.31, 0.63, 1.27, 2.27]
    )
    assert len(times) == 66  # 8 by 1.27 s, then 58 more (2.27 .. 59.27 s)


@pytest.mark.parametrize("name", sorted(RESOURCE_ERRNOS))
@pytest.mark.parametrize("report", ["error_cb", "log"])
async def test_a_minute_of_sustained_exhaustion_reports_once_per_backoff_step(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    name: str,
    report: str,
) -> None:
    code = RESOURCE_ERRNOS[name]
    counter = Counter()
    # More errors than a minute can use: the script never runs dry.
    script = [oserror(code) for _ in range(200)]
    with trio.fail_after(120), ScriptedSocket(script) as ssock:
        async with (
            open_listener(
                echo_handler,
                sock=ssock,
                error_cb=counter if report == "error_cb" else None,
            ) as listener,
            await open_stream_to(listener) as client,
        ):
            await client.send_all(b"queued")
            await trio.testing.wait_all_tasks_blocked()
            start = ssock.calls[0]
            await trio.sleep(60 - (trio.current_time() - start))
            stats = listener.statistics()
            assert stats.paused_by_errors
            assert stats.backoff == 1.0
            assert stats.accepted == 0
            # Exhaustion ends: the queued client is served at the next
            # step, at most 1 s later.
            ssock.script.clear()
            assert await recv_exactly(client, 6) == b"queued"
            assert trio.current_time() - start <= 61.0
    expected = expected_times(60.0)
    calls = [t - start for t in ssock.calls]
    errors_calls = calls[: len(expected)]
    assert errors_calls == pytest.approx(expected)
    records = [r for r in caplog.records if r.name == "trio_evlisten"]
    if report == "error_cb":
        assert [t - start for t in counter.times] == pytest.approx(expected)
        assert counter.errnos == [code] * len(expected)
        assert records == []
    else:
        # Grouped (ERROR_LOG_INTERVAL): the first error at once, then one
        # summary line every 10 s while the errors go on (at 10, 20, .. 60 s),
        # each counting the errors since the line before.
        assert ERROR_LOG_INTERVAL == 10.0
        lines_at = [0.0, *(10.0 * k for k in range(1, 7))]
        counts = [1] + [
            sum(1 for t in expected if lo < t <= hi)
            for lo, hi in itertools.pairwise(lines_at)
        ]
        assert counts == [1, 15, 10, 10, 10, 10, 10]
        assert [getattr(r, "accept_errors", None) for r in records] == counts
        assert sum(counts) == len(expected)
        assert {r.levelno for r in records} == {logging.ERROR}
        assert str(code) in records[0].getMessage()
        for record, count in zip(records[1:], counts[1:], strict=True):
            assert f"{name} \u00d7{count} in 10.0 s" in record.getMessage()
    assert stats.errors == len(expected)


async def test_several_queued_connections_fail_once_per_wakeup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ten queued clients and a failing accept(): one error per wake-up.

    The first error ends the batch; the others are not tried in the same
    instant (no burst of callbacks), and exactly one resume is scheduled.
    """
    counter = Counter()
    script = [oserror(errno.ENOBUFS) for _ in range(3)]
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with open_listener(echo_handler, sock=ssock, error_cb=counter) as lst:
            clients = [await open_stream_to(lst) for _ in range(10)]
            try:
                for i, client in enumerate(clients):
                    await client.send_all(b"%d" % i)
                for i, client in enumerate(clients):
                    assert await recv_exactly(client, 1) == b"%d" % i
            finally:
                for client in clients:
                    await client.aclose()
    # 3 errors, each alone at its instant, 10 ms, 20 ms, 40 ms apart; then the
    # 10 accepts and the EAGAIN all in one batch at the last resume.
    first_three = ssock.calls[:4]
    assert [b - a for a, b in itertools.pairwise(first_three)] == pytest.approx(
        [0.01, 0.02, 0.04]
    )
    assert len(counter.times) == 3
    assert len(set(counter.times)) == 3
    assert ssock.calls[3:] == [ssock.calls[3]] * 11
    assert lst.statistics().accepted == 10


async def test_retried_errors_then_a_resource_error_in_one_batch_pause_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = Counter()
    script = [
        oserror(errno.ECONNABORTED),
        oserror(errno.EPROTO),
        oserror(errno.EMFILE),
        oserror(errno.ECONNABORTED),
        oserror(errno.ENFILE),
    ]
    with trio.fail_after(10), ScriptedSocket(script) as ssock:
        async with (
            open_listener(echo_handler, sock=ssock, error_cb=counter) as lst,
            await open_stream_to(lst) as client,
        ):
            await client.send_all(b"x")
            assert await recv_exactly(client, 1) == b"x"
            stats = lst.statistics()
    t0 = ssock.calls[0]
    # Wake-up 1: two retries and the EMFILE at one instant, one report.
    # Wake-up 2 (10 ms later): a retry and the ENFILE, one report.
    # Wake-up 3 (20 ms later): the accept and the EAGAIN.
    assert [t - t0 for t in ssock.calls] == pytest.approx(
        [0, 0, 0, 0.01, 0.01, 0.03, 0.03]
    )
    assert counter.errnos == [errno.EMFILE, errno.ENFILE]
    assert stats.retried == 3
    assert stats.errors == 2


async def test_wakeups_during_a_pause_do_not_resume_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """enable(), set_cb(), set_error_cb() during a pause wake the accept task;
    it must go back to sleep until the scheduled resume, not retry early."""
    counter = Counter()
    with trio.fail_after(10), ScriptedSocket() as ssock:
        async with open_listener(echo_handler, sock=ssock, error_cb=counter) as lst:
            ssock.script.extend(oserror(errno.EMFILE) for _ in range(8))
            async with await open_stream_to(lst) as client:
                await client.send_all(b"late")
                while len(counter.times) < 8:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.sleep(0.001)
                # Now in a 1 s pause.
                resume = counter.times[-1] + 1.0
                for _ in range(50):
                    lst.enable()
                    lst.set_cb(echo_handler)
                    lst.set_error_cb(counter)
                    lst.disable()
                    lst.enable()
                    await trio.sleep(0.01)
                assert len(ssock.calls) == 8
                assert await recv_exactly(client, 4) == b"late"
                assert trio.current_time() == pytest.approx(resume)
    assert ssock.calls[8] == pytest.approx(resume)
    assert len(counter.times) == 8


# ----------------------------------------------------------------------
# A real EMFILE, where the held connections themselves use up the fds

CHILD = r'''
"""Echo server whose fds run out by its own connections; commands on stdin."""
import asyncio, errno, json, os, resource, sys, time
import trio
from trio_evlisten import Flag, _engine, open_listener

FREE = int(sys.argv[1])
# "task", or "protocol-epoll"/"protocol-tasks": protocol mode, that engine.
MODE = sys.argv[2]

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

async def main():
    errors = []

    def on_error(listener, exc):
        errors.append([time.monotonic(), exc.errno])

    async def echo(listener, conn, addr):
        async for data in conn:
            await conn.send_all(data)

    stdin = trio.lowlevel.FdStream(os.dup(0))
    options = dict(
        address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE, error_cb=on_error
    )
    if MODE == "task":
        listening = open_listener(echo, **options)
    else:
        _engine.ENGINE = MODE.split("-")[1]
        listening = open_listener(protocol=Echo, **options)
    async with listening as listener:
        # Leave exactly FREE fds: the limit is what is open now plus FREE.
        # (Ballast fills any gap below the highest fd, then is closed again.)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + FREE, hard))
        holes = []
        try:
            while True:
                fd = os.open(os.devnull, os.O_RDONLY)
                if fd > highest:
                    os.close(fd)
                    break
                holes.append(fd)
        finally:
            pass
        print(json.dumps({"port": listener.port}), flush=True)
        buf = b""
        while True:
            while b"\n" not in buf:
                buf += await stdin.receive_some()
            line, _, buf = buf.partition(b"\n")
            s = listener.statistics()
            print(json.dumps({"errors": errors, "accepted": s.accepted,
                              "active": s.active, "backoff": s.backoff,
                              "paused": s.paused_by_errors}), flush=True)
            if line == b"quit":
                listener.close()
                break
        for fd in holes:
            os.close(fd)
        await stdin.aclose()

trio.run(main)
'''

FREE = 4
WAITING = 3


async def ask(
    proc: trio.Process, lines: LineReader, command: bytes
) -> dict[str, object]:
    assert proc.stdin is not None
    await proc.stdin.send_all(command + b"\n")
    return await lines.read_json()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["task", "protocol-epoll", "protocol-tasks"])
async def test_real_emfile_from_held_connections_then_one_closes(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "emfile_by_connections.py"
    script.write_text(CHILD)
    with trio.fail_after(20):
        async with child_process(str(script), str(FREE), mode) as proc:
            assert proc.stdout is not None
            lines = LineReader(proc.stdout)
            try:
                port = (await lines.read_json())["port"]
            except EOFError as exc:
                await proc.wait()
                raise AssertionError(await stderr_of(proc)) from exc
            held: list[trio.SocketStream] = []
            waiting: list[trio.SocketStream] = []
            try:
                # FREE connections take the last fds, and are served.
                for i in range(FREE):
                    held.append(await trio.open_tcp_stream("127.0.0.1", port))
                    await held[-1].send_all(b"held%d" % i)
                    assert await recv_exactly(held[-1], 5) == b"held%d" % i
                # The next ones stay in the kernel queue: accept() -> EMFILE.
                for i in range(WAITING):
                    waiting.append(await trio.open_tcp_stream("127.0.0.1", port))
                    await waiting[-1].send_all(b"wait%d" % i)
                # During 1.5 s of exhaustion the held connections still echo
                # at once, again and again.
                t_end = trio.current_time() + 1.5
                rounds = 0
                while trio.current_time() < t_end:
                    for i, stream in enumerate(held):
                        t0 = time.monotonic()
                        await stream.send_all(b"again%d" % i)
                        assert await recv_exactly(stream, 6) == b"again%d" % i
                        assert time.monotonic() - t0 < 0.5
                    rounds += 1
                    await trio.sleep(0.05)
                assert rounds >= 10
                during = await ask(proc, lines, b"stats")
                # Closing one held connection frees one fd: one waiting
                # client gets in within the 1 s top pause (plus slack).
                freed_at = time.monotonic()
                await held.pop().aclose()
                assert await recv_exactly(waiting[0], 5) == b"wait0"
                recovery = time.monotonic() - freed_at
                # Free the rest: everyone queued is served.
                for stream in held:
                    await stream.aclose()
                held.clear()
                for i, stream in enumerate(waiting[1:], 1):
                    assert await recv_exactly(stream, 5) == b"wait%d" % i
                for stream in waiting:
                    await stream.aclose()
                waiting.clear()
                await trio.sleep(0.1)
                after = await ask(proc, lines, b"quit")
            finally:
                for stream in held + waiting:
                    await stream.aclose()
            assert await proc.wait() == 0, await stderr_of(proc)

    errors = during["errors"]
    assert isinstance(errors, list)
    # Real EMFILE, reported once per backoff step: ~8 in 1.5 s, never a spin.
    assert 4 <= len(errors) <= 12, errors
    assert {e[1] for e in errors} == {errno.EMFILE}
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(errors)]
    for gap, step in zip(
        gaps, [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0], strict=False
    ):
        assert gap >= step * 0.9, gaps
    assert during["accepted"] == FREE
    assert during["paused"] is True
    assert recovery < 1.0 + 0.5, recovery
    assert after["accepted"] == FREE + WAITING
    assert after["backoff"] == 0.0
    assert after["active"] == 0
    assert math.isfinite(recovery)
