"""Sorting ``accept()`` errors by errno, and the backoff that follows them.

Every listener must decide, for each errno ``accept(2)`` can return, whether
to try again at once, to pause, or to give up. The decisions live here, in one
place, with the reasoning, so the accept loop only asks :func:`classify`.
"""

from __future__ import annotations

import enum
import errno
from typing import Final

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
