"""Sorting ``accept()`` errors by errno, and the backoff that follows them.

Every listener must decide, for each errno ``accept(2)`` can return, whether
to try again at once, to pause, or to give up. The decisions live here, in one
place, with the reasoning, so the accept loop only asks :func:`classify`.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import logging
import os
import sys
import warnings
from typing import Final

import attrs
import trio


class ErrorClass(enum.Enum):
    """What the accept loop does about an ``accept()`` error."""

    #: Try the next ``accept()`` at once, silently.
    RETRY = "retry"
    #: Out of resources: report, then pause with backoff.
    RESOURCES = "resources"
    #: Something is wrong with the listening socket itself.
    FATAL = "fatal"


# Retried at once, silently: the errors of one new connection, not of the
# listener. The list is trio's (_highlevel_socket.py's
# _ignorable_accept_errno_names), so a listener never ends on an errno that
# trio.SocketListener would skip; the reason for each:
#
# - EAGAIN/EWOULDBLOCK: nothing to accept after all; another process sharing
#   the socket (or a SO_REUSEPORT sibling) took it. Python surfaces it as
#   BlockingIOError and the accept loop treats it as "batch done".
# - EINTR: a signal arrived during the call.
# - ECONNABORTED, EPROTO: the peer reset the connection while it sat in the
#   queue (ECONNABORTED on Linux and BSD, EPROTO on some System V kernels).
#   The connection is gone, the listener is fine. (trio, nginx, Go's net
#   package and libevent all ignore it.)
# - ECONNRESET, ETIMEDOUT: the same, said otherwise: a peer's reset or a
#   handshake timing out, reported by some kernels at accept() (trio skips
#   both).
# - EPERM: Linux returns it when a firewall rule (netfilter) forbids the
#   connection; again, one connection is gone, the listener is fine.
# - ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
#   ENETUNREACH: accept(2)'s Linux man page says these pending network errors
#   of the *new* socket are passed through accept() and "should be treated
#   like EAGAIN by retrying".
# - ENOSR, ESOCKTNOSUPPORT, EPROTONOSUPPORT: named in accept(2)'s list of
#   errors that "may be returned" for the new socket by protocol modules
#   (ENOSR: out of STREAMS resources for it; the other two: the protocol
#   module refused it). trio skips them with the rest; a broken listening
#   socket says EBADF, EINVAL or ENOTSOCK instead.
_RETRY_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EWOULDBLOCK",
        "EINTR",
        "ECONNABORTED",
        "EPROTO",
        "ECONNRESET",
        "ETIMEDOUT",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
    )
    if hasattr(errno, name)
)

# Out of resources. The connection stays in the kernel's queue, so the socket
# stays readable: retrying at once would spin at 100% CPU until something
# frees an fd or memory. Pausing is what trio (a fixed 100 ms sleep), nginx
# (accept disabled for 500 ms) and Go (5 ms doubling to 1 s) do; we take Go's
# doubling schedule from 10 ms to 1 s, which recovers fast from a blip and
# costs at most one wake-up a second under sustained exhaustion.
_RESOURCE_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)

# Everything else (EBADF, EINVAL: not listening, ENOTSOCK, EFAULT, unknown
# errnos) means the listening socket itself is broken and no amount of
# retrying fixes it. trio raises these out of accept(); we do the same unless
# an error callback is there to decide.

#: The first pause after an out-of-resources error, in seconds.
BACKOFF_MIN: Final = 0.010
#: The longest pause, in seconds.
BACKOFF_MAX: Final = 1.0
#: Each further consecutive error multiplies the pause by this.
BACKOFF_FACTOR: Final = 2.0


#: The out-of-files errnos: a handler that finishes frees an fd, so the
#: listener resumes then rather than wait out the whole pause.
FD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})

#: With no error callback, the first ``accept()`` error of a burst is logged
#: at once, then at most one summary line per this many seconds.
ERROR_LOG_INTERVAL: Final = 10.0


class ResourceLimitWarning(RuntimeWarning):
    """A limit of the system will cut what the listener was asked for.

    Warned when a listener starts, and again by
    :meth:`~trio_evlisten.ConnListener.set_max_connections`: the
    ``RLIMIT_NOFILE`` soft limit is below ``max_connections`` (plus a
    given ``max_pending``) and a reserve, or (at start) the kernel cut the
    asked ``backlog`` to ``somaxconn``. Filter it like any warning
    (``warnings.filterwarnings("ignore", category=ResourceLimitWarning)``).
    """


_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(warning: Warning) -> None:
    """Warn, pointing at the first frame outside trio_evlisten (and contextlib).

    A warning about what the caller asked for (a backlog the kernel cuts, a
    cap the fds cannot cover) belongs at the caller's line, however deep in
    the package it is noticed.
    """
    frame = sys._getframe(1)
    level = 2  # 1 would be this function; 2 is the frame above it
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == contextlib.__file__
    ):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(warning, stacklevel=level)


def classify(exc: OSError) -> ErrorClass:
    """Sort an ``accept()`` error into one of the three :class:`ErrorClass` es."""
    if exc.errno in _RETRY_ERRNOS:
        return ErrorClass.RETRY
    if exc.errno in _RESOURCE_ERRNOS:
        return ErrorClass.RESOURCES
    return ErrorClass.FATAL


@attrs.define(eq=False)
class Backoff:
    """The pause schedule: 10 ms doubling to 1 s, reset by a success.

    ``next_delay()`` returns the pause for one more consecutive error;
    ``reset()`` is called after an ``accept()`` that succeeded.
    """

    minimum: float = BACKOFF_MIN
    maximum: float = BACKOFF_MAX
    factor: float = BACKOFF_FACTOR
    _current: float = attrs.field(default=0.0, init=False)

    def next_delay(self) -> float:
        if self._current == 0.0:
            self._current = self.minimum
        else:
            self._current = min(self._current * self.factor, self.maximum)
        return self._current

    def reset(self) -> None:
        self._current = 0.0

    @property
    def current(self) -> float:
        """The last pause given, or 0.0 when no error has happened since a success."""
        return self._current


@attrs.define(eq=False)
class GroupedLog:
    r"""Groups repeated errors into one log line per interval.

    The first error when no line was logged for ``interval`` seconds opens a
    burst: :meth:`record` returns True and the caller logs it in full. Later
    ones are counted by kind, and reported as one summary line
    (``accept() on ... failed: EMFILE \u00d7412 in 10.0 s (last: ...)``)
    once ``interval`` has passed since the last line, or when its owner ends
    (:meth:`flush` with ``final``). So a flood of errors, whoever causes
    them, costs one line per interval, and no error goes uncounted.

    The log owns its timer: while a summary is pending, a Trio system task
    sleeps until it falls due and logs it, so the summary comes on time even
    if the errors stop and whatever recorded them has ended (a handler in a
    caller's ``handler_nursery=`` after the block was left). If the run ends
    first, the task logs what it holds on its way out.
    """

    logger: logging.Logger
    #: What failed, as the summary line starts: ``accept() on ('::', 80) failed``.
    prefix: str
    #: The name of the record attribute (``extra=``) that carries the count.
    count_attribute: str
    interval: float = ERROR_LOG_INTERVAL
    level: int = logging.ERROR
    _last_line: float = attrs.field(default=-float("inf"), init=False)
    _pending: collections.Counter[str] = attrs.field(
        factory=collections.Counter, init=False
    )
    _last: str = attrs.field(default="", init=False)
    _timer: bool = attrs.field(default=False, init=False)

    @property
    def due(self) -> float:
        """When a summary falls due (``inf``: nothing pending)."""
        return self._last_line + self.interval if self._pending else float("inf")

    def record(self, kind: str, last: str, now: float) -> bool:
        """Count one error of ``kind``; return whether to log it in full now.

        ``last`` describes it, for the summary line's ``(last: ...)``.
        Trio thread only.
        """
        self._last = last
        if not self._pending and now >= self._last_line + self.interval:
            self._last_line = now
            return True
        self._pending[kind] += 1
        self.flush(now)
        if self._pending and not self._timer:
            self._timer = True
            trio.lowlevel.spawn_system_task(
                self._run_timer, name=f"trio_evlisten log timer: {self.prefix}"
            )
        return False

    async def _run_timer(self) -> None:
        try:
            while self._pending:
                await trio.sleep_until(self.due)
                self.flush(trio.current_time())
        finally:
            self._timer = False
            # Cancelled only when the run ends: say what was held.
            self.flush(trio.current_time(), final="; run ended")

    def flush(self, now: float, *, final: str = "") -> None:
        """Log the summary line if it is due (or, with ``final``, if any).

        ``final`` is appended to the line (``"; listener closed"``).
        """
        if not self._pending or (not final and now < self.due):
            return
        counts = ", ".join(f"{name} \u00d7{n}" for name, n in self._pending.items())
        total = sum(self._pending.values())
        since = self._last_line
        self._pending.clear()
        self._last_line = now
        self.logger.log(
            self.level,
            "%s: %s in %.1f s (last: %s)%s",
            self.prefix,
            counts,
            now - since,
            self._last,
            final,
            extra={self.count_attribute: total},
        )


def errno_name(code: int | None) -> str:
    """``EMFILE`` for 24: how a summary line names an errno."""
    return errno.errorcode.get(code, str(code)) if code is not None else "?"
