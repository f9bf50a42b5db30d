"""python -m trio_evlisten.workers: N processes on one port, restarted, stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from tests.conftest import recv_exactly

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@attrs.define(eq=False)
class Log:
    """The supervisor's stderr, line by line, with a way to wait for a line."""

    lines: list[str] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _seen: int = 0

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in done]
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The next line (after the last one matched) that matches ``pattern``."""
        while True:
            for i in range(self._seen, len(self.lines)):
                match = re.search(pattern, self.lines[i])
                if match:
                    self._seen = i + 1
                    return match
            await self._changed.wait()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


@asynccontextmanager
async def supervisor(*args: str) -> AsyncIterator[tuple[trio.Process, Log]]:
    """Run the supervisor; on the way out, make sure it (and so its workers) ended."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_evlisten.workers", *args],
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
        env=env,
    )
    log = Log()
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(log.pump, proc.stderr)
            try:
                yield proc, log
            finally:
                if proc.returncode is None:
                    # A failed test: stop it the documented way first.
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    finally:
        if proc.stderr is not None:
            await proc.stderr.aclose()


async def started(log: Log, n: int) -> tuple[int, list[int]]:
    """The port, and the pids of the first ``n`` workers to serve."""
    port = int((await log.wait_for(r"\d+ workers on 127\.0\.0\.1:(\d+)"))[1])
    pids = [
        int((await log.wait_for(r"worker pid (\d+) serving on"))[1]) for _ in range(n)
    ]
    return port, pids


async def ask_pid(port: int) -> int:
    """Connect, read the worker's pid line, check an echo."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await conn.receive_some(64)
            assert chunk, line
            line += chunk
        await conn.send_all(b"ping")
        assert await recv_exactly(conn, 4) == b"ping"
        return int(line)


async def served_by(port: int, want: set[int]) -> set[int]:
    """Connect until every pid in ``want`` has served one (at most 200 tries)."""
    seen: set[int] = set()
    for _ in range(200):
        seen.add(await ask_pid(port))
        if want <= seen:
            break
    return seen


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists (not even as a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_workers_share_the_port_restart_and_stop() -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers", "2", "--port", "0", "tests.workers_app:pid_echo"
        ) as (proc, log):
            port, pids = await started(log, 2)
            a, b = pids
            assert a != b
            # The kernel spreads connections over both listeners.
            assert await served_by(port, {a, b}) == {a, b}

            os.kill(a, signal.SIGKILL)
            await log.wait_for(rf"worker \d \(pid {a}\) died: killed by SIGKILL")
            c = int((await log.wait_for(r"worker pid (\d+) serving on"))[1])
            assert c not in (a, b)
            assert gone(a)  # reaped by the supervisor
            assert await served_by(port, {b, c}) == {b, c}

            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        assert gone(b)
        assert gone(c)
        assert log.count(r"exited: exit status 0") == 2
        assert log.count(r"SIGKILL") == 1  # only our own kill -9
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_crash_loop_makes_the_supervisor_give_up() -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers", "2", "--port", "0", "--max-restarts", "1"
        ) as (proc, log):
            port, (a, b) = await started(log, 2)
            # The default handler echoes.
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                await conn.send_all(b"echo?")
                assert await recv_exactly(conn, 5) == b"echo?"
            os.kill(a, signal.SIGKILL)
            c = int((await log.wait_for(r"worker pid (\d+) serving on"))[1])
            os.kill(c, signal.SIGKILL)
            assert await proc.wait() == 1
        await log.wait_for(r"more than 1 worker restarts within 60 s: giving up")
        assert gone(a)
        assert gone(b)
        assert gone(c)


async def test_a_worker_that_does_not_stop_is_killed() -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers",
            "1",
            "--port",
            "0",
            "--shutdown-timeout",
            "1",
            "--drain-timeout",
            "0.1",
            "tests.workers_app:stuck_echo",
        ) as (proc, log):
            port, (a,) = await started(log, 1)
            assert await ask_pid(port) == a  # leaves its stuck thread behind
            start = trio.current_time()
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
            elapsed = trio.current_time() - start
        await log.wait_for(rf"worker pid {a} did not stop: SIGKILL")
        assert 1.0 <= elapsed < 10
        assert gone(a)


async def test_workers_behind_a_proxy() -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers",
            "1",
            "--port",
            "0",
            "--proxy-protocol",
            "--proxy-trusted=127.0.0.0/8",
            "tests.workers_app:addr_echo",
        ) as (proc, log):
            port, _ = await started(log, 1)
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                await conn.send_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 4242 80\r\nhi")
                expected = b"('198.51.100.7', 4242)\nhi"
                assert await recv_exactly(conn, len(expected)) == expected
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--port", "0", "no_such_module_xyz:f"],
            "No module named 'no_such_module_xyz'",
        ),
        (["--port", "0", "tests.workers_app:nope"], "tests.workers_app has no nope"),
        (["--port", "0", "tests.workers_app"], "must be MODULE:FUNC"),
        (["--port", "0", "--workers", "0"], "--workers must be >= 1, not 0"),
        (["--port", "70000"], "--port must be in 0..65535, not 70000"),
        (["--port", "0", "--proxy-trusted", "::1"], "needs --proxy-protocol"),
        (
            ["--port", "0", "--proxy-protocol", "--proxy-trusted", "nope"],
            "proxy_trusted item 'nope' is not a network",
        ),
    ],
)
async def test_bad_command_lines(args: list[str], message: str) -> None:
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_evlisten.workers", *args],
            capture_stderr=True,
            check=False,
            cwd=str(ROOT),
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
    assert result.returncode == 2
    assert message in result.stderr.decode()
