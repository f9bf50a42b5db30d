"""Shared helpers for the fault tests: a client process, line reading, fds."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tests.conftest import LineReader

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trio_evlisten import ConnListener

CLIENTS_SCRIPT = Path(__file__).with_name("_clients.py")


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def oserror(code: int) -> OSError:
    """An OSError as ``accept()`` would raise it."""
    return OSError(code, os.strerror(code))


@asynccontextmanager
async def child_process(*argv: str) -> AsyncIterator[trio.Process]:
    """Run ``python argv...`` with pipes; kill and reap it however we leave.

    Resource handling:
        The process is killed if still running, waited for, and its three
        pipes closed on exit, so no fd outlives the block.
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()


@asynccontextmanager
async def client_process(
    port: int, n: int, *, deadline: float, inflight: int, hold: bool
) -> AsyncIterator[tuple[trio.Process, LineReader]]:
    """Run ``_clients.py`` against ``port`` (see its docstring).

    The clients connect from a random address in 127.0.0.0/8, whose
    ephemeral ports no earlier test has left in TIME_WAIT.
    """
    a, b, c = random.randrange(1, 255), random.randrange(256), random.randrange(1, 255)
    source = f"127.{a}.{b}.{c}"
    argv = (str(CLIENTS_SCRIPT), str(port), str(n), str(deadline), str(inflight))
    async with child_process(*argv, "1" if hold else "0", source) as proc:
        assert proc.stdout is not None
        yield proc, LineReader(proc.stdout)


async def stderr_of(proc: trio.Process) -> str:
    """Whatever the (finished) process wrote to stderr, for failure messages."""
    assert proc.stderr is not None
    out = bytearray()
    with trio.move_on_after(1):
        async for chunk in proc.stderr:
            out += chunk
    return out.decode(errors="replace")


class Counter:
    """An error callback that records when it was called, and with which errno."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.errnos: list[int | None] = []

    def __call__(self, listener: ConnListener, exc: OSError) -> None:
        self.times.append(trio.current_time())
        self.errnos.append(exc.errno)
