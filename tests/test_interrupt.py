"""KeyboardInterrupt and SystemExit leave open_listener bare, wherever raised.

So that ``except KeyboardInterrupt`` around ``trio.run`` works under load
too: Trio raises Ctrl-C's KeyboardInterrupt in whichever task is running,
often a handler.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_evlisten import ConnListener, Flag, open_listener, serve_listener
from trio_evlisten.testing import open_stream_to

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE
if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

ECHO = Path(__file__).resolve().parent.parent / "examples" / "echo.py"


async def interrupting(
    listener: ConnListener, conn: trio.SocketStream, addr: Any
) -> None:
    await conn.receive_some()
    raise KeyboardInterrupt


async def serve_one_client(**options: Any) -> None:
    """Open a listener, connect a client that sends a byte, wait forever."""
    async with (
        open_listener(address=LOCAL, flags=FREE, **options) as lst,
        await open_stream_to(lst) as client,
    ):
        await client.send_all(b"x")
        await trio.sleep_forever()


async def test_keyboard_interrupt_from_a_handler_leaves_bare() -> None:
    with trio.fail_after(5), pytest.raises(KeyboardInterrupt) as caught:
        await serve_one_client(cb=interrupting)
    assert type(caught.value) is KeyboardInterrupt


async def test_keyboard_interrupt_from_serve_listener_leaves_bare() -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            lst = await nursery.start(
                lambda task_status: serve_listener(
                    interrupting, address=LOCAL, flags=FREE, task_status=task_status
                )
            )
            async with await open_stream_to(lst) as client:
                await client.send_all(b"x")
                await trio.sleep_forever()

    # Out of the serve_listener task bare: only the caller's own nursery
    # wraps it (Trio's rule for that nursery), one level, not ours too.
    with trio.fail_after(5), pytest.RaisesGroup(KeyboardInterrupt):
        await scenario()


async def test_system_exit_from_the_error_callback_leaves_bare() -> None:
    def exit_on_error(listener: ConnListener, error: OSError) -> None:
        raise SystemExit(3)

    async def scenario() -> None:
        async with open_listener(
            None, address=LOCAL, flags=FREE, error_cb=exit_on_error
        ) as lst:
            lst.socket.close()  # the next accept fails: EBADF
            lst.set_cb(interrupting)
            await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(SystemExit, match="3"):
        await scenario()


async def test_what_failed_beside_the_interrupt_is_kept_as_its_cause() -> None:
    async def fails(listener: ConnListener, conn: trio.SocketStream, addr: Any) -> None:
        if await conn.receive_some() == b"x":
            raise KeyboardInterrupt
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("beside it")

    async def scenario() -> None:
        async with (
            open_listener(
                fails, address=LOCAL, flags=FREE, handler_errors="raise"
            ) as lst,
            await open_stream_to(lst) as other,
            await open_stream_to(lst) as interrupter,
        ):
            await other.send_all(b"o")
            await trio.testing.wait_all_tasks_blocked()
            await interrupter.send_all(b"x")
            await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(KeyboardInterrupt) as caught:
        await scenario()
    rest = caught.value.__cause__
    assert isinstance(rest, BaseExceptionGroup)
    assert rest.subgroup(ValueError) is not None
    assert rest.subgroup(KeyboardInterrupt) is None


def _free_port() -> int:
    # The echo example binds 0.0.0.0 with SO_REUSEADDR: probe the same way.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("0.0.0.0", 0))
        port: int = probe.getsockname()[1]
        return port


def _hammer(port: int, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            while not stop.is_set():
                s.sendall(b"x" * 64)
                got = 0
                while got < 64:
                    chunk = s.recv(64 - got)
                    if not chunk:
                        return
                    got += len(chunk)
    except OSError:
        pass  # the server went away: expected at the end
    except BaseException as exc:  # pragma: no cover - a bug in the client
        errors.append(exc)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
def test_ctrl_c_under_load_exits_quietly(run: int) -> None:
    """The new user's finding: SIGINT with 8 busy clients printed a traceback."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ECHO), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stop, errors = threading.Event(), []  # type: ignore[var-annotated]
    threads = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"Echo server listening")
        threads = [
            threading.Thread(target=_hammer, args=(port, stop, errors))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # a real process under real load: let it get busy
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        if proc.poll() is None:  # pragma: no cover - it hung
            proc.kill()
            proc.communicate()
    assert not errors
    assert b"Traceback" not in stderr, stderr.decode()
    assert proc.returncode == 0
