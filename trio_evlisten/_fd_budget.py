"""The file descriptor budget: what ``RLIMIT_NOFILE`` leaves for connections.

Owns: the reserve a process keeps besides its connections, the default
``max_pending`` the budget allows, and the warning when the asked bounds do
not fit under the limit.
"""

from __future__ import annotations

from typing import Final

from ._errors import ResourceLimitWarning, warn_at_caller

#: File descriptors a process needs besides one per connection (the listening
#: socket, logs, stdio, libraries, the odd file): ``max_connections`` plus
#: this must fit under ``RLIMIT_NOFILE``'s soft limit, else a warning.
FD_RESERVE: Final = 64

#: The fewest pending connections the fd budget's default allows.
MIN_PENDING: Final = 64
#: The default ``max_pending`` where ``RLIMIT_NOFILE`` is unlimited.
UNLIMITED_PENDING: Final = 65536


def _fd_soft_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def default_max_pending(max_connections: int | None) -> int:
    """``max_pending=None``: what the file descriptors leave for handshakes."""
    soft = _fd_soft_limit()
    if soft is None:
        return UNLIMITED_PENDING
    return max(soft - FD_RESERVE - (max_connections or 0), MIN_PENDING)


def warn_if_fd_limit_below(
    max_connections: int | None, max_pending: int | None = None
) -> None:
    """Warn (:class:`ResourceLimitWarning`) if the fds cannot cover the bounds.

    ``max_pending`` counts only where it was given (and a preamble makes
    connections pend); its default is made to fit.
    """
    if max_connections is None and max_pending is None:
        return
    soft = _fd_soft_limit()
    need = (max_connections or 0) + (max_pending or 0) + FD_RESERVE
    if soft is None or soft >= need:
        return
    asked = " + ".join(
        f"{name}={value}"
        for name, value in (
            ("max_connections", max_connections),
            ("max_pending", max_pending),
        )
        if value is not None
    )
    warn_at_caller(
        ResourceLimitWarning(
            f"{asked} needs about {need} file descriptors "
            f"(+{FD_RESERVE} in reserve), but RLIMIT_NOFILE's soft limit is "
            f"{soft}: accept() will fail with EMFILE before the bound is "
            "reached; raise it (ulimit -n, LimitNOFILE=) or lower the bound"
        )
    )
