"""systemd socket activation: the sockets a service manager handed us.

The protocol is ``sd_listen_fds(3)``: the manager opens and binds (and
usually listens on) the sockets of a ``.socket`` unit, starts the service
with them as fds 3, 4, ... and tells it so in three environment variables:
``LISTEN_PID`` (the pid they are meant for), ``LISTEN_FDS`` (how many) and
``LISTEN_FDNAMES`` (their ``FileDescriptorName=``, colon-separated). The same
convention is used by ``systemd-socket-activate``, and by other managers
(s6, launchers in containers) that copy it.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The first fd passed (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START: Final = 3
#: The name of an fd that ``LISTEN_FDNAMES`` does not name.
UNKNOWN_NAME: Final = "unknown"
_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def activation_sockets(
    *, unset_environment: bool = True
) -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd socket activation, grouped by name.

    Reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` as
    ``sd_listen_fds(3)`` does. Serve one with
    ``open_listener(cb, sock=sockets["web"][0], backlog=0)`` (``backlog=0``
    because the manager already called ``listen()``).

    Args:
        unset_environment: remove the three variables (even on error), so
            that child processes do not think the sockets are theirs; systemd
            advises it, and a second call then returns ``{}``.

    Returns:
        A dict from ``FileDescriptorName=`` (``"unknown"`` when unnamed) to
        the sockets of that name, in fd order; the dict itself is in the
        order the names first appear. Several fds may share a name (a
        ``.socket`` unit with both ``ListenStream=80`` and
        ``ListenStream=[::]:80``). ``{}`` when the process was not socket
        activated, or the variables are meant for another process (their
        ``LISTEN_PID`` is not ours).

    Raises:
        ValueError: a malformed variable (the message names it and its
            value): ``LISTEN_PID``/``LISTEN_FDS`` not a decimal number,
            ``LISTEN_FDNAMES`` with the wrong number of names, or a passed
            fd that is not an open socket.

    Error handling:
        Nothing is guessed: any inconsistency raises, since serving the wrong
        socket would be worse than not starting.

    Resource handling:
        The fds become the returned :class:`socket.socket` objects, which own
        them (closing one closes its fd). They are made close-on-exec. On an
        error no socket object is left owning an fd; the fds stay open, as
        the manager passed them.
    """
    try:
        return _listen_sockets(os.environ)
    finally:
        if unset_environment:
            for name in _VARIABLES:
                os.environ.pop(name, None)


def _listen_sockets(env: Mapping[str, str]) -> dict[str, list[socket.socket]]:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return {}
    pid = _number("LISTEN_PID", pid_text)
    if pid != os.getpid():
        # Meant for another process (we inherited them): not ours to touch.
        return {}
    count_text = env.get("LISTEN_FDS")
    if count_text is None:
        return {}
    count = _number("LISTEN_FDS", count_text)
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is None:
        names = [UNKNOWN_NAME] * count
    else:
        names = names_text.split(":") if count else []
        if len(names) != count:
            raise ValueError(
                f"LISTEN_FDNAMES={names_text!r} names {len(names)} fds, but "
                f"LISTEN_FDS={count_text!r} passes {count}"
            )
    result: dict[str, list[socket.socket]] = {}
    made: list[socket.socket] = []
    try:
        for fd, name in enumerate(names, SD_LISTEN_FDS_START):
            sock = _socket_from(fd, name)
            made.append(sock)
            result.setdefault(name or UNKNOWN_NAME, []).append(sock)
    except BaseException:
        for sock in made:
            sock.detach()
        raise
    return result


def _number(variable: str, text: str) -> int:
    # int() would take " 3", "+3", "3_0" and non-ASCII digits; the C library
    # parser systemd uses takes none of them.
    if not text.isascii() or not text.isdigit():
        raise ValueError(
            f"{variable} must be a decimal number, not {variable}={text!r}"
        )
    return int(text)


def _socket_from(fd: int, name: str) -> socket.socket:
    try:
        os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds does
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(
            f"fd {fd} (LISTEN_FDNAMES name {name!r}) passed by socket "
            f"activation is not an open socket: {exc.strerror}"
        ) from exc
