"""Socket options of the listening socket: what each flag and option sets.

Owns: turning the :class:`Flag` bits, the ``keepalive`` option and the
stream's TCP options into ``setsockopt`` calls, and refusing what cannot
apply to a socket (a flag a Unix socket does not have; a string that is a
``host:port``, not a path).
Nothing here binds, listens or accepts (that is :mod:`._socket`).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Final

from ._flags import Flag

#: Linux's bounds on ``TCP_KEEPIDLE`` (``MAX_TCP_KEEPIDLE``).
KEEPALIVE_MAX: Final = 32767
#: libevent 2.2's ``evutil_set_tcp_keepalive``: after ``idle`` seconds, a
#: probe every ``idle / 3`` seconds, and the connection is dropped after this
#: many unanswered, so a dead peer is found within twice the idle time.
KEEPALIVE_PROBES: Final = 3

#: ``TCP_NOTSENT_LOWAT`` as trio sets it: a socket reports writable only while
#: it holds less than this much data not yet sent, so a sender is paced by
#: the network instead of filling megabytes of kernel buffer (lower latency,
#: less memory, and ``wait_send_all_might_not_block`` means something). trio
#: picked 16 KiB (python-trio/trio#72: "bandwidth * rescheduling interval");
#: we keep it so the two streams behave alike.
NOTSENT_LOWAT: Final = 2**14

TCP_FAMILIES: Final = frozenset({socket.AF_INET, getattr(socket, "AF_INET6", -1)})

#: The options a stream sets on a TCP socket (:class:`SocketStream` and
#: trio's alike), each on its own: one refused does not skip the next.
#: TCP_NOTSENT_LOWAT is left out where the platform has no such constant,
#: as trio leaves it out.
STREAM_TCP_OPTIONS: Final[tuple[tuple[int, int, int], ...]] = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
) + (
    ((socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT),)
    if hasattr(socket, "TCP_NOTSENT_LOWAT")
    else ()
)

# "127.0.0.1:8080", "[::1]:80", "localhost:8000": host:port, no path.
_HOST_PORT: Final = re.compile(r"\[?[^/\[\]]*\]?:[0-9]{1,5}")


def check_unix_path(address: object, path: str) -> None:
    """Refuse a str that is a ``host:port`` rather than a socket path.

    ``address="127.0.0.1:8080"`` would otherwise create a Unix socket file of
    that name in the working directory, and nothing would listen on TCP.
    """
    if isinstance(address, str) and _HOST_PORT.fullmatch(path):
        host, _, port = path.rpartition(":")
        raise ValueError(
            f"address={address!r} looks like host:port, but a str address is a "
            f"Unix socket path; for TCP give a tuple: "
            f"address=({host.strip('[]')!r}, {int(port)}); for a socket file of "
            f"that name, give a path with a slash: './{path}'"
        )


def check_unix_flags(flags: Flag) -> None:
    """Refuse the flags a Unix socket cannot have, naming each."""
    if flags & Flag.REUSEABLE:
        # libevent refuses it too (#1625): SO_REUSEADDR means nothing for a
        # Unix socket; rebinding a path needs the old file removed, which
        # CLOSE_ON_FREE does for a path open_listener bound.
        raise ValueError(
            "Flag.REUSEABLE (SO_REUSEADDR) is for TCP sockets, not Unix sockets; "
            "leave it out (with CLOSE_ON_FREE the socket file is removed on "
            "close, so the path can be bound again)"
        )
    if flags & Flag.REUSEABLE_PORT:
        raise ValueError("Flag.REUSEABLE_PORT is for TCP sockets, not Unix sockets")
    if flags & Flag.BIND_IPV6ONLY:
        raise ValueError("Flag.BIND_IPV6ONLY is for IPv6 sockets, not Unix sockets")
    if flags & Flag.DEFERRED_ACCEPT:
        # libevent's setsockopt(TCP_DEFER_ACCEPT) fails on a Unix socket, and
        # its bind with it; a no-op would hide a flag that does nothing.
        raise ValueError("Flag.DEFERRED_ACCEPT is for TCP sockets, not Unix sockets")


def so_reuseport() -> int:
    """``SO_REUSEPORT``, or a ValueError where the platform lacks it."""
    opt = getattr(socket, "SO_REUSEPORT", None)
    if opt is None:
        raise ValueError(
            f"Flag.REUSEABLE_PORT needs SO_REUSEPORT, which {sys.platform} lacks"
        )
    return int(opt)


def set_keepalive(std: socket.socket, idle: int) -> None:
    """TCP keep-alive as libevent 2.2 sets it on the listeners it binds.

    On the listening socket: Linux copies these options into every socket
    ``accept()`` returns, so they cost nothing per connection.
    """
    std.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    keepidle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(
        socket,
        "TCP_KEEPALIVE",
        None,  # macOS's name for it
    )
    if keepidle is not None:
        std.setsockopt(socket.IPPROTO_TCP, keepidle, idle)
    if hasattr(socket, "TCP_KEEPINTVL"):
        std.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(idle // 3, 1))
    if hasattr(socket, "TCP_KEEPCNT"):
        std.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def apply_listening_flags(std: socket.socket, flags: Flag) -> None:
    """The flags that apply to bound and wrapped sockets alike."""
    if flags & Flag.CLOSE_ON_EXEC:
        os.set_inheritable(std.fileno(), False)
    if flags & Flag.DEFERRED_ACCEPT and std.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        _set_deferred_accept(std)


def _set_deferred_accept(std: socket.socket) -> None:
    defer = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if defer is not None:
        # Linux: wait up to 1 s (as libevent asks) for the first data before
        # reporting the connection.
        std.setsockopt(socket.IPPROTO_TCP, defer, 1)
        return
    accept_filter = getattr(socket, "SO_ACCEPTFILTER", None)
    if accept_filter is not None:  # pragma: no cover - FreeBSD
        # struct accept_filter_arg { char af_name[16]; char af_arg[240]; }
        arg = b"dataready".ljust(16, b"\0") + b"\0" * 240
        std.setsockopt(socket.SOL_SOCKET, accept_filter, arg)
    # Elsewhere a no-op, as in libevent.


def prepare_listening_socket(sock: socket.socket) -> bool:
    """Set the options :class:`._stream.SocketStream` sets, once, on a listening socket.

    Linux copies ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` from a listening
    socket into every socket ``accept()`` returns (checked in
    tests/test_stream.py), so a listener that sets them here can hand its
    connections to :func:`._stream.adopt`, two system calls cheaper per connection.

    Returns:
        Whether accepted sockets will come with the options (False elsewhere
        than Linux, or if the kernel refused one): then use the constructor.
    """
    if not sys.platform.startswith("linux"):
        return False
    if sock.family not in TCP_FAMILIES:
        return True  # nothing to set: a Unix socket has no TCP options
    try:
        for level, option, value in STREAM_TCP_OPTIONS:
            sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True
