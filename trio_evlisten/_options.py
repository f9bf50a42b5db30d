"""The listener's options beyond libevent's: each one defined once, here.

An option is one key of :class:`ListenerOptions`, annotated with its
:class:`Option`: the default, the check (which names the bad value), the
text the reference shows, and, where it makes sense, its command-line
spelling. Everything else derives from that one line: the ``**options`` of
:func:`open_listener` and :func:`serve_listener` (typed by the TypedDict),
:func:`resolve` (defaults and checks), the reference's table (the
TypedDict's docstring is written from the annotations), and the flags of
``python -m trio_evlisten echo`` and ``python -m trio_evlisten.workers``
(:mod:`._option_flags`).

Adding an option is: one annotated key below, plus the code that uses it.
"""

from __future__ import annotations

import math
import ssl
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias, TypedDict

import attrs
import trio

from ._errors import ResourceLimitWarning, warn_at_caller
from ._flags import Flag
from ._proxy_gate import PROXY_TIMEOUT, Network, trusted_networks
from ._sockopts import KEEPALIVE_MAX
from ._stream import SocketStream

HandlerErrors = Literal["log", "raise"]
#: What ``stream=`` takes: the class of the stream handlers get.
StreamClass: TypeAlias = "type[SocketStream] | type[trio.SocketStream]"

#: How long a TLS handshake may take, by default, before the connection is
#: dropped (it runs in the handler's task, so it never blocks accepting).
TLS_HANDSHAKE_TIMEOUT: Final = 10.0

#: File descriptors a process needs besides one per connection (the listening
#: socket, logs, stdio, libraries, the odd file): ``max_connections`` plus
#: this must fit under ``RLIMIT_NOFILE``'s soft limit, else a warning.
FD_RESERVE: Final = 64


# ----------------------------------------------------------------------
# Checks: each takes the option's name and the value given, and returns the
# value to use or raises TypeError/ValueError naming both.


def check_max_connections(value: object, name: str = "max_connections") -> int | None:
    """Return ``value`` if it is ``None`` or an int >= 1, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or an int, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be None or >= 1, not {value!r}")
    return value


def check_seconds(name: str, value: object, *, optional: bool) -> float | None:
    """Return ``value`` if it is seconds >= 0 (or, if ``optional``, ``None``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be {'None or ' if optional else ''}seconds, not {value!r}"
        )
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}>= 0 seconds, "
            f"not {value!r}"
        )
    return value


def _seconds(value: object, name: str) -> float:
    checked = check_seconds(name, value, optional=False)
    assert checked is not None
    return checked


def _seconds_or_none(value: object, name: str) -> float | None:
    return check_seconds(name, value, optional=True)


