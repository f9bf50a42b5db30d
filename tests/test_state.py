"""ListenerState alone: the verdict table, the counts and the transitions.

No sockets and no tasks: the state machine knows nothing of its owner, so it
is driven here directly, as h11 tests its ``_state.py``. Each row of the
table in the module's docstring has a test.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import trio

from trio_evlisten import Flag
from trio_evlisten._state import ListenerState, Verdict

NO_FLAGS = Flag(0)


async def cb(*args: Any) -> None:
    pass  # pragma: no cover - never called


def state(
    *,
    flags: Flag = NO_FLAGS,
    max_connections: int | None = None,
    max_pending: int = 10,
    preamble: bool = False,
) -> ListenerState:
    return ListenerState(
        flags, cb, (), None, (), max_connections, max_pending, preamble=preamble
    )


async def test_a_new_state_accepts() -> None:
    assert state().may_accept(0.0) is Verdict.ACCEPT


async def test_closed_is_terminal_and_checked_first() -> None:
    s = state(flags=Flag.DISABLED)
    assert s.close() is True
    assert s.close() is False  # the caller releases once
    assert s.may_accept(0.0) is Verdict.CLOSED
    assert s.may_accept(0.0, sweeping=True) is Verdict.CLOSED
    for change in (
        lambda: s.set_enabled(True),
        lambda: s.set_cb(cb, ()),
        lambda: s.set_error_cb(None, ()),
        lambda: s.set_max_connections(3),
    ):
        with pytest.raises(trio.ClosedResourceError, match="closed listener"):
            change()


async def test_shut_while_disabled_or_without_a_callback() -> None:
    s = state(flags=Flag.DISABLED)
    assert s.may_accept(0.0) is Verdict.SHUT
    assert s.set_enabled(True) is True  # may open the gate: wake
    assert s.may_accept(0.0) is Verdict.ACCEPT
    assert s.set_enabled(False) is False  # shuts it: no wake needed
    assert s.set_enabled(True) is True
    assert s.set_cb(None, ()) is False
    assert s.may_accept(0.0) is Verdict.SHUT
    assert s.set_cb(cb, ("arg",)) is True
    assert s.args == ("arg",)


async def test_paused_until_resume_at_then_forgotten() -> None:
    s = state()
    s.pause(5.0, fd_wait=False)
    assert s.paused
    assert s.may_accept(4.9) is Verdict.PAUSED
    s.pause_over(4.9)
    assert s.paused
    s.pause_over(5.0)
    assert not s.paused
    assert s.may_accept(5.0) is Verdict.ACCEPT


async def test_an_accept_ends_a_pause() -> None:
    s = state()
    s.pause(5.0, fd_wait=True)
    s.admit()
    assert not s.paused


async def test_full_at_max_connections_and_a_finishing_handler_wakes() -> None:
    s = state(max_connections=2)
    s.admit()
    s.admit()
    assert s.active == 2
    assert s.may_accept(0.0) is Verdict.FULL
    assert s.finished(slot=True) is True  # it held the cap: wake
    assert s.may_accept(0.0) is Verdict.ACCEPT
    assert s.finished(slot=True) is False  # below the cap already
    assert s.idle


async def test_raising_the_cap_wakes() -> None:
    s = state(max_connections=1)
    s.admit()
    assert s.may_accept(0.0) is Verdict.FULL
    assert s.set_max_connections(2) is True
    assert s.may_accept(0.0) is Verdict.ACCEPT


async def test_an_out_of_fds_pause_ends_when_a_connection_ends() -> None:
    s = state()
    s.admit()
    s.pause(10.0, fd_wait=True)
    assert s.finished(slot=True) is True
    assert not s.paused
    # A pause for want of memory (ENOBUFS) is not ended that way.
    s.admit()
    s.pause(10.0, fd_wait=False)
    assert s.finished(slot=True) is False
    assert s.paused


async def test_with_a_preamble_connections_pend_then_take_slots_in_line() -> None:
    s = state(max_connections=1, max_pending=2, preamble=True)
    s.admit()
    s.admit()
    assert (s.active, s.pending) == (0, 2)
    # Pending is bounded by max_pending, not by the cap.
    assert s.may_accept(0.0) is Verdict.FULL
    assert s.take_slot(queued=0) is True  # pending was at its bound: wake
    assert (s.active, s.pending) == (1, 1)
    assert s.take_slot(queued=0) is None  # the cap: wait in line
    assert s.slots_to_grant(queued=1) == 0
    assert s.finished(slot=True) is True
    assert s.slots_to_grant(queued=1) == 1
    assert (s.active, s.pending) == (1, 0)


async def test_a_drain_sweeps_past_the_cap_and_a_disabled_gate_up_to_max_pending() -> (
    None
):
    s = state(flags=Flag.DISABLED, max_connections=1, max_pending=2)
    s.admit()
    s.pause(math.inf, fd_wait=False)
    assert s.may_accept(0.0) is Verdict.SHUT
    assert s.may_accept(0.0, sweeping=True) is Verdict.ACCEPT
    s.admit()
    s.admit()  # two past the cap: max_pending's worth
    assert s.may_accept(0.0, sweeping=True) is Verdict.FULL


async def test_once_draining_no_slot_is_waited_for() -> None:
    s = state(max_connections=1, max_pending=5, preamble=True)
    for _ in range(3):
        s.admit()
    assert s.take_slot(queued=0) is False
    assert s.take_slot(queued=0) is None
    s.begin_drain()
    assert s.slots_to_grant(queued=1) == 1  # the one in line, past the cap
    assert s.take_slot(queued=0) is False
    assert (s.active, s.pending) == (3, 0)


async def test_another_thread_is_refused_without_threadsafe() -> None:
    plain, safe = state(), state(flags=Flag.THREADSAFE)
    seen: list[object] = []

    def from_a_thread() -> None:
        try:
            plain.check_thread("enable")
        except RuntimeError as exc:
            seen.append(exc)
        seen.append(safe.check_thread("enable"))

    thread = threading.Thread(target=from_a_thread)
    thread.start()
    thread.join()
    error, on_trio_thread = seen
    assert "Flag.THREADSAFE" in str(error)
    assert on_trio_thread is False
    assert plain.check_thread("enable") is True
