"""python -m trio_evlisten.workers: N processes on one port, restarted, stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

import trio_evlisten._supervisor
from tests.conftest import recv_exactly
from trio_evlisten._supervisor import Supervisor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

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
async def supervisor(
    *args: str, new_session: bool = False
) -> AsyncIterator[tuple[trio.Process, Log]]:
    """Run the supervisor; on the way out, make sure it (and so its workers) ended.

    ``new_session``: in a process group of its own, as a shell starts a job
    (``os.killpg`` then does what Ctrl-C in a terminal does).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_evlisten.workers", *args],
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
        env=env,
        start_new_session=new_session,
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


def workers_of(supervisor_pid: int) -> list[int]:
    """The live processes started as workers of ``supervisor_pid``, from /proc."""
    mark = f"--worker-of\0{supervisor_pid}\0".encode()
    pids = []
    for entry in os.listdir("/proc"):
        # Not a process, or one gone meanwhile: OSError.
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if mark in f.read():
                pids.append(int(entry))
    return pids


#: When to stop the supervisor, after it logged its start (the package is
#: imported then): while its workers are being started or are starting.
#: ("Ctrl-C" is SIGINT to the whole process group, as a terminal sends it.)
STOPS = [
    ("SIGINT", 0.0),
    ("SIGTERM", 0.02),
    ("Ctrl-C", 0.05),
    ("SIGINT", 0.1),
    ("SIGTERM", 0.2),
    ("Ctrl-C", 0.4),
]


@pytest.mark.parametrize(("how", "delay"), STOPS)
async def test_a_stop_during_start_up_reaps_every_worker_without_a_traceback(
    how: str, delay: float
) -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers", "8", "--port", "0", new_session=how == "Ctrl-C"
        ) as (proc, log):
            await log.wait_for(r"supervisor pid \d+: 8 workers")
            await trio.sleep(delay)
            if how == "Ctrl-C":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.Signals[how])
            assert await proc.wait() == 0, log.lines
            # Checked at once: an orphan would go by itself within a second
            # or so (it watches its parent).
            assert workers_of(proc.pid) == []
    text = "\n".join(log.lines)
    assert "Traceback" not in text, text
    for pid in re.findall(r"worker \d+ started, pid (\d+)", text):
        # Reaped by the supervisor: it logs that after waiting for it.
        assert re.search(rf"\(pid {pid}\) exited: ", text), text
        assert gone(int(pid))


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


async def test_workers_serve_a_protocol_factory() -> None:
    with trio.fail_after(60):
        async with supervisor(
            "--workers",
            "2",
            "--port",
            "0",
            "--protocol",
            "tests.workers_app:PidEchoProtocol",
        ) as (proc, log):
            port, pids = await started(log, 2)
            assert log.count(r"protocol tests\.workers_app:PidEchoProtocol") == 1
            assert await served_by(port, set(pids)) == set(pids)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        assert log.count(r"exited: exit status 0") == 2
        assert not log.count("Traceback")


async def test_workers_protocol_defaults_to_the_echo_protocol() -> None:
    with trio.fail_after(60):
        async with supervisor("--workers", "1", "--port", "0", "--protocol") as (
            proc,
            log,
        ):
            port, _ = await started(log, 1)
            assert log.count(r"protocol trio_evlisten\._cli:EchoProtocol") == 1
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                await conn.send_all(b"echo?")
                assert await recv_exactly(conn, 5) == b"echo?"
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


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
        (
            ["--port", "0", "--protocol", "x:y", "tests.workers_app:pid_echo"],
            "or --protocol x:y, not both",
        ),
        (
            ["--port", "0", "--protocol", "tests.workers_app:pid_echo"],
            "is an async function: that is an accept callback",
        ),
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


# --- the supervisor in-process: stops that come while workers start ----------

#: A worker that only waits, and dies of SIGTERM (returncode -15).
SLEEPER = ["sleep", "60"]


@attrs.define(eq=False)
class Spawns:
    """Stands in for ``trio.lowlevel.open_process``: each start of a worker
    first awaits ``before(n)`` (n counts the starts from 0), then starts a
    real process; every process is kept, to check it was signalled and
    reaped."""

    before: Callable[[int], Awaitable[object]]
    commands: Callable[[int], list[str]] = lambda n: SLEEPER
    #: The processes, by the number of their start.
    procs: dict[int, trio.Process] = attrs.field(factory=dict)
    _calls: int = 0
    _real: Any = trio.lowlevel.open_process

    async def __call__(self, command: list[str], **options: Any) -> trio.Process:
        n = self._calls
        self._calls += 1
        await self.before(n)
        proc: trio.Process = await self._real(self.commands(n), **options)
        self.procs[n] = proc
        return proc

    async def reap(self) -> None:
        """After a failed test: leave no process (nor its pidfd) behind."""
        with trio.CancelScope(shield=True):
            for proc in self.procs.values():
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


