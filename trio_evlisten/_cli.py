"""The command line: ``python -m trio_evlisten echo [options]``.

The evconnlistener chapter's echo server, with the listener's options on the
command line, to try flags and limits against real clients
(``nc 127.0.0.1 9876``). :func:`main` takes ``argv`` and returns the exit
status, so tests can call it in-process:

- 0: stopped by Ctrl-C (SIGINT) or SIGTERM; a one-line summary of
  :meth:`ConnListener.statistics` is printed.
- 1: the listener could not be opened (port in use, unknown host), or an
  accept error stopped it (printed with its errno, as the chapter's
  ``accept_error_cb`` does, then the summary).
- 2: bad arguments (one error line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import operator
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import trio

from ._flags import Flag
from ._open import open_listener
from ._option_flags import add_arguments, from_arguments
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._listener import ConnListener
    from ._socket import SockArg
    from ._stats import ListenerStatistics
    from ._stream import SocketStream

PROG: Final = "python -m trio_evlisten"
DEFAULT_HOST: Final = "0.0.0.0"
DEFAULT_PORT: Final = 9876
DEFAULT_FLAGS: Final = Flag.CLOSE_ON_FREE | Flag.REUSEABLE

#: One line per flag for ``--help``; a test checks that every Flag is here.
FLAG_HELP: Final[Mapping[Flag, str]] = {
    Flag.LEAVE_SOCKETS_BLOCKING: "blocking sockets for handlers (refused by echo)",
    Flag.CLOSE_ON_FREE: "closing the listener closes its socket (default)",
    Flag.CLOSE_ON_EXEC: "make the listening socket non-inheritable",
    Flag.REUSEABLE: "SO_REUSEADDR: rebind at once on restart (default)",
    Flag.THREADSAFE: "enable/disable/close callable from any thread",
    Flag.DISABLED: "start disabled (refused by echo)",
    Flag.DEFERRED_ACCEPT: "TCP_DEFER_ACCEPT: accept once the client has sent",
    Flag.REUSEABLE_PORT: "SO_REUSEPORT: several servers share the port",
    Flag.BIND_IPV6ONLY: "IPV6_V6ONLY: an IPv6 --host (::) serves IPv6 only",
}

# Flags that make no sense for this server: the echo handler is async and
# reads a trio stream, and nothing on the command line could enable a
# listener started disabled.
_REFUSED: Final[Mapping[Flag, str]] = {
    Flag.LEAVE_SOCKETS_BLOCKING: "the echo handler needs trio streams, "
    "not blocking sockets",
    Flag.DISABLED: "nothing would ever enable the listener",
}

_EPILOG: Final = f"""\
example:
  {PROG} echo --port 9999 \\
      --flags close_on_free reuseable reuseable_port --max-connections 100
  nc 127.0.0.1 9999     # type lines, get them back; Ctrl-C stops the server

flags (case-insensitive; --flags replaces the default CLOSE_ON_FREE REUSEABLE,
and --flags with no names means none):
{chr(10).join(f"  {flag.name:<24}{text}" for flag, text in FLAG_HELP.items())}

exit status: 0 after Ctrl-C or SIGTERM (a statistics summary is printed),
1 if the listener cannot be opened or an accept error stops it,
2 for bad arguments.
"""


@attrs.frozen(kw_only=True)
class EchoOptions:
    """What ``python -m trio_evlisten echo`` was asked to do.

    ``listener`` holds the listener options given on the command line
    (``{"max_connections": 5}``); the others keep their defaults.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    flags: Flag = DEFAULT_FLAGS
    backlog: int = -1
    listener: Mapping[str, Any] = attrs.field(factory=dict)
    #: Serve the echo in protocol mode (``--protocol``).
    protocol: bool = False


def parse_flag(text: str) -> Flag:
    """A :class:`Flag` from its name, in any case (``LEV_OPT_`` prefix allowed).

    Raises:
        argparse.ArgumentTypeError: an unknown name, or a flag this server
            refuses; the message lists the valid names.
    """
    name = text.strip().upper().replace("-", "_").removeprefix("LEV_OPT_")
    try:
        flag = Flag[name]
    except KeyError:
        valid = ", ".join(str(f.name) for f in FLAG_HELP if f not in _REFUSED)
        raise argparse.ArgumentTypeError(
            f"unknown flag {text!r}; valid flags (any case): {valid}"
        ) from None
    if flag in _REFUSED:
        raise argparse.ArgumentTypeError(
            f"flag {flag.name} is refused by the echo server: {_REFUSED[flag]}"
        )
    return flag