def _keepalive(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or whole seconds (an int), not {value!r}")
    if not 1 <= value <= KEEPALIVE_MAX:
        raise ValueError(
            f"{name} must be None or 1..{KEEPALIVE_MAX} seconds, not {value!r}"
        )
    return value


def _file_mode(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or a mode like 0o660, not {value!r}")
    if not 0 <= value <= 0o7777:
        raise ValueError(f"{name} must be a mode 0o0..0o7777, not {value!r}")
    return value


def _stream_class(value: object, name: str) -> StreamClass:
    if value is SocketStream or value is trio.SocketStream:
        return value
    raise ValueError(
        f"{name} must be trio_evlisten.SocketStream (the default) or "
        f"trio.SocketStream, not {value!r}"
    )


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def _nursery_or_none(value: object, name: str) -> trio.Nursery | None:
    if value is not None and not isinstance(value, trio.Nursery):
        raise TypeError(f"{name} must be a trio.Nursery or None, not {value!r}")
    return value


def _handler_errors(value: object, name: str) -> HandlerErrors:
    if value == "log" or value == "raise":
        return value
    raise ValueError(f"{name} must be 'log' or 'raise', not {value!r}")


def _ssl_context_or_none(value: object, name: str) -> ssl.SSLContext | None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"{name} must be an ssl.SSLContext, not {value!r}")
    return value


def _networks(value: object, name: str) -> tuple[Network, ...]:
    return trusted_networks(value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------
# Command-line spellings


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


@attrs.frozen
class Cli:
    """How an option is spelled on the command line (``--max-connections N``).

    ``parse`` turns the text into the value the option's check then takes;
    ``metavar=None`` makes a flag without a value (``store_true``);
    ``repeat`` collects every use into a list.
    """

    metavar: str | None
    parse: Callable[[str], object] = str
    repeat: bool = False


@attrs.frozen
class Option:
    """One option: its default, its check, its reference text and CLI spelling."""

    default: object
    check: Callable[[Any, str], object]
    doc: str
    cli: Cli | None = None

    @property
    def shown(self) -> str:
        """The default as the reference shows it (a class by its public name)."""
        if isinstance(self.default, type):
            module = self.default.__module__.partition("._")[0]
            return f"{module}.{self.default.__qualname__}"
        return repr(self.default)


class ListenerOptions(TypedDict, total=False):
    """The keyword options of :func:`open_listener` and :func:`serve_listener`."""

    max_connections: Annotated[
        int | None,
        Option(
            None,
            check_max_connections,
            "at this many running handlers, stop accepting until one finishes "
            "(connections wait in the kernel's backlog); change it later with "
            ":meth:`~ConnListener.set_max_connections`. A "
            ":class:`ResourceLimitWarning` says when ``RLIMIT_NOFILE`` is "
            "below it plus a reserve of 64.",
            Cli("N", _int_or_none),
        ),
    ]
    max_pending: Annotated[
        int | None,
        Option(
            None,
            check_max_connections,
            "with ``proxy_protocol=`` or ``ssl_context=``: at this many "
            "connections accepted but not yet handed to a handler (in their "
            "PROXY header or TLS handshake, or waiting for a slot of "
            "``max_connections``), stop accepting until one is. Pending "
            "connections hold no handler slot, so slow handshakes cannot "
            "starve honest clients of handlers. ``None``: what the file "
            "descriptors allow, ``RLIMIT_NOFILE`` minus ``max_connections`` "
            "minus a reserve of 64 (at least 64).",
            Cli("N", _int_or_none),
        ),
    ]
    drain_timeout: Annotated[
        float | None,
        Option(
            None,
            _seconds_or_none,
            "on leaving the block, drain as :meth:`~ConnListener.drain` does: "
            "set ``listener.draining``, wait this many seconds for running "
            "handlers, then cancel them (``None``: wait for all).",
            Cli("SECONDS", _float_or_none),
        ),
    ]
    stream: Annotated[
        StreamClass,
        Option(
            SocketStream,
            _stream_class,
            "the class of the stream each handler gets: "
            ":class:`trio_evlisten.SocketStream`, a "
            ":class:`trio.abc.HalfCloseableStream` with "
            ":class:`trio.SocketStream`'s surface and semantics at about half "
            "its CPU per call; or :class:`trio.SocketStream` itself, for code "
            "that needs exactly that type. With ``ssl_context=`` the handler "
            "gets a :class:`trio.SSLStream` over it.",
        ),
    ]
    handler_nursery: Annotated[
        trio.Nursery | None,
        Option(
            None,
            _nursery_or_none,
            "run handlers in this nursery instead of the listener's own; they "
            "then outlive the block (and ``drain_timeout`` cannot apply).",
        ),
    ]
    handler_errors: Annotated[
        HandlerErrors,
        Option(
            "log",
            _handler_errors,
            '``"log"`` logs an exception escaping a handler and goes on; '
            '``"raise"`` lets it propagate, which ends the listener and '
            "everything in its nursery.",
        ),
    ]
    ssl_context: Annotated[
        ssl.SSLContext | None,
        Option(
            None,
            _ssl_context_or_none,
            "serve TLS: each handler gets a :class:`trio.SSLStream` whose "
            "handshake has already completed, run in the handler's own task. A "
            "failed or slow handshake drops the connection (logged at DEBUG, "
            "counted in ``statistics().tls_failures``); the handler is not "
            "called.",
        ),
    ]
    tls_handshake_timeout: Annotated[
        float,
        Option(
            TLS_HANDSHAKE_TIMEOUT,
            _seconds,
            "seconds the TLS handshake may take.",
        ),
    ]
    proxy_protocol: Annotated[
        bool,
        Option(
            False,
            _bool,
            "every connection starts with a PROXY protocol v1 or v2 header "
            "(HAProxy's, as HAProxy and nginx send it), read in the handler's "
            "task before any TLS handshake; ``addr`` is then the original "
            "client's (the real peer's for ``LOCAL``/``UNKNOWN``). Exactly the "
            "header's bytes are consumed. A peer outside ``proxy_trusted``, or "
            "a bad, truncated or slow header, drops the connection without "
            "calling the handler (counted in ``statistics().proxy_rejected``; "
            "at most one WARNING per 10 s).",
            Cli(None),
        ),
    ]
    proxy_trusted: Annotated[
        Iterable[str | Network] | None,
        Option(
            None,
            _networks,
            'the networks (``"10.0.0.0/8"``, ``"::1"``, :mod:`ipaddress` '
            "networks) that may send a header; ``None`` means loopback only "
            "(``127.0.0.0/8``, ``::1``). Unix-socket peers are always trusted.",
            Cli("NETWORK", repeat=True),
        ),
    ]
    proxy_timeout: Annotated[
        float,
        Option(
            PROXY_TIMEOUT,
            _seconds,
            "seconds the PROXY header may take to arrive.",
            Cli("SECONDS", float),
        ),
    ]
    keepalive: Annotated[
        int | None,
        Option(
            300,
            _keepalive,
            "TCP keep-alive, as libevent 2.2 sets it on the listeners it binds: "
            "a connection idle this many seconds is probed every third of that, "
            "and dropped after 3 unanswered probes, so a peer that vanished "
            "(power cut, cable pulled) is found within twice this time. Set on "
            "the listening socket, which every accepted socket inherits (no cost "
            "per connection). Applies to TCP sockets open_listener binds; with "
            "``sock=`` only when given, so a socket set up by systemd keeps its "
            "``KeepAlive=``; for a Unix socket it is an error. ``None``: off.",
            Cli("SECONDS", _int_or_none),
        ),
    ]
    unix_mode: Annotated[
        int | None,
        Option(
            None,
            _file_mode,
            "the permission bits of a Unix socket file open_listener binds "
            "(``0o660``: its owner and group may connect), set after ``bind()`` "
            "and before ``listen()``, so no client connects under a looser "
            "mode. ``None``: what the umask gives (``0o777`` minus the umask). "
            "Who may connect to a Unix socket is decided by this mode alone, "
            "and with ``proxy_protocol=True`` every Unix peer may send a "
            "PROXY header: give the socket a mode that admits only your "
            "proxy.",
        ),
    ]


#: Each option's :class:`Option`, by name, in definition order.
OPTIONS: Final[Mapping[str, Option]] = {
    name: next(m for m in hint.__metadata__ if isinstance(m, Option))
    for name, hint in typing.get_type_hints(
        ListenerOptions, vars(sys.modules[__name__]), include_extras=True
    ).items()
}


def _document() -> str:
    """The reference text of :class:`ListenerOptions`, from the annotations."""
    lines = [
        "The keyword options of :func:`open_listener` and :func:`serve_listener`.",
        "",
        "Beyond libevent's arguments; every one is optional. A typed",
        "``TypedDict``, so a type checker checks ``**options`` too.",
        "",
        "Attributes:",
    ]
    for name, option in OPTIONS.items():
        lines.append(f"    {name}: (default ``{option.shown}``) {option.doc}")
    return "\n".join(lines)


ListenerOptions.__doc__ = _document()


def resolve(
    given: Mapping[str, object], flags: Flag, *, caller: str = "open_listener"
) -> ListenerOptions:
    """Every option, checked, with the defaults filled in.

    Raises:
        TypeError: an unknown option name, or a value of the wrong type.
        ValueError: a bad value, or options that exclude each other (each
            message names them).
    """
    unknown = given.keys() - OPTIONS.keys()
    if unknown:
        raise TypeError(
            f"{caller}() got unknown option(s) {', '.join(sorted(unknown))}; "
            f"the options are {', '.join(OPTIONS)}"
        )
    values = {
        name: option.check(given[name], name) if name in given else option.default
        for name, option in OPTIONS.items()
    }
    resolved: ListenerOptions = values  # type: ignore[assignment]
    nursery, drain_timeout = resolved["handler_nursery"], resolved["drain_timeout"]
    if nursery is not None and drain_timeout is not None:
        raise ValueError(
            "drain_timeout has no effect with handler_nursery=: the "
            "handlers belong to that nursery and outlive the listener; "
            "cancel it yourself, or leave out handler_nursery="
        )
    if resolved["ssl_context"] is not None and flags & Flag.LEAVE_SOCKETS_BLOCKING:
        raise ValueError(
            "ssl_context= hands handlers a trio.SSLStream, which "
            "Flag.LEAVE_SOCKETS_BLOCKING (plain blocking sockets) excludes"
        )
    return resolved


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
