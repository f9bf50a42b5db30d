"""Shedding load at the door: the loop-lag monitor, the accept-rate bucket,
and the count and log of every pause and refusal by reason.

Owns: measuring Trio's scheduling lag (``max_loop_lag=``) and turning it into
"stop accepting" with hysteresis; the token bucket of ``max_accept_rate=``
and ``accept_burst=``; the counters of pauses (load, rate, capacity) and
refusals (per client), and the one grouped log that reports them.

May not touch: the accept decision itself. The state
(:class:`._state.ListenerState`) reads :attr:`LoopLag.loaded` and asks the
:class:`TokenBucket` when the next token comes; this module only sets the
one and fills the other, and wakes the accept task through the function it
is given when the loop has caught up.

Why scheduling lag: every task of a Trio program shares one thread, so a
handler that runs long makes every other handler late, and so does every
connection accepted on top. How late a timer that asked to wake every few
milliseconds actually wakes is exactly how late every other ready task is
served: the one load signal an async server has that a proxy in front of it
(Envoy's overload manager watches heap and connection counts; nginx and
HAProxy count connections and rates) cannot see.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._errors import GroupedLog

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._state import ListenerState

logger: Final = logging.getLogger("trio_evlisten")

#: How often the lag monitor asks to wake. Short enough that a stall shows
#: within a fraction of any useful ``max_loop_lag``; long enough that its own
#: wake-ups cost nothing measurable.
LAG_PERIOD: Final = 0.005
#: Accepting resumes once the lag is back under this fraction of the bound
#: (hysteresis: a loop hovering at the bound does not flap on every tick).
RESUME_FRACTION: Final = 0.5
#: How many connections may be accepted per tick, at most and at first.
#: Accepted connections are work the lag shows only later, once their
#: requests arrive and run: so they are let in at a pace, a few per tick,
#: that grows by one each tick the loop stays on time with the allowance
#: used up, and falls back to :data:`NEAR_ALLOWANCE` as soon as the lag is
#: above the resume level (additive increase, and back at once: TCP's
#: congestion window, for the same reason).
MAX_ALLOWANCE: Final = 64
NEAR_ALLOWANCE: Final = 1

#: The reasons the listener stops accepting or refuses a connection, as
#: statistics and the log name them.
LOAD: Final = "load"
RATE: Final = "rate"
CAPACITY: Final = "capacity"
PER_CLIENT: Final = "per client"
TABLE_FULL: Final = "client table full"


def positive_seconds_or_none(value: object, name: str) -> float | None:
    """``max_loop_lag``: ``None`` or seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be None or seconds (> 0), not {value!r}")
    if math.isnan(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be None or seconds > 0, not {value!r}")
    return float(value)


def rate_or_none(value: object, name: str) -> float | None:
    """``max_accept_rate``: ``None`` or connections per second > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be None or connections per second (> 0), not {value!r}"
        )
    if math.isnan(value) or not 0 < value < math.inf:
        raise ValueError(
            f"{name} must be None or connections per second > 0, not {value!r}"
        )
    return float(value)


def default_burst(rate: float) -> int:
    """The bucket's size when ``accept_burst`` is not given: what a tenth of a
    second earns, at least one connection."""
    return max(1, math.ceil(rate / 10))


@attrs.define(eq=False)
class TokenBucket:
    """``max_accept_rate`` connections per second, ``burst`` at once at most.

    Starts full. :meth:`ready_at` says when the next connection may be
    accepted (``now`` or earlier if a token is there); :meth:`take` spends
    one. The same shape as Envoy's ``local_ratelimit`` token bucket
    (``max_tokens``, ``tokens_per_fill``, ``fill_interval``) with a
    continuous fill, and nginx's ``limit_req rate= burst=``.
    """

    rate: float
    burst: int
    _tokens: float = attrs.field(init=False)
    _at: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)

    def _fill(self, now: float) -> None:
        if self._at is None:
            self._at = now
        elif now > self._at:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._at) * self.rate
            )
            self._at = now

    def ready_at(self, now: float) -> float:
        """When a token is (or was) there to take."""
        self._fill(now)
        if self._tokens >= 1:
            return now
        return now + (1 - self._tokens) / self.rate

    def take(self) -> None:
        """Spend a token, right after :meth:`ready_at` said one is there."""
        self._tokens -= 1


@attrs.define(eq=False)
class Shedding:
    """The count of pauses and refusals by reason, and their grouped log.

    One per listener. Pauses (the accept task stopped: for ``load``,
    ``rate`` or ``capacity``) are counted each time accepting stops for that
    reason; refusals (a connection closed at once: ``per client``, ``client
    table full``) and holds (``per client``) per connection. Each is logged
    through one :class:`._errors.GroupedLog`: the first of a burst in full
    at WARNING, then one summary line per interval with the count of each.
    """

    where: object
    pauses: dict[str, int] = attrs.field(
        factory=lambda: dict.fromkeys((LOAD, RATE, CAPACITY), 0), init=False
    )
    refused: dict[str, int] = attrs.field(
        factory=lambda: dict.fromkeys((PER_CLIENT, TABLE_FULL), 0), init=False
    )
    held: int = attrs.field(default=0, init=False)
    _log: GroupedLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._log = GroupedLog(
            logger,
            f"listener {self.where!r} shed load",
            "shed",
            level=logging.WARNING,
        )

    def paused(self, reason: str, detail: str) -> None:
        """Accepting stopped for ``reason`` (Trio thread)."""
        self.pauses[reason] += 1
        self._note(f"paused accepting ({reason})", detail)

    def refused_one(self, reason: str, detail: str) -> None:
        """A connection was closed at once for ``reason`` (Trio thread)."""
        self.refused[reason] += 1
        self._note(f"refused a connection ({reason})", detail)

    def held_one(self, detail: str) -> None:
        """A connection waits for its client's count to drop (Trio thread)."""
        self.held += 1
        self._note(f"held a connection ({PER_CLIENT})", detail)

    def _note(self, kind: str, detail: str) -> None:
        if self._log.record(kind, detail, trio.current_time()):
            logger.warning(
                "listener %r %s: %s; further ones are summed up every %.0f s",
                self.where,
                kind,
                detail,
                self._log.interval,
                extra={"shed": 1},
            )

    def flush_log(self, final: str) -> None:
        """Log what the grouped log still holds, with ``final``."""
        self._log.flush(trio.current_time(), final=final)


@attrs.define(eq=False)
class LoopLag:
    """Measures how late Trio runs, and paces or stops accepting by it.

    A task (:meth:`run`) sleeps :data:`LAG_PERIOD` at a time; how late each
    wake-up comes is the lag. Above ``bound``, it sets the state's
    ``loaded`` (the accept decision then answers ``LOADED``) until the lag
    is back under :data:`RESUME_FRACTION` of the bound; then it clears it
    and wakes the accept task. Each tick it also grants the state an
    ``allowance`` of connections until the next tick (see
    :data:`MAX_ALLOWANCE`).
    """

    bound: float
    _state: ListenerState
    _wake: Callable[[], None]
    _shed: Shedding
    #: The last lag measured, in seconds.
    lag: float = attrs.field(default=0.0, init=False)
    #: Seconds spent paused for load, not counting a pause going on now.
    paused_for: float = attrs.field(default=0.0, init=False)
    _since: float = attrs.field(default=math.inf, init=False)
    # The allowance granted each tick.
    _pace: int = attrs.field(default=NEAR_ALLOWANCE, init=False)

    def paused_seconds(self, now: float) -> float:
        """Seconds spent paused for load so far, a pause going on now included."""
        return self.paused_for + max(now - self._since, 0.0)

    async def run(self) -> None:
        """The task: measure until the listener closes."""
        state = self._state
        resume = self.bound * RESUME_FRACTION
        deadline = trio.current_time() + LAG_PERIOD
        with state.lock:
            state.allowance = self._pace
        while True:
            with trio.move_on_at(deadline):
                # Closing ends the task at once, even on a stopped clock.
                await state.closed_event.wait()
                return
            now = trio.current_time()
            self.lag = lag = now - deadline
            deadline = now + LAG_PERIOD
            with state.lock:
                # Spent: the accept task may be parked on it.
                wake = state.allowance == 0
                if lag > resume:
                    self._pace = NEAR_ALLOWANCE
                elif wake:
                    self._pace = min(self._pace + 1, MAX_ALLOWANCE)
                state.allowance = self._pace
                if lag > self.bound:
                    if not state.loaded:
                        state.loaded = True
                        self._since = now
                        self._shed.paused(
                            LOAD,
                            f"the event loop ran {lag * 1e3:.0f} ms late, "
                            f"above max_loop_lag={self.bound}",
                        )
                    wake = False
                elif lag <= resume and state.loaded:
                    state.loaded = False
                    self.paused_for += now - self._since
                    self._since = math.inf
                    wake = True
                elif state.loaded:
                    wake = False
            if wake:
                self._wake()