def parse_port(text: str) -> int:
    """A TCP port number, 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"port must be an integer from 0 to 65535, not {text!r}"
        )
    return port


def parse_backlog(text: str) -> int:
    """A ``listen()`` backlog: negative for the OS maximum, else >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"backlog must be an integer (-1 for the OS maximum), not {text!r}"
        ) from None
    if value == 0:
        # 0 means "already listening" to open_listener, which only a sock=
        # can be; the command line always binds a fresh socket.
        raise argparse.ArgumentTypeError(
            "backlog must be -1 (the OS maximum) or >= 1, not '0'"
        )
    return value


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and --help.

    argparse prints its usage (often several lines) before the error; for a
    server started by scripts and units, the one line that says what is
    wrong is what belongs in the log.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m trio_evlisten`` parser, with its ``echo`` command."""
    parser = OneLineParser(
        prog=PROG,
        description="trio_evlisten: libevent's evconnlistener in Trio. "
        "Run a server from the command line.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    echo_parser = commands.add_parser(
        "echo",
        help="an echo server: every byte a client sends comes back to it",
        description="An echo server (the evconnlistener chapter's example): every "
        "byte a client\nsends comes back to it. It prints the address it listens "
        "on; Ctrl-C stops it\nand prints the listener's statistics. An accept "
        "error is printed with its\nerrno and stops it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    echo_parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind: an IPv4 or IPv6 address or a host name "
        f"(default: {DEFAULT_HOST})",
    )
    echo_parser.add_argument(
        "--port",
        type=parse_port,
        default=DEFAULT_PORT,
        help=f"TCP port, 0 for any free one (default: {DEFAULT_PORT})",
    )
    echo_parser.add_argument(
        "--flags",
        type=parse_flag,
        nargs="*",
        default=[DEFAULT_FLAGS],
        metavar="FLAG",
        help="listener flags, listed below (default: CLOSE_ON_FREE REUSEABLE)",
    )
    echo_parser.add_argument(
        "--backlog",
        type=parse_backlog,
        default=-1,
        metavar="N",
        help="listen() backlog; -1 is the OS maximum (default: -1)",
    )
    echo_parser.add_argument(
        "--protocol",
        action="store_true",
        # Not "protocol": that is the listener option's name, which
        # from_arguments() would take as the factory.
        dest="protocol_mode",
        help="serve the echo in protocol mode: an asyncio Protocol whose "
        "callbacks one task calls for every ready connection, instead of a "
        "task per connection",
    )
    # Every listener option with a command-line spelling (see _options).
    # Without --drain-timeout a stop cuts the connections, so that the
    # summary's "active" says how many it cut.
    add_arguments(
        echo_parser,
        unset={"drain_timeout": "no drain: a stop cancels running handlers at once"},
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> EchoOptions:
    """The options for ``argv`` (``sys.argv[1:]`` if None).

    Raises:
        SystemExit: bad arguments (status 2, after argparse printed usage and
            the error), ``--help`` or ``--version`` (status 0).
    """
    ns = build_parser().parse_args(argv)
    return EchoOptions(
        host=ns.host,
        port=ns.port,
        flags=functools.reduce(operator.or_, ns.flags, Flag(0)),
        backlog=ns.backlog,
        listener=from_arguments(ns),
        protocol=ns.protocol_mode,
    )


def format_address(sockname: object) -> str:
    """``host:port``, with IPv6 hosts in brackets (``[::1]:9876``)."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockname)


def format_summary(reason: str, stats: ListenerStatistics) -> str:
    """The line printed when the server stops."""
    return (
        f"Stopped ({reason}): accepted={stats.accepted} active={stats.active} "
        f"errors={stats.errors} retried={stats.retried} "
        f"handler_errors={stats.handler_errors}"
    )


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    """The bufferevent's read callback: copy all input to the output."""
    async for data in conn:
        await conn.send_all(data)
    # EOF: the listener closes the stream when this returns.


class EchoProtocol(asyncio.Protocol):
    """The echo in protocol mode: the bufferevent's read callback."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        # A peer that does not read what it is sent: stop reading it too.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


@attrs.define(eq=False)
class _EchoServer:
    """One run of the server: why it stopped, and the counters then."""

    reason: str = ""
    stats: ListenerStatistics | None = None
    error: OSError | None = None

    def stop(self, listener: ConnListener, reason: str) -> None:
        # The snapshot is taken before the handlers are cancelled, so that
        # ``active`` says how many connections the stop cut.
        self.reason = reason
        self.stats = listener.statistics()
        listener.nursery.cancel_scope.cancel()  # event_base_loopexit(base, NULL)

    def accept_error(self, listener: ConnListener, error: OSError) -> None:
        """Print the error and stop, as the chapter's ``accept_error_cb``."""
        err = error.errno or 0
        text = os.strerror(err) if err else str(error)
        print(
            f"Got an error {err} ({text}) on the listener. Shutting down.",
            file=sys.stderr,
            flush=True,
        )
        self.error = error
        self.stop(listener, "accept error")


