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

import ssl
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final, TypedDict

import attrs
import trio

from ._checks import (
    HandlerErrors,
    StreamClass,
    agent_port,
    boolean,
    check_max_connections,
    file_mode,
    float_or_none,
    handler_errors,
    int_or_none,
    keepalive_seconds,
    networks,
    nursery_or_none,
    seconds,
    seconds_or_none,
    ssl_context_or_none,
    stream_class,
)
from ._clients import (
    IPV6_PREFIX,
    TABLE_SIZE,
    ClientPolicy,
    client_policy,
    ipv6_prefix,
    table_size,
)
from ._flags import Flag
from ._overload import positive_seconds_or_none, rate_or_none
from ._proxy_reader import PROXY_TIMEOUT, Network
from ._stream import SocketStream
from ._transport import check_protocol_factory

#: How long a TLS handshake may take, by default, before the connection is
#: dropped (it runs in the handler's task, so it never blocks accepting).
TLS_HANDSHAKE_TIMEOUT: Final = 10.0


@attrs.frozen
class Cli:
    """How an option is spelled on the command line (``--max-connections N``).

    ``parse`` turns the text into the value the option's check then takes;
    ``metavar=None`` makes a flag without a value (``store_true``);
    ``repeat`` collects every use into a list. ``help`` is the ``--help``
    text where the reference's would mislead on a command line (it speaks of
    Python: other arguments such as ``ssl_context=``, methods, leaving the
    ``async with`` block); ``shown`` is how ``--help`` states a default that
    is no value one types (``None`` of a repeated option).
    """

    metavar: str | None
    parse: Callable[[str], object] = str
    repeat: bool = False
    help: str | None = None
    shown: str | None = None


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
            Cli(
                "N",
                int_or_none,
                help="at this many running handlers, stop accepting until one "
                "finishes (connections wait in the kernel's backlog); none: no "
                "limit. A warning says when RLIMIT_NOFILE is below it plus a "
                "reserve of 64.",
            ),
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
            Cli(
                "N",
                int_or_none,
                help="with --proxy-protocol: at this many connections accepted "
                "but not yet handed to a handler (still sending their PROXY "
                "header, or waiting for a slot of --max-connections), stop "
                "accepting until one is; none: what the file descriptors "
                "allow, RLIMIT_NOFILE minus --max-connections minus a reserve "
                "of 64 (at least 64).",
            ),
        ),
    ]
    drain_timeout: Annotated[
        float | None,
        Option(
            None,
            seconds_or_none,
            "on leaving the block, drain as :meth:`~ConnListener.drain` does: "
            "set ``listener.draining``, wait this many seconds for running "
            "handlers, then cancel them (``None``: wait for all).",
            Cli(
                "SECONDS",
                float_or_none,
                help="on SIGINT or SIGTERM, drain before stopping: stop "
                "accepting, serve the connections the kernel had queued, wait "
                "this many seconds for running handlers, then cancel them "
                "(none: wait for all).",
            ),
        ),
    ]
    lameduck: Annotated[
        float,
        Option(
            0.0,
            seconds,
            "a drain (:meth:`~ConnListener.drain`, leaving the block, SIGTERM "
            "to the command lines) first spends up to this many seconds as a "
            "lame duck: the agent port (``agent_port=``) answers ``drain`` "
            "while the listener goes on accepting and serving as before, so "
            "that the load balancer stops sending before the socket closes. "
            "With an agent port it ends early once the agent has said "
            "``drain`` and then no connection arrived for 1 s. Handlers see "
            ":attr:`~ConnListener.lameduck`; ``listener.draining`` is set "
            "only when the drain proper begins. ``0``: no lame duck.",
            Cli(
                "SECONDS",
                float,
                help="on SIGTERM, first spend up to this many seconds as a "
                "lame duck: the agent port says drain while the server goes on "
                "accepting and serving, so the load balancer stops sending "
                "before the port closes; with --agent-port it ends once the "
                "agent said drain and no connection came for 1 s. Then drain "
                "(see --drain-timeout). 0: no lame duck.",
            ),
        ),
    ]
    agent_port: Annotated[
        int | None,
        Option(
            None,
            agent_port,
            "answer HAProxy's agent check (``agent-check agent-port PORT``) on "
            "this TCP port of the listener's host (``0``: a free one, see "
            ":attr:`~ConnListener.agent_port`): ``up ready NN%`` while "
            "serving, the weight from free capacity; ``drain`` in the lame "
            "duck, while draining, disabled or without a callback; ``drain "
            "stopped#closed`` once closed. Not for a Unix socket listener.",
            Cli(
                "PORT",
                int_or_none,
                help="answer HAProxy's agent check (agent-check agent-port "
                "PORT) on this port of --host: 'up ready NN%' while serving, "
                "the weight from free capacity; 'drain' in the lame duck or "
                "while draining; 'drain stopped#closed' once closed. Under the "
                "workers, the supervisor answers for the set.",
            ),
        ),
    ]
    protocol: Annotated[
        Callable[[], object] | None,
        Option(
            None,
            check_protocol_factory,
            "protocol mode: serve each connection with ``protocol()``, an "
            ":class:`asyncio.Protocol` or :class:`asyncio.BufferedProtocol` "
            "(asyncio's ``protocol_factory``), whose callbacks one task of the "
            "listener calls for every ready connection, instead of a handler "
            "task per connection. Give no accept callback then. See the "
            'tutorial\'s "Protocol mode" for when to use which.',
        ),
    ]
    stream: Annotated[
        StreamClass,
        Option(
            SocketStream,
            stream_class,
            "the class of the stream each handler gets: "
            ":class:`trio_evlisten.SocketStream`, a "
            ":class:`trio.abc.HalfCloseableStream` with "
            ":class:`trio.SocketStream`'s surface and semantics for less CPU "
            "per call (figures on the docs' benchmarks page); or "
            ":class:`trio.SocketStream` itself, for code "
            "that needs exactly that type. With ``ssl_context=`` the handler "
            "gets a :class:`trio.SSLStream` over it.",
        ),
    ]
    handler_nursery: Annotated[
        trio.Nursery | None,
        Option(
            None,
            nursery_or_none,
            "run handlers in this nursery instead of the listener's own; they "
            "then outlive the block (and ``drain_timeout`` cannot apply).",
        ),
    ]
    handler_errors: Annotated[
        HandlerErrors,
        Option(
            "log",
            handler_errors,
            '``"log"`` logs an exception escaping a handler and goes on; '
            '``"raise"`` lets it propagate, which ends the listener and '
            "everything in its nursery.",
        ),
    ]
    ssl_context: Annotated[
        ssl.SSLContext | None,
        Option(
            None,
            ssl_context_or_none,
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
            seconds,
            "seconds the TLS handshake may take.",
        ),
    ]
    proxy_protocol: Annotated[
        bool,
        Option(
            False,
            boolean,
            "every connection starts with a PROXY protocol v1 or v2 header "
            "(HAProxy's, as HAProxy and nginx send it), read in the handler's "
            "task before any TLS handshake; ``addr`` is then the original "
            "client's (the real peer's for ``LOCAL``/``UNKNOWN``). Exactly the "
            "header's bytes are consumed. A peer outside ``proxy_trusted``, or "
            "a bad, truncated or slow header, drops the connection without "
            "calling the handler (counted in ``statistics().proxy_rejected``; "
            "at most one WARNING per 10 s).",
            Cli(
                None,
                help="every connection starts with a PROXY protocol v1 or v2 "
                "header (as HAProxy and nginx send it); the handler's addr is "
                "then the original client's. A peer outside --proxy-trusted, "
                "or a bad, truncated or slow header, drops the connection "
                "without calling the handler (at most one WARNING per 10 s).",
            ),
        ),
    ]
    proxy_trusted: Annotated[
        Iterable[str | Network] | None,
        Option(
            None,
            networks,
            'the networks (``"10.0.0.0/8"``, ``"::1"``, :mod:`ipaddress` '
            "networks) that may send a header; ``None`` means loopback only "
            "(``127.0.0.0/8``, ``::1``). Unix-socket peers are always trusted.",
            Cli(
                "NETWORK",
                repeat=True,
                help="with --proxy-protocol: a network (10.0.0.0/8, ::1) that "
                "may send a PROXY header; repeat it for several.",
                shown="127.0.0.0/8, ::1",
            ),
        ),
    ]
    proxy_timeout: Annotated[
        float,
        Option(
            PROXY_TIMEOUT,
            seconds,
            "seconds the PROXY header may take to arrive.",
            Cli("SECONDS", float),
        ),
    ]
    keepalive: Annotated[
        int | None,
        Option(
            300,
            keepalive_seconds,
            "TCP keep-alive, as libevent 2.2 sets it on the listeners it binds: "
            "a connection idle this many seconds is probed every third of that, "
            "and dropped after 3 unanswered probes, so a peer that vanished "
            "(power cut, cable pulled) is found within twice this time. Set on "
            "the listening socket, which every accepted socket inherits (no cost "
            "per connection). Applies to TCP sockets open_listener binds; with "
            "``sock=`` only when given, so a socket set up by systemd keeps its "
            "``KeepAlive=``; for a Unix socket it is an error. ``None``: off.",
            Cli(
                "SECONDS",
                int_or_none,
                help="TCP keep-alive, as libevent 2.2 sets it: a connection "
                "idle this many seconds is probed every third of that, and "
                "dropped after 3 unanswered probes; none: off.",
            ),
        ),
    ]
    unix_mode: Annotated[
        int | None,
        Option(
            None,
            file_mode,
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
    # Shedding load at the door (see _overload.py and _clients.py).
    max_loop_lag: Annotated[
        float | None,
        Option(
            None,
            positive_seconds_or_none,
            "stop accepting while Trio's event loop runs later than this many "
            "seconds (measured by a timer that asks to wake every 5 ms; without "
            "this option there is no timer): connections wait in the kernel's "
            "backlog, as at ``max_connections``, and accepting resumes once the "
            "lag is back under half the bound. Near the bound, one connection "
            "is accepted per wake-up. So the connections already taken stay "
            "fast when more arrive than the program can serve. "
            "``statistics()`` shows ``paused_by_load``, ``load_paused_seconds`` "
            "and ``loop_lag``. Envoy's overload manager "
            "``stop_accepting_connections`` action does this on heap or "
            "connection pressure; nginx and HAProxy have no equivalent.",
            Cli(
                "SECONDS",
                float_or_none,
                help="stop accepting while the event loop runs later than this "
                "many seconds (measured by a 5 ms timer), resume once the lag "
                "is under half of it, and pace accepting by how well the loop "
                "keeps up; none: no bound, no timer.",
            ),
        ),
    ]
    max_accept_rate: Annotated[
        float | None,
        Option(
            None,
            rate_or_none,
            "accept at most this many connections per second, as a token "
            "bucket holding ``accept_burst`` tokens: while it is empty the "
            "listener does not accept (connections wait in the backlog) until "
            "the next token. HAProxy's ``rate-limit sessions``, Envoy's "
            "``envoy.filters.listener.local_ratelimit`` (a token bucket), "
            "nginx's ``limit_req`` for requests.",
            Cli(
                "PER_SECOND",
                float_or_none,
                help="accept at most this many connections per second (a token "
                "bucket of --accept-burst); none: no limit.",
            ),
        ),
    ]
    accept_burst: Annotated[
        int | None,
        Option(
            None,
            check_max_connections,
            "with ``max_accept_rate``: how many connections may be accepted at "
            "once after a quiet spell (the bucket's size; nginx's ``burst=``, "
            "Envoy's ``max_tokens``). ``None``: what a tenth of a second earns, "
            "at least 1.",
            Cli(
                "N",
                int_or_none,
                help="with --max-accept-rate: how many connections may be "
                "accepted at once after a quiet spell; none: what a tenth of a "
                "second earns, at least 1.",
            ),
        ),
    ]
    max_connections_per_client: Annotated[
        int | None,
        Option(
            None,
            check_max_connections,
            "at most this many connections per client address (the one the "
            "PROXY header names with ``proxy_protocol=True``; IPv6 grouped by "
            "``client_ipv6_prefix``; Unix-socket peers are not counted). One "
            "over it is refused or held, by ``client_limit_policy``. nginx's "
            "``limit_conn`` with ``limit_conn_zone $binary_remote_addr``, "
            "HAProxy's stick table ``conn_cur`` with ``tcp-request connection "
            "reject``; Envoy has none.",
            Cli(
                "N",
                int_or_none,
                help="at most this many connections per client address (the "
                "PROXY header's with --proxy-protocol; IPv6 by "
                "--client-ipv6-prefix); over it, refused or held by "
                "--client-limit-policy; none: no limit.",
            ),
        ),
    ]
    client_limit_policy: Annotated[
        ClientPolicy,
        Option(
            "refuse",
            client_policy,
            """over ``max_connections_per_client``: ``"refuse"`` closes the """
            'connection at once (as nginx and HAProxy do); ``"hold"`` keeps it, '
            "pending and holding no handler slot, until one of that client's "
            "connections ends (at most ``max_connections_per_client`` held per "
            "client; beyond, refused). Held connections count towards "
            "``max_pending``.",
            Cli(
                "POLICY",
                help="over --max-connections-per-client: refuse (close at "
                "once) or hold (wait, with no handler slot, until that "
                "client's count drops; at most that many held per client).",
            ),
        ),
    ]
    client_ipv6_prefix: Annotated[
        int,
        Option(
            IPV6_PREFIX,
            ipv6_prefix,
            "IPv6 clients are counted by this many leading bits of their "
            "address (one host or site commonly holds a whole /64); 128 counts "
            "each address apart. IPv4 clients are counted by address.",
            Cli(
                "BITS",
                int,
                help="with --max-connections-per-client: count IPv6 clients by "
                "this many leading bits of their address.",
            ),
        ),
    ]
    client_table_size: Annotated[
        int,
        Option(
            TABLE_SIZE,
            table_size,
            "the most clients counted at once for ``max_connections_per_client`` "
            "(an entry lives while its client has a connection; about 150 bytes "
            "each, so the default bounds the table near 10 MB). A new client "
            "finding it full is refused, as nginx does when a "
            "``limit_conn_zone`` is exhausted.",
            Cli(
                "N",
                int,
                help="with --max-connections-per-client: the most clients "
                "counted at once; a new client finding the table full is "
                "refused.",
            ),
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

    An option given (a key of ``given``, whatever its value, the default
    too) where it cannot apply is refused rather than silently ignored:
    ``tls_handshake_timeout`` without ``ssl_context``, ``proxy_trusted`` or
    ``proxy_timeout`` without ``proxy_protocol=True``, ``max_pending``
    without either, ``stream`` with ``Flag.LEAVE_SOCKETS_BLOCKING``.

    Raises:
        TypeError: an unknown option name, or a value of the wrong type.
        ValueError: a bad value, options that exclude each other, or an
            option given where it cannot apply (each message names them, and
            what would make it apply).
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
    _refuse_what_cannot_apply(given, resolved, flags)
    if resolved["protocol"] is not None:
        _refuse_in_protocol_mode(given, resolved, flags)
    return resolved


def _refuse_in_protocol_mode(
    given: Mapping[str, object], resolved: ListenerOptions, flags: Flag
) -> None:
    """Refuse what cannot apply in protocol mode."""
    for name, why in (("stream", "a protocol gets a transport, not a stream"),):
        if name in given and resolved[name] is not None:  # type: ignore[literal-required]
            raise ValueError(
                f"{name}= cannot be given with protocol=: {why}; leave out one of them"
            )
    if flags & Flag.LEAVE_SOCKETS_BLOCKING:
        raise ValueError(
            "Flag.LEAVE_SOCKETS_BLOCKING hands handlers blocking sockets, but "
            "protocol= serves connections with transports; leave out one of them"
        )


def _refuse_what_cannot_apply(
    given: Mapping[str, object], resolved: ListenerOptions, flags: Flag
) -> None:
    """Refuse an option given where nothing reads it.

    "Given" is a key of ``given``, not a value that differs from the
    default: ``tls_handshake_timeout=10`` without TLS is as much a mistake
    (a forgotten ``ssl_context=``, most likely) as any other value.
    """
    tls = resolved["ssl_context"] is not None
    proxy = resolved["proxy_protocol"]
    if "tls_handshake_timeout" in given and not tls:
        raise ValueError(
            "tls_handshake_timeout= bounds the TLS handshake, which only "
            "happens with ssl_context=; give ssl_context= too, or leave "
            "tls_handshake_timeout= out"
        )
    for name in ("proxy_trusted", "proxy_timeout"):
        if name in given and not proxy:
            raise ValueError(
                f"{name}= applies to the PROXY header, which is only read with "
                f"proxy_protocol=True; give proxy_protocol=True too, or leave "
                f"{name}= out"
            )
    per_client = resolved["max_connections_per_client"] is not None
    if "max_pending" in given and not (tls or proxy or per_client):
        raise ValueError(
            "max_pending= bounds the connections in their PROXY header or TLS "
            "handshake, which there are only with proxy_protocol=True or "
            "ssl_context=; give one of those, or leave max_pending= out (to "
            "bound running handlers, use max_connections=); connections held "
            "by max_connections_per_client= pend too"
        )
    if "accept_burst" in given and resolved["max_accept_rate"] is None:
        raise ValueError(
            f"accept_burst={resolved['accept_burst']!r} is the size of "
            "max_accept_rate='s bucket; give max_accept_rate= too (the rate "
            "that fills it), or leave accept_burst= out"
        )
    for name in ("client_limit_policy", "client_ipv6_prefix", "client_table_size"):
        if name in given and not per_client:
            raise ValueError(
                f"{name}= applies to max_connections_per_client=; give it too, "
                f"or leave {name}= out"
            )
    if "stream" in given and flags & Flag.LEAVE_SOCKETS_BLOCKING:
        raise ValueError(
            "stream= is the class of the stream handlers get, but with "
            "Flag.LEAVE_SOCKETS_BLOCKING they get a blocking socket.socket "
            "instead; leave out stream= or the flag"
        )
