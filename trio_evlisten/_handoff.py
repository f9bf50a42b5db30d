"""Zero-downtime restart: hand the listening sockets to a successor process.

The successor is started with the sockets as fds 3, 4, ... and the
``sd_listen_fds(3)`` variables, exactly as systemd would start it, so it
picks them up with :func:`activation_sockets`. It says it is ready with
:func:`notify_ready` (``READY=1`` on ``$NOTIFY_SOCKET``, systemd's
``sd_notify(3)`` protocol); until then the old process keeps accepting.

Why no connection is lost: a listening socket is one kernel object (an
open file description) with one queue of connections. Passing an fd to a
child shares that object; it does not copy it. While both processes hold
an fd, both accept from the one queue. When the old process then closes its
fd (``listener.close()``, even with ``CLOSE_ON_FREE``), the socket stays
open because the successor still holds it: the queue and the connections in
it survive, and the successor accepts them. The socket is never unbound, so
no connection attempt is ever refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import IO, TYPE_CHECKING, Any, Final

import trio

from ._listener import ConnListener

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    #: What :func:`hand_off` takes for one name: a listener, a listening
    #: socket, or several of them (``activation_sockets()`` gives lists).
    Passable = ConnListener | socket.socket | trio.socket.SocketType

#: How long :func:`hand_off` waits for ``READY=1`` by default, in seconds.
READY_TIMEOUT: Final = 10.0
_FDNAME_MAX: Final = 255  # systemd's FDNAME_MAX

# Runs in the child between fork and the successor's exec (the same process,
# so the same pid): moves the passed fds to 3, 4, ... and sets LISTEN_PID to
# its own pid, which only the child knows. Python, not sh: sh takes only
# one-digit fds in redirections, and we are Python anyway. -I -S keep its
# start-up short and independent of the environment.
_TRAMPOLINE: Final = """\
import fcntl, os, sys
src = [int(fd) for fd in sys.argv[1].split(",")]
n = len(src)
# Copy each fd above the target range first: a source may sit on a target.
tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + n) for fd in src]
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i)
for fd in tmp:
    os.close(fd)
for fd in set(src):
    if not 3 <= fd < 3 + n:
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
try:
    os.execv(sys.argv[2], sys.argv[3:])
except OSError as exc:
    sys.stderr.write(f"trio_evlisten hand_off: cannot run {sys.argv[2]!r}: {exc}\\n")
    os._exit(127)