async def serve_echo(options: EchoOptions, *, sock: SockArg | None = None) -> int:
    """Run the echo server until SIGINT, SIGTERM or an accept error.

    Args:
        options: what to bind and how.
        sock: serve this socket instead of binding ``options.host`` and
            ``options.port`` (tests pass a
            :class:`~trio_evlisten.testing.ScriptedSocket`).

    Returns:
        The exit status: 0 after a signal, 1 if the listener could not be
        opened or an accept error stopped it, 2 for options the listener
        refused (``BIND_IPV6ONLY`` with an IPv4 host, say).

    Error handling:
        Opening errors and accept errors are printed on stderr as one line;
        nothing is raised for them. SIGINT and SIGTERM are received as
        signals (no ``KeyboardInterrupt``), so stopping prints no traceback.

    Resource handling:
        A socket this function bound is closed on return, with or without
        ``CLOSE_ON_FREE``; a ``sock`` passed in is closed only with
        ``CLOSE_ON_FREE``. Connections still open when the server stops are
        cancelled and closed.
    """
    server = _EchoServer()
    where = format_address((options.host, options.port))
    address = None if sock is not None else (options.host, options.port)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with contextlib.AsyncExitStack() as stack:
            try:
                listener = await stack.enter_async_context(
                    open_listener(
                        *(() if options.protocol else (echo,)),
                        address=address,
                        sock=sock,
                        flags=options.flags,
                        backlog=options.backlog,
                        error_cb=server.accept_error,
                        **(
                            {"protocol": EchoProtocol, **options.listener}
                            if options.protocol
                            else options.listener
                        ),
                    )
                )
            except OSError as exc:
                # An error binding the address names it already (_socket.py).
                named = exc.strerror if address is not None else None
                if named is not None and not named.startswith("cannot listen on"):
                    named = None
                print(
                    f"{PROG} echo: error: "
                    + (named or f"cannot listen on {where}: {exc.strerror or exc}"),
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            except ValueError as exc:
                print(f"{PROG} echo: error: {exc}", file=sys.stderr, flush=True)
                return 2
            agent = listener.agent_port
            print(
                f"Echo server listening on {format_address(listener.sockname)}"
                + ("" if agent is None else f", agent check on port {agent}"),
                flush=True,
            )
            # Without CLOSE_ON_FREE the listener leaves the socket it bound to
            # its caller (libevent's rule): take it, to close it below.
            free = options.flags & Flag.CLOSE_ON_FREE
            bound = listener.socket if sock is None and not free else None
            async for signum in signals:
                given = options.listener
                if "drain_timeout" in given or given.get("lameduck"):
                    # --drain-timeout: serve the queued connections and give
                    # the running ones that long before they are cut (none
                    # without it). --lameduck: SIGTERM (a deployment
                    # stopping us) first tells the balancer; Ctrl-C at a
                    # terminal has no balancer to wait for.
                    await listener.drain(
                        given.get("drain_timeout", 0),
                        lameduck=None if signum == signal.SIGTERM else 0,
                    )
                server.stop(listener, signal.Signals(signum).name)
                break
    if bound is not None:
        bound.close()
    # Reached after a signal or after accept_error's loopexit; the stop
    # recorded the counters in both cases.
    assert server.stats is not None
    print(format_summary(server.reason, server.stats), flush=True)
    return 1 if server.error is not None else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m trio_evlisten`` with ``argv`` (``sys.argv[1:]`` if None).

    Returns:
        The exit status (see the module docstring); ``--help`` and
        ``--version`` return 0.
    """
    try:
        options = parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    # Handler errors (none are expected from echo) and ERROR records from the
    # listener go to stderr with their tracebacks.
    logging.basicConfig(format="%(name)s: %(levelname)s: %(message)s")
    try:
        return trio.run(serve_echo, options)
    except KeyboardInterrupt:
        # Ctrl-C before the signal receiver was installed: nothing was
        # listening yet, so there is nothing to summarize.
        print("Interrupted before the listener opened.", file=sys.stderr)
        return 0
