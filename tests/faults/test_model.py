"""Random sequences of API calls and connects, checked against a small model.

Hypothesis draws a list of operations; each example runs them in one
``trio.run`` (pytest-trio runs every example of an async ``@given`` test in a
fresh run) against a real listener on 127.0.0.1, with real clients. The
model: a handler runs only while the listener is open, enabled and has a
callback; connections made while the gate is shut wait in the backlog and
are served as soon as it opens; after ``close`` nothing more is accepted and
every other method raises ``trio.ClosedResourceError``; fds return to their
baseline.
"""

from __future__ import annotations

import math
import os
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import count_fds
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import open_stream_to

# Deterministic in CI (CI=1), exploring locally.
# Each example takes ~10 ms, so 200 of them cost ~2 s.
settings.register_profile(
    "faults-ci", max_examples=200, deadline=None, derandomize=True
)
settings.register_profile("faults-dev", max_examples=200, deadline=None)
PROFILE = settings.get_profile("faults-ci" if os.environ.get("CI") else "faults-dev")

OPS = (
    "enable",
    "disable",
    "set_cb",
    "set_cb_none",
    "set_error_cb",
    "set_error_cb_none",
    "close",
    "connect",
    "connect",
    "connect",
)


@attrs.define
class Model:
    enabled: bool
    has_cb: bool = True
    closed: bool = False

    @property
    def gate_open(self) -> bool:
        return not self.closed and self.enabled and self.has_cb


class Handler:
    """Reports the peer address of each connection it gets."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)

    async def __call__(
        self, listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        self.send.send_nowait(addr)


def error_cb(listener: ConnListener, exc: OSError) -> None:
    raise AssertionError(f"no accept error expected here, got {exc!r}")


async def collect(handler: Handler, expected: set[Any], served: set[Any]) -> None:
    """Wait until every address in ``expected`` was served; then check that
    nothing else was."""
    while not expected <= served:
        served.add(await handler.receive.receive())
    await trio.testing.wait_all_tasks_blocked()
    while True:
        try:
            served.add(handler.receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert served == expected, (served, expected)


@PROFILE
# The transitions that matter most, always tried first: opening the gate
# must serve what queued while it was shut, and close must be final.
@example(start_disabled=True, ops=["connect", "enable"])
@example(start_disabled=False, ops=["disable", "connect", "set_error_cb", "enable"])
@example(start_disabled=False, ops=["set_cb_none", "connect", "enable", "set_cb"])
@example(start_disabled=False, ops=["connect", "close", "connect", "enable"])
@given(start_disabled=st.booleans(), ops=st.lists(st.sampled_from(OPS), max_size=30))
async def test_random_operations_follow_the_model(
    start_disabled: bool, ops: list[str]
) -> None:
    handler = Handler()
    model = Model(enabled=not start_disabled)
    clients: list[trio.SocketStream] = []
    should_serve: set[Any] = set()
    served: set[Any] = set()
    flags = Flag.CLOSE_ON_FREE | (Flag.DISABLED if start_disabled else Flag(0))
    base = count_fds()
    with trio.fail_after(10):
        try:
            async with open_listener(
                handler, address=("127.0.0.1", 0), flags=flags
            ) as lst:
                waiting: set[Any] = set()
                for op in ops:
                    if op == "connect":
                        try:
                            client = await open_stream_to(lst)
                        except OSError:
                            assert model.closed, "refused while open"
                            continue
                        assert not model.closed, "connected after close"
                        clients.append(client)
                        waiting.add(client.socket.getsockname())
                    elif model.closed and op != "close":
                        method, args = _call(lst, handler, op)
                        with pytest.raises(trio.ClosedResourceError):
                            method(*args)
                        continue
                    else:
                        method, args = _call(lst, handler, op)
                        method(*args)
                        if op == "enable":
                            model.enabled = True
                        elif op == "disable":
                            model.enabled = False
                        elif op in ("set_cb", "set_cb_none"):
                            model.has_cb = op == "set_cb"
                        elif op == "close":
                            model.closed = True
                    if model.gate_open:
                        should_serve |= waiting
                        waiting.clear()
                    await collect(handler, should_serve, served)
                    assert lst.enabled == model.enabled
                    assert lst.closed == model.closed
                stats = lst.statistics()
                assert stats.accepted == len(should_serve)
        finally:
            for client in clients:
                await client.aclose()
    assert lst.closed
    assert count_fds() == base


def _call(lst: ConnListener, handler: Handler, op: str) -> tuple[Any, tuple[Any, ...]]:
    return {
        "enable": (lst.enable, ()),
        "disable": (lst.disable, ()),
        "set_cb": (lst.set_cb, (handler,)),
        "set_cb_none": (lst.set_cb, (None,)),
        "set_error_cb": (lst.set_error_cb, (error_cb,)),
        "set_error_cb_none": (lst.set_error_cb, (None,)),
        "close": (lst.close, ()),
    }[op]
