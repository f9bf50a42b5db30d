"""The listener's options beyond libevent's, checked once, kept frozen."""

from __future__ import annotations

import math
import ssl
import warnings
from typing import Final, Literal

import attrs
import trio

from ._errors import ResourceLimitWarning
from ._flags import Flag
from ._proxy_gate import PROXY_TIMEOUT, Network, trusted_networks

HandlerErrors = Literal["log", "raise"]
_HANDLER_ERRORS: Final = ("log", "raise")

#: How long a TLS handshake may take, by default, before the connection is
#: dropped (it runs in the handler's task, so it never blocks accepting).
TLS_HANDSHAKE_TIMEOUT: Final = 10.0


#: File descriptors a process needs besides one per connection (the listening
#: socket, logs, stdio, libraries, the odd file): ``max_connections`` plus
#: this must fit under ``RLIMIT_NOFILE``'s soft limit, else a warning.
FD_RESERVE: Final = 64


def check_max_connections(value: object) -> int | None:
    """Return ``value`` if it is a valid ``max_connections``, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_connections must be None or an int, not {value!r}")
    if value < 1:
        raise ValueError(f"max_connections must be None or >= 1, not {value!r}")
    return value


def warn_if_fd_limit_below(max_connections: int | None, *, stacklevel: int) -> None:
    """Warn (:class:`ResourceLimitWarning`) if the fds cannot cover the cap."""
    if max_connections is None:
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= max_connections + FD_RESERVE:
        return
    warnings.warn(
        ResourceLimitWarning(
            f"max_connections={max_connections} needs about "
            f"{max_connections + FD_RESERVE} file descriptors "
            f"(+{FD_RESERVE} in reserve), but RLIMIT_NOFILE's soft limit is "
            f"{soft}: accept() will fail with EMFILE before the cap is "
            "reached; raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
        ),
        stacklevel=stacklevel + 1,
    )


def check_seconds(name: str, value: object, *, optional: bool) -> None:
    """Raise TypeError/ValueError unless ``value`` is seconds (or ``None``)."""
    _seconds(name, value, optional=optional)


def _seconds(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be {'None or ' if optional else ''}seconds, not {value!r}"
        )
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}>= 0 seconds, "
            f"not {value!r}"
        )


@attrs.frozen(kw_only=True)
class Options:
    """What ``open_listener`` takes besides the socket, flags and callbacks."""

    max_connections: int | None = None
    drain_timeout: float | None = None
    handler_nursery: trio.Nursery | None = None
    handler_errors: HandlerErrors = "log"
    ssl_context: ssl.SSLContext | None = None
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    proxy_protocol: bool = False
    # Converted at once (it may be a one-shot iterable); the converter raises
    # TypeError/ValueError naming a bad item.
    proxy_trusted: tuple[Network, ...] = attrs.field(
        default=None, converter=trusted_networks
    )
    proxy_timeout: float = PROXY_TIMEOUT

    def check(self, flags: Flag) -> None:
        """Raise TypeError/ValueError, naming the value, for a bad option."""
        check_max_connections(self.max_connections)
        _seconds("drain_timeout", self.drain_timeout, optional=True)
        if self.handler_nursery is not None:
            if not isinstance(self.handler_nursery, trio.Nursery):
                raise TypeError(
                    "handler_nursery must be a trio.Nursery or None, "
                    f"not {self.handler_nursery!r}"
                )
            if self.drain_timeout is not None:
                raise ValueError(
                    "drain_timeout has no effect with handler_nursery=: the "
                    "handlers belong to that nursery and outlive the listener; "
                    "cancel it yourself, or leave out handler_nursery="
                )
        if self.handler_errors not in _HANDLER_ERRORS:
            raise ValueError(
                f"handler_errors must be 'log' or 'raise', not {self.handler_errors!r}"
            )
        if self.ssl_context is not None:
            if not isinstance(self.ssl_context, ssl.SSLContext):
                raise TypeError(
                    f"ssl_context must be an ssl.SSLContext, not {self.ssl_context!r}"
                )
            if flags & Flag.LEAVE_SOCKETS_BLOCKING:
                raise ValueError(
                    "ssl_context= hands handlers a trio.SSLStream, which "
                    "Flag.LEAVE_SOCKETS_BLOCKING (plain blocking sockets) excludes"
                )
        _seconds("tls_handshake_timeout", self.tls_handshake_timeout, optional=False)
        if not isinstance(self.proxy_protocol, bool):
            raise TypeError(
                f"proxy_protocol must be True or False, not {self.proxy_protocol!r}"
            )
        _seconds("proxy_timeout", self.proxy_timeout, optional=False)
