"""The backlog: what ``listen()`` is given, what the kernel makes of it, and
how full the accept queue is.

Owns: the backlog rules (``< 0`` the OS maximum capped at 65535, ``0``
already listening, ``> 0`` as given), the ``somaxconn`` cap and its warning,
and reading the accept queue's depth and limit from ``TCP_INFO``. Nothing
here binds or accepts.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Final

from ._errors import ResourceLimitWarning, warn_at_caller

#: libevent caps nothing; trio caps at 0xFFFF because some kernels store the
#: backlog in 16 bits and a bigger value wraps around to a tiny one.
BACKLOG_MAX: Final = 0xFFFF

_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"


def default_backlog() -> int:
    """The backlog ``backlog < 0`` asks for: the OS maximum, capped at 65535.

    Like trio, read Linux's ``somaxconn`` (the kernel silently truncates any
    larger value to it anyway); elsewhere ask for the cap and let the kernel
    truncate.
    """
    try:
        with open(_SOMAXCONN_PATH, "rb") as f:
            return min(int(f.read()), BACKLOG_MAX)
    except (OSError, ValueError):
        return BACKLOG_MAX


def somaxconn() -> int | None:
    """Linux's ``net.core.somaxconn`` (the kernel's cap on any backlog), or None."""
    try:
        with open(_SOMAXCONN_PATH, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def listen(std: socket.socket, backlog: int) -> int:
    """``listen()`` with ``backlog`` (``< 0``: the default); return the effective one.

    Warns (:class:`ResourceLimitWarning`) when the kernel will cut an asked
    backlog to ``somaxconn``: connections beyond it are dropped or refused
    while the listener is busy, which is what the caller tried to avoid.
    """
    asked = backlog if backlog > 0 else default_backlog()
    std.listen(asked)
    cap = somaxconn()
    if cap is None or asked <= cap:
        return asked
    if backlog > 0:
        warn_at_caller(
            ResourceLimitWarning(
                f"backlog={backlog} was cut to {cap} by the kernel "
                f"({_SOMAXCONN_PATH}); raise net.core.somaxconn to get it"
            )
        )
    return cap


#: ``struct tcp_info``: 8 bytes of u8 fields, then u32 ``tcpi_rto``,
#: ``tcpi_ato``, ``tcpi_snd_mss``, ``tcpi_rcv_mss``, ``tcpi_unacked`` (offset
#: 24) and ``tcpi_sacked`` (offset 28). On a listening socket Linux reports
#: the accept queue's length in ``tcpi_unacked`` and its limit in
#: ``tcpi_sacked`` (``tcp_get_info`` in net/ipv4/tcp.c).
_TCP_INFO_QUEUE: Final = struct.Struct("=24xII")


def accept_queue(std: socket.socket) -> tuple[int, int] | None:
    """``(depth, limit)`` of a listening TCP socket's accept queue, or None.

    None on a Unix socket, a platform without ``TCP_INFO``, or a closed socket.
    """
    tcp_info = getattr(socket, "TCP_INFO", None)
    if (
        tcp_info is None
        or not sys.platform.startswith("linux")
        or std.family not in (socket.AF_INET, socket.AF_INET6)
    ):
        return None
    try:
        raw = std.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_QUEUE.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_QUEUE.size:  # pragma: no cover - very old kernels
        return None
    depth, limit = _TCP_INFO_QUEUE.unpack_from(raw)
    return depth, limit


#: ``listen()`` takes a C int.
_INT_MAX: Final = 2**31 - 1


def check_backlog(backlog: object, *, wrapping: bool) -> int:
    """Return ``backlog`` if it is valid (for ``sock=`` if ``wrapping``), else raise."""
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int, not {backlog!r}")
    if backlog > _INT_MAX:
        raise ValueError(
            f"backlog must be -1 (the OS maximum), 0 (sock= already listening) "
            f"or 1..{_INT_MAX} (the kernel caps it at somaxconn anyway), "
            f"not {backlog!r}"
        )
    if backlog == 0 and not wrapping:
        raise ValueError(
            "backlog=0 means 'the socket is already listening', which only "
            "makes sense with sock=; with address= give backlog=-1 (a good "
            "default) or a positive queue length"
        )
    return backlog