@contextlib.contextmanager
def on_log(pattern: str) -> Iterator[trio.Event]:
    """An event set when the supervisor logs a line matching ``pattern``."""
    event = trio.Event()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if re.search(pattern, record.getMessage()):
                event.set()

    handler = Catch()
    log = logging.getLogger("trio_evlisten.workers")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield event
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def supervisor_of(workers: int, *, max_restarts: int = 10) -> Supervisor:
    return Supervisor(
        SLEEPER,
        workers,
        max_restarts=max_restarts,
        restart_window=60.0,
        shutdown_timeout=10.0,
    )


async def test_a_signal_while_workers_start_stops_every_one_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM comes while the second worker is being started: the one that
    # runs gets SIGTERM, the one under way gets it as soon as it exists.
    with on_log("got SIGTERM: stopping") as stopping:

        async def before(n: int) -> None:
            if n == 1:
                # Safe: run() listens for SIGTERM while it starts workers.
                os.kill(os.getpid(), signal.SIGTERM)
                await stopping.wait()

        spawns = Spawns(before)
        monkeypatch.setattr(trio.lowlevel, "open_process", spawns)
        try:
            with trio.fail_after(20):
                assert await supervisor_of(6).run() == 0
        finally:
            await spawns.reap()
    assert 1 in spawns.procs  # the one under way when SIGTERM came
    for proc in spawns.procs.values():
        assert proc.returncode == -signal.SIGTERM, proc
        assert gone(proc.pid)


async def test_a_crash_loop_that_gives_up_while_workers_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first worker dies at once; with no restart allowed the supervisor
    # gives up while the others are still being started.
    with on_log("giving up") as gave_up:

        async def before(n: int) -> None:
            if n > 0:
                await gave_up.wait()

        spawns = Spawns(before, commands=lambda n: ["false"] if n == 0 else SLEEPER)
        monkeypatch.setattr(trio.lowlevel, "open_process", spawns)
        try:
            with trio.fail_after(20):
                assert await supervisor_of(4, max_restarts=0).run() == 1
        finally:
            await spawns.reap()
    first, *others = (spawns.procs[n] for n in sorted(spawns.procs))
    assert first.returncode == 1
    for proc in others:
        assert proc.returncode == -signal.SIGTERM, proc
    assert all(gone(proc.pid) for proc in spawns.procs.values())


async def test_a_second_signal_kills_a_worker_still_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        on_log("got SIGINT: stopping") as stopping,
        on_log("killing the workers now") as killing,
    ):

        async def before(n: int) -> None:
            if n == 1:
                # One at a time: trio delivers a signal still pending once.
                os.kill(os.getpid(), signal.SIGINT)
                await stopping.wait()
                os.kill(os.getpid(), signal.SIGINT)
                await killing.wait()

        spawns = Spawns(before)
        monkeypatch.setattr(trio.lowlevel, "open_process", spawns)
        try:
            with trio.fail_after(20):
                assert await supervisor_of(3).run() == 0
        finally:
            await spawns.reap()
    # Started after "kill now": SIGKILL, not SIGTERM.
    assert spawns.procs[1].returncode == -signal.SIGKILL
    for proc in spawns.procs.values():
        assert proc.returncode in (-signal.SIGTERM, -signal.SIGKILL), proc


def test_a_signal_before_the_supervisor_listens_starts_no_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hold = trio_evlisten._supervisor.hold_stop_signals
    spawns = Spawns(trio.sleep)
    monkeypatch.setattr(trio.lowlevel, "open_process", spawns)
    with hold() as held:
        os.kill(os.getpid(), signal.SIGINT)  # held: no KeyboardInterrupt
        assert held == [signal.SIGINT]
        supervisor = Supervisor(SLEEPER, 4, 10, 60.0, 10.0, held_signals=held)
        assert trio.run(supervisor.run) == 0
        assert spawns.procs == {}
        # A second one is "stop now": Python's own KeyboardInterrupt.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
