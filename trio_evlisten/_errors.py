"""Sorting ``accept()`` errors by errno, and the backoff that follows them.

Every listener must decide, for each errno ``accept(2)`` can return, whether
to try again at once, to pause, or to give up. The decisions live here, in one
place, with the reasoning, so the accept loop only asks :func:`classify`.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
from typing import Any, Final

import attrs


class ErrorClass(enum.Enum):
    """What the accept loop does about an ``accept()`` error."""

    #: Try the next ``accept()`` at once, silently.
    RETRY = "retry"
    #: Out of resources: report, then pause with backoff.
    RESOURCES = "resources"
    #: Something is wrong with the listening socket itself.
    FATAL = "fatal"


# Retried at once, silently.
#
# - EAGAIN/EWOULDBLOCK: nothing to accept after all; another process sharing
#   the socket (or a SO_REUSEPORT sibling) took it. Python surfaces it as
#   BlockingIOError and the accept loop treats it as "batch done".
# - EINTR: a signal arrived during the call.
# - ECONNABORTED, EPROTO: the peer reset the connection while it sat in the
#   queue. The connection is gone, the listener is fine. (trio's
#   _highlevel_socket.py, nginx, Go's net package and libevent all ignore it.)
# - EPERM: Linux returns it when a firewall rule (netfilter) forbids the
#   connection; again, one connection is gone, the listener is fine.
# - ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP,
#   ENETUNREACH: accept(2)'s Linux man page says these pending network errors
#   of the *new* socket are passed through accept() and "should be treated
#   like EAGAIN by retrying".
_RETRY_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EWOULDBLOCK",
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

    Warned once when a listener starts: the ``RLIMIT_NOFILE`` soft limit is
    below ``max_connections`` plus a reserve, or the kernel cut the asked
    ``backlog`` to ``somaxconn``. Filter it like any warning
    (``warnings.filterwarnings("ignore", category=ResourceLimitWarning)``).
    """


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


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "?"


@attrs.define(eq=False)
class ErrorLog:
    r"""Groups repeated ``accept()`` errors into one log line per interval.

    The first error when no line was logged for ``interval`` seconds is
    logged at once; later ones are counted, and reported by :meth:`flush` as
    one summary line (``EMFILE \u00d7412 in 10.0 s``) once ``interval`` has passed
    since the last line, or when the listener ends.
    """

    logger: logging.Logger
    where: Any
    interval: float = ERROR_LOG_INTERVAL
    _last_line: float = attrs.field(default=-float("inf"), init=False)
    _pending: collections.Counter[str] = attrs.field(
        factory=collections.Counter, init=False
    )
    _last_exc: OSError | None = attrs.field(default=None, init=False)
    _last_delay: float = attrs.field(default=0.0, init=False)

    @property
    def due(self) -> float:
        """When :meth:`flush` has a summary to log (``inf``: nothing pending)."""
        return self._last_line + self.interval if self._pending else float("inf")

    def error(self, exc: OSError, delay: float, now: float) -> None:
        """Record one error that pauses accepting for ``delay`` seconds."""
        self._last_exc, self._last_delay = exc, delay
        if not self._pending and now >= self._last_line + self.interval:
            self._last_line = now
            self.logger.error(
                "accept() on %r failed: %s; pausing accepts for %.3f s",
                self.where,
                exc,
                delay,
                extra={"accept_errors": 1},
            )
            return
        self._pending[_errno_name(exc.errno)] += 1
        self.flush(now)

    def flush(self, now: float, *, final: bool = False) -> None:
        """Log the summary line if it is due (or, with ``final``, if any)."""
        if not self._pending or (not final and now < self.due):
            return
        counts = ", ".join(f"{name} \u00d7{n}" for name, n in self._pending.items())
        total = sum(self._pending.values())
        since = self._last_line
        self._pending.clear()
        self._last_line = now
        self.logger.error(
            "accept() on %r failed: %s in %.1f s (last: %s, then a %.3f s pause)%s",
            self.where,
            counts,
            now - since,
            self._last_exc,
            self._last_delay,
            "; listener closed" if final else "",
            extra={"accept_errors": total},
        )