"""


async def hand_off(
    sockets: Mapping[
        str,
        ConnListener
        | socket.socket
        | trio.socket.SocketType
        | Sequence[ConnListener | socket.socket | trio.socket.SocketType],
    ],
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    wait_ready: bool = True,
    ready_timeout: float = READY_TIMEOUT,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> trio.Process:
    """Start ``command`` with ``sockets`` passed as systemd socket activation.

    The successor gets the sockets as fds 3, 4, ... in the mapping's order
    (a list's sockets in its order), with ``LISTEN_FDS``, ``LISTEN_FDNAMES``
    (the names, ``:``-joined) and ``LISTEN_PID`` (its own pid, set in the
    child just before it execs ``command``): :func:`activation_sockets` in
    the successor returns ``{name: [socket, ...]}`` as given here. With
    ``wait_ready`` it also gets ``NOTIFY_SOCKET``, and this waits until it
    calls :func:`notify_ready`.

    Keep accepting while this runs; once it returns, stop (leave the
    ``open_listener`` block, or ``listener.close()``) and let the handlers
    finish. Queued connections are not lost: see the module docs.

    Args:
        sockets: name to a :class:`ConnListener`, a listening
            :class:`socket.socket` or :mod:`trio.socket` socket, or a
            sequence of them (the shape :func:`activation_sockets` returns,
            so sockets received this way can be passed on again). Names are
            systemd ``FileDescriptorName=`` values: 1 to 255 printable ASCII
            characters other than ``:``.
        command: the successor's argv, e.g. ``[sys.executable, *sys.argv]``;
            ``command[0]`` is looked up on ``PATH`` (``env``'s, if given).
        env: the successor's environment (default: this process's); any
            ``LISTEN_*``/``NOTIFY_SOCKET`` in it are replaced.
        cwd: the successor's working directory (default: this one's).
        wait_ready: wait for ``READY=1`` from the successor. Without it this
            returns as soon as the successor is started (it has the sockets
            from then on), and nothing tells you when it accepts.
        ready_timeout: seconds to wait for ``READY=1``.
        stdin: the successor's stdin, as for :mod:`subprocess`
            (``subprocess.PIPE``, a file, an fd); default: this one's.
        stdout: likewise; a restarting server usually leaves it inherited,
            so that both processes log to the same place.
        stderr: likewise.

    Returns:
        The successor, a child of this process. It need not be waited for:
        when this process exits, it is re-parented (to init) and runs on.

    Raises:
        ValueError: ``sockets`` is empty, a name is not a valid
            ``FileDescriptorName=``, or a socket is closed or not a
            listening stream socket (each message names it); ``command`` is
            empty.
        TypeError: a value is not a listener or a socket.
        FileNotFoundError: ``command[0]`` is not found or not executable.
        RuntimeError: the successor exited before it was ready (the message
            gives its exit status).
        trio.TooSlowError: no ``READY=1`` within ``ready_timeout``.

    Error handling:
        On any failure (including cancellation) the successor, if started,
        is killed and reaped before this raises: its copies of the sockets
        close with it, and this process, which never stopped accepting,
        serves on as before.

    Resource handling:
        The sockets stay this process's too: close them (or the listeners)
        when this returns. Only the successor inherits them, and only they
        (``pass_fds``; every other fd stays close-on-exec). Once the
        successor is ready, a :class:`ConnListener` given here no longer
        unlinks its Unix socket path when closed, since the successor serves
        that path now, and its drain leaves the queued connections to the
        successor instead of taking them. The notify socket (in a private
        temporary directory) is removed before this returns.
    """
    fds, names = _collect(sockets)
    argv = [str(arg) for arg in command]
    if not argv:
        raise ValueError("command must name a program to run, not be empty")
    child_env = dict(os.environ if env is None else env)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        child_env.pop(var, None)
    child_env["LISTEN_FDS"] = str(len(fds))
    child_env["LISTEN_FDNAMES"] = ":".join(names)
    exe = _resolve(argv[0], child_env.get("PATH"), cwd)
    trampoline = [
        _python(),
        "-I",
        "-S",
        "-c",
        _TRAMPOLINE,
        ",".join(map(str, fds)),
        exe,
        *argv,
    ]
    stdio: dict[str, Any] = {"stdin": stdin, "stdout": stdout, "stderr": stderr}
    if wait_ready:
        proc = await _start_and_wait(
            trampoline, child_env, cwd, fds, stdio, argv, ready_timeout
        )
    else:
        proc = await trio.lowlevel.open_process(
            trampoline, env=child_env, cwd=cwd, pass_fds=fds, **stdio
        )
    for value in sockets.values():
        for item in _as_list(value):
            if isinstance(item, ConnListener):
                # Closing it must not unlink a path the successor serves, and
                # draining it must leave the queue to the successor.
                item.mark_handed_off()
    return proc


async def _start_and_wait(
    trampoline: list[str],
    child_env: dict[str, str],
    cwd: str | os.PathLike[str] | None,
    fds: list[int],
    stdio: dict[str, Any],
    argv: list[str],
    ready_timeout: float,
) -> trio.Process:
    """Start the successor with a ``NOTIFY_SOCKET`` and wait for ``READY=1``."""
    with tempfile.TemporaryDirectory(prefix="trio_evlisten-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.setblocking(False)
            notify.bind(path)
            child_env["NOTIFY_SOCKET"] = path
            proc = await trio.lowlevel.open_process(
                trampoline, env=child_env, cwd=cwd, pass_fds=fds, **stdio
            )
            try:
                await _wait_ready(proc, notify, argv, ready_timeout)
            except BaseException:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
                raise
    return proc


def notify_ready(*, unset_environment: bool = True) -> bool:
    """Tell whoever started this process that it is ready (``READY=1``).

    Sends ``READY=1`` to ``$NOTIFY_SOCKET`` as ``sd_notify(3)`` does: to the
    old process waiting in :func:`hand_off`, or to systemd for a
    ``Type=notify`` service. Call it once the listeners accept (after
    ``open_listener`` has been entered).

    Args:
        unset_environment: remove ``NOTIFY_SOCKET`` (also when nothing was
            sent), so that child processes do not notify in our name.

    Returns:
        Whether a message was sent: ``False`` when ``NOTIFY_SOCKET`` is not
        set (the process was started some other way), which is not an error.

    Raises:
        ValueError: ``NOTIFY_SOCKET`` is not a path or an ``@abstract``
            name (systemd's ``vsock:`` addresses are not supported).
        OSError: sending failed (the socket is gone: the old process gave
            up waiting).

    Resource handling:
        A datagram socket is opened for the send and closed at once.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if unset_environment:
        os.environ.pop("NOTIFY_SOCKET", None)
    if address is None:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        raise ValueError(
            f"NOTIFY_SOCKET must be an absolute path or an @abstract name, "
            f"not NOTIFY_SOCKET={address!r}"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", target)
    return True


# ----------------------------------------------------------------------
# Private


def _as_list(value: Passable | Sequence[Passable]) -> list[Passable]:
    if isinstance(value, (ConnListener, socket.socket, trio.socket.SocketType)):
        return [value]
    return list(value)


def _collect(
    sockets: Mapping[str, Passable | Sequence[Passable]],
) -> tuple[list[int], list[str]]:
    """The fds to pass, in order, and the name of each."""
    fds: list[int] = []
    names: list[str] = []
    for name, value in sockets.items():
        _check_name(name)
        if isinstance(value, (str, bytes)):
            raise TypeError(
                f"sockets[{name!r}] must be a listener or a socket, not {value!r}"
            )
        items = _as_list(value)
        if not items:
            raise ValueError(f"sockets[{name!r}] is an empty list: nothing to pass")
        for item in items:
            fds.append(_listening_fd(name, item))
            names.append(name)
    if not fds:
        raise ValueError("sockets is empty: a successor needs at least one socket")
    return fds, names


def _check_name(name: object) -> None:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= _FDNAME_MAX
        or ":" in name
        or not all(" " <= ch <= "~" for ch in name)
    ):
        raise ValueError(
            f"socket name {name!r} is not a valid FileDescriptorName: use 1 to "
            f"{_FDNAME_MAX} printable ASCII characters other than ':' (the "
            "separator in LISTEN_FDNAMES)"
        )


def _listening_fd(name: str, item: object) -> int:
    if isinstance(item, ConnListener):
        fd = item.fd
    elif isinstance(item, (socket.socket, trio.socket.SocketType)):
        fd = item.fileno()
    else:
        raise TypeError(
            f"sockets[{name!r}] must hold ConnListeners or sockets, not {item!r}"
        )
    if fd < 0:
        raise ValueError(f"sockets[{name!r}]: {item!r} is closed")
    # Ask the kernel, not the object: a socket object built on an fd may
    # describe it wrongly, and the successor will trust the fd.
    with socket.socket(fileno=os.dup(fd)) as probe:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if kind != socket.SOCK_STREAM or not listening:
        raise ValueError(
            f"sockets[{name!r}]: {item!r} must be a listening stream socket "
            "(call listen() on it first)"
        )
    return fd


def _resolve(program: str, path: str | None, cwd: str | os.PathLike[str] | None) -> str:
    if os.sep in program:
        full = program if cwd is None else os.path.join(cwd, program)
        found = full if os.access(full, os.X_OK) and os.path.isfile(full) else None
    else:
        found = shutil.which(program, path=path)
    if found is None:
        raise FileNotFoundError(
            f"command[0]={program!r} is not an executable file"
            + ("" if os.sep in program else f" on PATH={path!r}")
        )
    return os.path.abspath(found)


def _python() -> str:
    if not sys.executable:
        raise RuntimeError("hand_off needs sys.executable to run its trampoline")
    return sys.executable


async def _wait_ready(
    proc: trio.Process,
    notify: socket.socket,
    argv: list[str],
    ready_timeout: float,
) -> None:
    """Return on ``READY=1``; raise if the successor exits or is too slow."""
    ready = False
    with trio.move_on_after(ready_timeout) as scope:
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                await proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            while not ready:
                await trio.lowlevel.wait_readable(notify)
                ready = _ready_in(notify)
            nursery.cancel_scope.cancel()
    # READY=1 then a quick exit is still a ready successor (whose problem
    # the exit is): look for a message that came in before the exit did.
    if ready or _ready_in(notify):
        return
    if scope.cancelled_caught:
        raise trio.TooSlowError(
            f"the successor {argv!r} (pid {proc.pid}) did not send READY=1 "
            f"within ready_timeout={ready_timeout!r} s; was notify_ready() called?"
        )
    raise RuntimeError(
        f"the successor {argv!r} exited with status {proc.returncode} "
        "before it was ready"
    )


def _ready_in(notify: socket.socket) -> bool:
    """Whether the queued datagrams include ``READY=1`` (reads them all)."""
    while True:
        try:
            message = notify.recv(4096)
        except BlockingIOError:
            return False
        if b"READY=1" in message.split(b"\n"):
            return True
