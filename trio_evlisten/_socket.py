"""The listening socket: making, wrapping, configuring, reading, releasing.

One stage of the listener, whole: turn ``address=`` or ``sock=`` plus the
flags, the options (``keepalive``, ``unix_mode``) and the backlog into a
listening, non-blocking socket, refusing what cannot apply (a flag a Unix
socket does not have; a string that is a ``host:port``, not a path); say
what went wrong when binding fails; read the accept queue's depth and
limit from ``TCP_INFO``; and release the socket again as ``CLOSE_ON_FREE``
says. Nothing here accepts.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import struct
import sys
from typing import Final, TypeAlias, final

import attrs
import trio

from ._errors import ResourceLimitWarning, warn_at_caller
from ._flags import Flag

#: What ``address=`` takes: ``(host, port)``, ``(host, port, flowinfo,
#: scope_id)`` or a Unix socket path.
Address: TypeAlias = (
    "tuple[str | None, int] | tuple[str | None, int, int, int] | str | os.PathLike[str]"
)
#: What ``sock=`` takes.
SockArg: TypeAlias = "socket.socket | trio.socket.SocketType | int"
#: A trio socket (spelled here: in :class:`ListeningSocket` ``trio`` is a field).
TrioSocket: TypeAlias = trio.socket.SocketType


@final
@attrs.define(eq=False)
class ListeningSocket:
    """The listening socket and who must clean up what when it is released.

    ``std`` and ``trio`` are the same socket object seen through the stdlib
    (used for the fast synchronous ``accept()``) and through trio (handed to
    users and waited on).
    """

    std: socket.socket
    trio: trio.socket.SocketType
    #: A Unix socket path that we bound, to unlink when we close the socket.
    unlink_path: str | None = None
    #: The caller gave an int fd: we made the socket object around it, so
    #: without CLOSE_ON_FREE we must detach rather than let it close the fd.
    from_fd: bool = False
    #: ``trio`` wraps a second socket object sharing ``std``'s fd (``std`` is
    #: a subclass of socket.socket, which trio refuses to wrap); only one of
    #: the two may close the fd, the other must be detached.
    twin: bool = False
    #: The backlog in effect after the kernel's cap, when we called listen().
    backlog: int | None = None
    #: Set by :func:`hand_off`: a successor holds the socket, and its queue.
    handed_off: bool = False
    #: We bound it (``address=``): the caller has it only if they take it.
    bound_here: bool = False
    #: The caller took it (``listener.socket`` or ``listener.fd``).
    taken: bool = False

    def take(self) -> TrioSocket:
        """The socket, for the caller (``listener.socket``): now theirs to close."""
        self.taken = True
        return self.trio

    def take_fd(self) -> int:
        """The fd, for the caller (``listener.fd``): now theirs to close."""
        self.taken = True
        return self.std.fileno()

    def warn_if_left_listening(self) -> None:
        """A :exc:`ResourceWarning` if the socket we bound listens on unheld.

        Without ``CLOSE_ON_FREE`` the socket outlives the listener (libevent's
        rule); a socket the caller gave, or took, is theirs to close. One we
        bound that they never took still listens, unaccepted: clients that
        connect now wait in its queue, which looks like a hang.
        """
        if (
            not self.bound_here
            or self.taken
            or self.handed_off
            or self.closed_underfoot()
        ):
            return
        name = self.std.getsockname()
        where = _host_port(name[0], name[1]) if isinstance(name, tuple) else repr(name)
        warn_at_caller(
            ResourceWarning(
                f"the listener on {where} was opened without Flag.CLOSE_ON_FREE, "
                "so the socket it bound still listens after the block, with "
                "nobody to accept: clients that connect now wait. Pass "
                "Flag.CLOSE_ON_FREE to close it with the listener, or take it "
                "inside the block (listener.socket or listener.fd) and close it "
                "yourself"
            )
        )

    def hand_off(self) -> None:
        """A successor holds the socket now: leave it its path and its queue."""
        self.unlink_path = None
        self.handed_off = True

    def closed_underfoot(self) -> bool:
        """Whether someone closed the socket behind the listener's back.

        Either object may have been closed (``listener.socket`` is the trio
        one; with a twin they are different objects on one fd).
        """
        return self.std.fileno() == -1 or self.trio.fileno() == -1

    def release(self, close: bool) -> None:
        """Close the socket (CLOSE_ON_FREE) or leave it open for the caller.

        Idempotent. ``trio.socket`` close notifies any task waiting on the
        fd, so this is safe while the accept task waits on it.
        """
        if close:
            if self.unlink_path is not None:
                _unlink_if_ours(self.unlink_path, self.std)
                self.unlink_path = None
            self.trio.close()
            if self.twin:
                self.std.detach()
            return
        if self.std.fileno() == -1:
            return
        if self.from_fd or self.twin:
            # Tell trio the fd is going away from it, then let go of it
            # without closing it: the fd (or the caller's object) keeps it.
            trio.lowlevel.notify_closing(self.std)
        if self.twin:
            self.trio.detach()
        if self.from_fd:
            self.std.detach()


def _unlink_if_ours(path: str, sock: socket.socket) -> None:
    # Only remove the path if it still is a socket: someone may have replaced
    # it since (a restarted server binding the same path), and removing theirs
    # would break it.
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode) and sock.fileno() != -1:
            os.unlink(path)
    except OSError:
        pass


async def make_listening_socket(
    *,
    address: Address | None,
    sock: SockArg | None,
    flags: Flag,
    backlog: int,
    keepalive: int | None = None,
    unix_mode: int | None = None,
) -> ListeningSocket:
    """Bind ``address`` or wrap ``sock``, apply ``flags``, and listen.

    ``keepalive`` (idle seconds) turns TCP keep-alive on for a TCP socket;
    ``unix_mode`` is the permission bits of a Unix socket's file, set before
    ``listen()``.

    Error handling:
        Bad argument types raise :exc:`TypeError`, bad values
        :exc:`ValueError`, both naming the value. The OS's refusals while
        binding ``address`` (``EADDRINUSE``, ``EACCES``, a host that does
        not resolve) are raised as an :exc:`OSError` of the same class and
        errno whose message names the address, with the original as its
        ``__cause__``; an ``EADDRINUSE`` also says what holds the address
        where that can be told, and what would help (see
        :func:`_in_use_hint_inet`, :func:`_in_use_hint_unix`). Nothing is
        removed on the caller's behalf. With ``sock=`` they propagate as
        they are.

    Resource handling:
        A socket this function creates is closed if any later step fails. A
        socket given in ``sock=`` is never closed here, even on failure: it
        is still the caller's until this function returns.
    """
    if (address is None) == (sock is None):
        raise TypeError(
            "give exactly one of address= (to bind a new socket) and sock= "
            f"(to wrap an existing one), not address={address!r}, sock={sock!r}"
        )
    if sock is not None:
        backlog = check_backlog(backlog, wrapping=True)
        if unix_mode is not None:
            raise ValueError(
                "unix_mode= sets the mode of a Unix socket file open_listener "
                "binds, before listen(); with sock= the socket is already "
                "bound: chmod its path yourself before it listens"
            )
        return _wrap(sock, flags, backlog, keepalive)
    assert address is not None
    backlog = check_backlog(backlog, wrapping=False)
    if isinstance(address, (str, os.PathLike)):
        path = os.fspath(address)
        check_unix_path(address, path)
        if keepalive is not None:
            raise ValueError(
                f"keepalive={keepalive!r} is TCP keep-alive, which a Unix "
                f"socket ({path!r}) does not have; leave it out"
            )
        try:
            return _bind_unix(path, flags, backlog, unix_mode)
        except OSError as exc:
            hint = _in_use_hint_unix(path) if exc.errno == errno.EADDRINUSE else ""
            raise _naming(exc, repr(path), hint) from exc
    if unix_mode is not None:
        raise ValueError(
            f"unix_mode= is for Unix socket paths, not the TCP address {address!r}"
        )
    try:
        family, sockaddr = await _resolve(address)
    except OSError as exc:  # the host did not resolve
        raise _naming(exc, _host_port(address[0] or "0.0.0.0", address[1])) from exc
    try:
        return _bind_inet(family, sockaddr, flags, backlog, keepalive)
    except OSError as exc:
        where = _host_port(str(sockaddr[0]), address[1])
        if address[0] and address[0] != sockaddr[0]:
            where += f" ({address[0]})"
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = _in_use_hint_inet(family, sockaddr, flags)
        raise _naming(exc, where, hint) from exc


async def _resolve(address: object) -> tuple[int, tuple[object, ...]]:
    if not isinstance(address, tuple) or len(address) not in (2, 4):
        raise TypeError(
            "address must be (host, port), (host, port, flowinfo, scope_id) "
            f"or a Unix socket path, not {address!r}"
        )
    host, port = address[0], address[1]
    if host is not None and not isinstance(host, str):
        raise TypeError(f"address host must be a str, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"address port must be an int, not {port!r}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"address port must be in 0..65535, not {port!r}")
    # A None/"" host is the IPv4 wildcard, spelled out: getaddrinfo's
    # AI_PASSIVE answer lists "::" first on some systems. A 4-tuple is IPv6
    # by definition, so a name is resolved to its IPv6 address. Numeric
    # hosts are resolved by trio without a thread.
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_UNSPEC
    try:
        infos = await trio.socket.getaddrinfo(
            host or "0.0.0.0",
            port,
            family=family,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        if family != socket.AF_INET6:
            raise
        raise ValueError(
            "a 4-tuple address is IPv6 (host, port, flowinfo, scope_id), "
            f"but {host!r} has no IPv6 address ({exc.strerror})"
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    if len(address) == 4:
        return family, (sockaddr[0], port, address[2], address[3])
    return family, tuple(sockaddr)


def _bind_inet(
    family: int,
    sockaddr: tuple[object, ...],
    flags: Flag,
    backlog: int,
    keepalive: int | None,
) -> ListeningSocket:
    std = socket.socket(family, socket.SOCK_STREAM)
    try:
        _set_bind_options(std, family, sockaddr, flags)
        if keepalive is not None:
            set_keepalive(std, keepalive)
        std.bind(sockaddr)
        apply_listening_flags(std, flags)
        effective = listen(std, backlog)
        return ListeningSocket(
            std,
            trio.socket.from_stdlib_socket(std),
            backlog=effective,
            bound_here=True,
        )
    except BaseException:
        std.close()
        raise


def _set_bind_options(
    std: socket.socket, family: int, sockaddr: tuple[object, ...], flags: Flag
) -> None:
    """The options that decide whether ``bind()`` succeeds."""
    if flags & Flag.REUSEABLE:
        std.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if flags & Flag.REUSEABLE_PORT:
        std.setsockopt(socket.SOL_SOCKET, so_reuseport(), 1)
    if family == socket.AF_INET6:
        # Set it either way: the system default (Linux's bindv6only
        # sysctl) differs between machines, and dual-stack is the
        # documented behaviour without the flag.
        v6only = 1 if flags & Flag.BIND_IPV6ONLY else 0
        std.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    elif flags & Flag.BIND_IPV6ONLY:
        raise ValueError(f"Flag.BIND_IPV6ONLY needs an IPv6 address, not {sockaddr!r}")


# ----------------------------------------------------------------------
# Errors that name the address, and what holds it


def _naming(exc: OSError, where: str, hint: str = "") -> OSError:
    """``exc`` again (same class, same errno), its message naming ``where``.

    The class and errno are kept so that ``except OSError as e: if e.errno ==
    errno.EADDRINUSE`` and ``except PermissionError`` work as before.
    """
    message = f"cannot listen on {where}: {exc.strerror or exc}{hint}"
    args = (message,) if exc.errno is None else (exc.errno, message)
    try:
        return type(exc)(*args)
    except TypeError:  # pragma: no cover - a subclass with another signature
        return OSError(*args)


def _host_port(host: str, port: object) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _in_use_hint_inet(family: int, sockaddr: tuple[object, ...], flags: Flag) -> str:
    """What holds a TCP address, told by trying the flags that would help.

    Each try binds a scratch socket with one more option and closes it at
    once (never listening): if it binds, that option is the remedy.
    """
    if sockaddr[1] == 0:
        return "; no free port was left for the system to pick"
    if not flags & Flag.REUSEABLE and _binds(family, sockaddr, flags | Flag.REUSEABLE):
        return (
            "; nothing listens there, but connections of a server that stopped "
            "still hold it (TIME_WAIT): Flag.REUSEABLE (SO_REUSEADDR) lets a "
            "restarted server bind it at once"
        )
    if (
        not flags & Flag.REUSEABLE_PORT
        and hasattr(socket, "SO_REUSEPORT")
        and _binds(family, sockaddr, flags | Flag.REUSEABLE_PORT)
    ):
        return (
            "; the socket listening there set SO_REUSEPORT: with "
            "Flag.REUSEABLE_PORT this one would listen beside it, and the "
            "kernel would spread connections over both"
        )
    return (
        "; another socket holds it: a server listening there, or connections "
        "of one that stopped (TIME_WAIT, a minute or so); stop that server or "
        "wait, or choose another port (port 0 lets the system pick a free one)"
    )


def _binds(family: int, sockaddr: tuple[object, ...], flags: Flag) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            _set_bind_options(probe, family, sockaddr, flags)
            probe.bind(sockaddr)
    except (OSError, ValueError):
        return False
    return True


def _in_use_hint_unix(path: str) -> str:
    """What is at a Unix socket path that ``bind()`` found taken.

    For a socket file, one connection is tried (and closed at once, before
    any data): refused means no process listens on it, so the file is stale.
    Nothing is removed: the caller decides.
    """
    if path.startswith("\0"):
        return (
            "; another socket is bound to that abstract name (the name is "
            "freed when that socket closes)"
        )
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""  # gone since: a retry may succeed
    if stat.S_ISDIR(mode):
        return (
            "; it is a directory: give a path for the socket file inside it, "
            f"like {os.path.join(path, 'server.sock')!r}"
        )
    if not stat.S_ISSOCK(mode):
        kind = (
            "a regular file"
            if stat.S_ISREG(mode)
            else "a symbolic link"
            if stat.S_ISLNK(mode)
            else "a file"
        )
        return (
            f"; it is {kind}, not a socket: choose another path, or remove it "
            "if nothing needs it"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return (
                "; no process listens on that socket file: it may be left from "
                "a process that died (or from a listener opened without "
                "Flag.CLOSE_ON_FREE); if no server uses it, remove it "
                f"(os.unlink({path!r}), or rm) and try again"
            )
        except BlockingIOError:
            pass  # its queue is full: a process is listening, and busy
        except OSError as exc:
            return (
                f"; it is a socket file that could not be tried ({exc.strerror}): "
                "if no server uses it, remove it and try again"
            )
    return "; a process is listening on it: stop that server, or choose another path"


def _bind_unix(
    path: str, flags: Flag, backlog: int, unix_mode: int | None
) -> ListeningSocket:
    check_unix_flags(flags)
    # An abstract-namespace name (leading NUL) has no file to unlink or chmod.
    abstract = path.startswith("\0")
    if unix_mode is not None and abstract:
        raise ValueError(
            f"unix_mode= sets a socket file's mode, and the abstract name "
            f"{path!r} has no file; who may connect is up to the network "
            "namespace (or check the peer's credentials in the handler)"
        )
    std = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        std.bind(path)
        unlink = None if abstract else path
        try:
            if unix_mode is not None:
                # Between bind() and listen(): until listen() every connect()
                # is refused, so no client gets in under the umask's mode.
                os.chmod(path, unix_mode)
            apply_listening_flags(std, flags)
            effective = listen(std, backlog)
            trio_sock = trio.socket.from_stdlib_socket(std)
        except BaseException:
            if unlink is not None:
                _unlink_if_ours(unlink, std)
            raise
        return ListeningSocket(
            std, trio_sock, unlink_path=unlink, backlog=effective, bound_here=True
        )
    except BaseException:
        std.close()
        raise


def _wrap(
    sock: SockArg, flags: Flag, backlog: int, keepalive: int | None
) -> ListeningSocket:
    from_fd = False
    if isinstance(sock, bool):
        raise TypeError(f"sock must be a socket or an int fd, not {sock!r}")
    if isinstance(sock, int):
        std = _socket_from_fd(sock)
        from_fd = True
    elif isinstance(sock, socket.socket):
        std = sock
    elif isinstance(sock, trio.socket.SocketType):
        # trio keeps the stdlib socket it wraps in ``_sock``; the accept loop
        # calls its synchronous accept() directly, which is the fast path.
        inner = getattr(sock, "_sock", None)
        if not isinstance(inner, socket.socket):
            raise TypeError(f"cannot find the stdlib socket inside {sock!r}")
        std = inner
    else:
        raise TypeError(
            "sock must be a socket.socket, a trio.socket.SocketType or an int "
            f"fd, not {sock!r}"
        )
    try:
        _check_wrappable(std, flags, backlog)
        if flags & Flag.REUSEABLE:
            std.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if flags & Flag.REUSEABLE_PORT:
            # After bind it no longer affects this socket's own bind, but it
            # lets later sockets bind the same port beside it.
            std.setsockopt(socket.SOL_SOCKET, so_reuseport(), 1)
        if keepalive is not None:
            if std.family == socket.AF_UNIX:
                raise ValueError(
                    f"keepalive={keepalive!r} is TCP keep-alive, which the Unix "
                    f"socket {std!r} does not have; leave it out"
                )
            set_keepalive(std, keepalive)
        apply_listening_flags(std, flags)
        effective = listen(std, backlog) if backlog != 0 else None
        std.setblocking(False)
        twin = False
        if isinstance(sock, trio.socket.SocketType):
            trio_sock = sock
        elif type(std) is socket.socket:
            trio_sock = trio.socket.from_stdlib_socket(std)
        else:
            # A subclass (like testing.ScriptedSocket): trio only wraps exact
            # socket.socket objects, so give it a twin on the same fd.
            twin = True
            trio_sock = trio.socket.from_stdlib_socket(
                socket.socket(std.family, std.type, std.proto, fileno=std.fileno())
            )
        return ListeningSocket(
            std, trio_sock, from_fd=from_fd, twin=twin, backlog=effective
        )
    except BaseException:
        if from_fd:
            std.detach()
        raise


def _socket_from_fd(fd: int) -> socket.socket:
    if fd < 0:
        raise ValueError(f"sock must be a non-negative fd, not {fd!r}")
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSOCK, errno.EBADF):
            raise ValueError(
                f"sock={fd!r} is not an open socket fd ({exc.strerror})"
            ) from exc
        raise


def _check_wrappable(std: socket.socket, flags: Flag, backlog: int) -> None:
    if std.fileno() == -1:
        raise ValueError(f"sock={std!r} is closed")
    if std.type != socket.SOCK_STREAM:
        raise ValueError(
            f"sock must be a stream (SOCK_STREAM) socket, not {std.type!r}: "
            "only stream sockets accept connections"
        )
    if std.family == socket.AF_UNIX:
        check_unix_flags(flags)
    # IPV6_V6ONLY can only be changed before bind; all we can do for a
    # wrapped socket is check it was set.
    if flags & Flag.BIND_IPV6ONLY and (
        std.family != socket.AF_INET6
        or not std.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    ):
        raise ValueError(
            "Flag.BIND_IPV6ONLY with sock= needs an IPv6 socket that "
            "already has IPV6_V6ONLY set (it cannot change after bind)"
        )
    if std.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return
    if backlog == 0:
        raise ValueError(
            "backlog=0 means the socket is already listening, but "
            f"{std!r} is not; give backlog=-1 to have listen() called"
        )
    # listen() would fail with a bare EINVAL on a connected socket, and on an
    # unbound one it would silently bind a random port on every interface.
    try:
        peer = std.getpeername()
    except OSError:
        pass
    else:
        raise ValueError(
            f"sock={std!r} is connected to {peer!r}; give a bound, unconnected "
            "socket (or a listening one)"
        )
    name = std.getsockname()
    unbound = (
        name in ("", b"")
        if std.family == socket.AF_UNIX
        else isinstance(name, tuple) and name[1] == 0
    )
    if unbound:
        raise ValueError(
            f"sock={std!r} is not bound; bind it first (or pass address= and "
            "let open_listener bind)"
        )


# ----------------------------------------------------------------------
# What each flag and option sets, and what cannot apply

#: Linux's bounds on ``TCP_KEEPIDLE`` (``MAX_TCP_KEEPIDLE``).
KEEPALIVE_MAX: Final = 32767
#: libevent 2.2's ``evutil_set_tcp_keepalive``: after ``idle`` seconds, a
#: probe every ``idle / 3`` seconds, and the connection is dropped after this
#: many unanswered, so a dead peer is found within twice the idle time.
KEEPALIVE_PROBES: Final = 3

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


# ----------------------------------------------------------------------
# The backlog, and how full the accept queue is

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
