"""The listener's flags: libevent's ``LEV_OPT_*`` as an :class:`enum.IntFlag`."""

from __future__ import annotations

import enum
from typing import Final, final


@final
class Flag(enum.IntFlag):
    """Options for :func:`open_listener`, with libevent's ``LEV_OPT_*`` bit values.

    Combine them with ``|``; ``Flag(0)`` means none. Because the values are
    libevent's, a ``flags`` integer carried over from C code means the same here.

    Attributes:
        LEAVE_SOCKETS_BLOCKING: Accepted connections are left blocking and
            handed to the callback as plain :class:`socket.socket` objects
            that the handler owns.
        CLOSE_ON_FREE: Closing the listener closes its listening socket.
        CLOSE_ON_EXEC: The listening socket is made non-inheritable
            (close-on-exec).
        REUSEABLE: ``SO_REUSEADDR`` before bind.
        THREADSAFE: ``enable``/``disable``/``set_cb``/``set_error_cb``/``close``
            may be called from any thread.
        DISABLED: The listener starts disabled.
        DEFERRED_ACCEPT: Linux ``TCP_DEFER_ACCEPT`` / FreeBSD
            ``SO_ACCEPTFILTER`` "dataready".
        REUSEABLE_PORT: ``SO_REUSEPORT`` before bind.
        BIND_IPV6ONLY: ``IPV6_V6ONLY`` on an IPv6 listener (otherwise it is
            dual-stack).
    """

    LEAVE_SOCKETS_BLOCKING = 1 << 0
    CLOSE_ON_FREE = 1 << 1
    CLOSE_ON_EXEC = 1 << 2
    REUSEABLE = 1 << 3
    THREADSAFE = 1 << 4
    DISABLED = 1 << 5
    DEFERRED_ACCEPT = 1 << 6
    REUSEABLE_PORT = 1 << 7
    BIND_IPV6ONLY = 1 << 8


LEV_OPT_LEAVE_SOCKETS_BLOCKING: Final = Flag.LEAVE_SOCKETS_BLOCKING
LEV_OPT_CLOSE_ON_FREE: Final = Flag.CLOSE_ON_FREE
LEV_OPT_CLOSE_ON_EXEC: Final = Flag.CLOSE_ON_EXEC
LEV_OPT_REUSEABLE: Final = Flag.REUSEABLE
LEV_OPT_THREADSAFE: Final = Flag.THREADSAFE
LEV_OPT_DISABLED: Final = Flag.DISABLED
LEV_OPT_DEFERRED_ACCEPT: Final = Flag.DEFERRED_ACCEPT
LEV_OPT_REUSEABLE_PORT: Final = Flag.REUSEABLE_PORT
LEV_OPT_BIND_IPV6ONLY: Final = Flag.BIND_IPV6ONLY

_ALL_FLAGS: Final = Flag(sum(Flag))


def check_flags(flags: object) -> Flag:
    """Return *flags* as a :class:`Flag`, or raise if it is not one.

    Raises:
        TypeError: *flags* is not an int.
        ValueError: it has bits that no flag uses.
    """
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError(f"flags must be a Flag (an int), not {flags!r}")
    if flags < 0:
        raise ValueError(
            f"flags must be Flag values combined with |, 0 to "
            f"{int(_ALL_FLAGS)}, not {flags!r}; valid flags are "
            f"{', '.join(f.name or '' for f in Flag)}"
        )
    unknown = int(flags) & ~int(_ALL_FLAGS)
    if unknown:
        raise ValueError(
            f"flags={flags!r} has unknown bits {unknown:#x}; "
            f"valid flags are {', '.join(f.name or '' for f in Flag)}"
        )
    return Flag(flags)
