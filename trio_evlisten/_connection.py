"""One connection's life, in its handler task: preamble, stream, callback, close.

Owns, in order: the preamble (:meth:`ConnectionRunner.open`: the PROXY header,
then the TLS handshake), the object handed to the callback (a stream, or a
blocking socket), the call and its supervision (:meth:`ConnectionRunner.run`:
what an exception escaping the handler means, the grouped log of handler
errors), and closing what the listener still owns afterwards; plus the
counters of how connections ended.

May not touch: how many handlers run, where, or when a handler may start
(that is :mod:`._handlers`, which calls these methods and takes a handler
slot between the preamble and the call), the accept loop, or the gate.
"""

from __future__ import annotations

import logging
import socket
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import GroupedLog
from ._flags import Flag
from ._proxy_reader import REJECTED
from ._stream import SocketStream, adopt, close_socket, prepare_listening_socket
from ._tls_transport import handshake

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from socket import socket as StdSocket

    from ._options import ListenerOptions
    from ._proxy_reader import ProxyReader
    from ._recorder import ConnectionRecorder
    from ._state import AcceptCallback, ListenerState
    from ._tls_transport import TLSSession

logger: Final = logging.getLogger("trio_evlisten")

_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)

#: How long the listener waits to send TLS's close_notify after a handler
#: returns before it closes the connection anyway.
TLS_CLOSE_TIMEOUT: Final = 1.0


@attrs.define(eq=False)
class ConnectionRunner:
    """Runs each connection of one listener: what they share (options,
    counters, the grouped log of handler errors), and the steps of one."""

    #: The listener, as the callback's first argument.
    _owner: object
    _state: ListenerState
    _flags: Flag
    _options: ListenerOptions
    _proxy: ProxyReader | None
    #: The listener's address, for the log.
    _where: object
    _log: GroupedLog = attrs.field(init=False)
    #: Handlers that raised (not counting a peer going away, or a drain).
    handler_errors: int = attrs.field(default=0, init=False)
    #: Handlers that returned (or lost their peer) by themselves.
    finished: int = attrs.field(default=0, init=False)
    tls_failures: int = attrs.field(default=0, init=False)
    # Accepted sockets inherit the stream's TCP options (see prepare()).
    _adopt: bool = attrs.field(default=False, init=False)
    #: Where durations are recorded, once metrics are wanted (else None).
    recorder: ConnectionRecorder | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._log = GroupedLog(
            logger, f"handlers of {self._where!r} raised", "handler_errors"
        )

    def ended(self) -> tuple[int, int]:
        """``(finished, handler_errors)``: how connections ended so far."""
        return self.finished, self.handler_errors

    def flush_log(self, final: str) -> None:
        """Log what the grouped log of handler errors still holds, with ``final``."""
        self._log.flush(trio.current_time(), final=final)

    def prepare(self, listening: StdSocket) -> None:
        """Set what each stream needs on the listening socket, once, if it can."""
        if self._options["stream"] is SocketStream:
            self._adopt = prepare_listening_socket(listening)

    # ------------------------------------------------------------------
    # Before the handler

    def plain(self, conn: StdSocket) -> object:
        """What the handler gets when there is no preamble."""
        if self._flags & Flag.LEAVE_SOCKETS_BLOCKING:
            conn.setblocking(True)
            return conn
        return self._stream(conn)

    def _stream(self, conn: StdSocket) -> SocketStream | trio.SocketStream:
        if self._options["stream"] is SocketStream:
            # No trio socket object unless the handler asks for .socket; the
            # TCP options came with the socket from the listening one.
            return adopt(conn) if self._adopt else SocketStream(conn)
        return trio.SocketStream(trio.socket.from_stdlib_socket(conn))

    async def open(self, conn: StdSocket, addr: Any) -> tuple[object, Any] | None:
        """Run the preamble: what the handler gets, and the address it sees.

        ``None`` if the connection was dropped (a refused PROXY header, a
        failed TLS handshake): it is closed then, and counted.

        Resource handling:
            ``conn`` is closed here if anything fails or is cancelled.
        """
        try:
            if self._proxy is not None:
                # Before the TLS handshake: the header comes in clear. Read
                # in this task, never the accept loop's, on a non-blocking
                # socket (accept() returns blocking ones).
                conn.setblocking(False)
                addr = await self._proxy.read(conn, addr)
                if addr is REJECTED:
                    close(conn)
                    return None
            context = self._options["ssl_context"]
            protocols = self._options["protocol"] is not None
            if context is None:
                # Protocol mode: the engine makes the transport itself.
                return (None if protocols else self.plain(conn)), addr
            if protocols:
                session = await self._handshake_bio(conn, context, addr)
                if session is None:
                    close(conn)
                    return None
                # No quickack(): the handshake sent TLS 1.3's session
                # tickets right after the client's Finished, which carries
                # its ACK (benchmarks/tls_latency.py, ours-protocol).
                return session, addr
            tls = trio.SSLStream(self._stream(conn), context, server_side=True)
            if await self._handshake(tls, addr):
                quickack(conn)
                return tls, addr
            close(conn)
            return None
        except BaseException:
            close(conn)
            raise

    async def _handshake(self, tls: trio.SSLStream[Any], addr: Any) -> bool:
        """Run the server side of the handshake; False if it failed or timed out."""
        began = trio.current_time()
        with trio.move_on_after(self._options["tls_handshake_timeout"]):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError:
                # A client that does not speak TLS, or rejects our
                # certificate: its problem, not the server's; DEBUG keeps busy
                # logs clean.
                logger.debug("TLS handshake with %r failed", addr, exc_info=True)
            else:
                if self.recorder is not None:
                    self.recorder.tls_handshake.observe(trio.current_time() - began)
                return True
            finally:
                # However it ended (done, failed, timed out, cancelled).
                unlink_handshake(tls)
        with self._state.lock:
            self.tls_failures += 1
        return False

    async def _handshake_bio(
        self, conn: StdSocket, context: ssl.SSLContext, addr: Any
    ) -> TLSSession | None:
        """Protocol mode's handshake (memory BIOs, for the engine to go on
        with): counted, timed out and logged as :meth:`_handshake`'s."""
        began = trio.current_time()
        conn.setblocking(False)
        with trio.move_on_after(self._options["tls_handshake_timeout"]):
            try:
                session = await handshake(conn, context)
            except OSError:
                # ssl.SSLError included: as _handshake's BrokenResourceError.
                logger.debug("TLS handshake with %r failed", addr, exc_info=True)
            else:
                if self.recorder is not None:
                    self.recorder.tls_handshake.observe(trio.current_time() - began)
                return session
        with self._state.lock:
            self.tls_failures += 1
        return None

    # ------------------------------------------------------------------
    # The handler

    async def run(
        self,
        conn: StdSocket,
        handed: object,
        addr: Any,
        cb: AcceptCallback,
        args: tuple[Any, ...],
        done: Callable[[], None] | None = None,
        *,
        since: float | None = None,
    ) -> None:
        """Call the handler with ``handed``; supervise it; close what we own.

        ``handed=None`` hands it :meth:`plain`'s stream (no preamble). With
        ``done``, this is the connection's task itself, and ``done()`` is
        called last (the host's count): one coroutine frame less for each
        waiting connection than a wrapper around this call would cost.
        ``since``: when the connection's task began (its preamble's start),
        for the recorded duration; else now.

        Error handling:
            A handler's :exc:`Exception` is counted and logged (grouped: the
            first of a burst in full, then a summary line per interval;
            ``trio.BrokenResourceError`` at DEBUG), or raised with
            ``handler_errors="raise"``.

        Resource handling:
            ``conn`` is closed on return, unless it was handed to the handler
            as a blocking socket (``LEAVE_SOCKETS_BLOCKING``), which the
            handler then owns.
        """
        recorder = self.recorder
        if recorder is not None and since is None:
            since = trio.current_time()
        try:
            if handed is None:
                handed = self.plain(conn)
            await cb(self._owner, handed, addr, *args)
            if isinstance(handed, trio.SSLStream):
                # Say goodbye properly (close_notify), so the client can tell
                # our close from a truncation attack; but never wait long for
                # a peer that does not read.
                with trio.move_on_after(TLS_CLOSE_TIMEOUT):
                    await handed.aclose()
        except trio.BrokenResourceError:
            if (
                self._options["handler_errors"] == "raise"
                and not self._state.cancelling
            ):
                raise
            logger.debug("handler for %r: the peer went away", addr, exc_info=True)
            self.finished += 1
        except Exception as exc:
            if self._state.cancelling:
                # Cancelled by drain(), it failed while unwinding: the drain's
                # doing, not a bug of the handler's.
                logger.debug("handler for %r raised once drained", addr, exc_info=True)
            else:
                self.handler_errors += 1
                if self._options["handler_errors"] == "raise":
                    raise
                self._log_error(exc, addr)
        else:
            self.finished += 1
        finally:
            # The listener owns the stream and closes it (telling any task
            # still waiting on it). A blocking socket is the handler's once
            # handed over. The count is given back however the close goes.
            try:
                if handed is not conn:
                    close(conn)
            finally:
                if recorder is not None:
                    assert since is not None
                    recorder.connection.observe(trio.current_time() - since)
                if done is not None:
                    done()

    def count_error(self, exc: Exception, addr: Any) -> None:
        """Count and log a handler error met outside :meth:`run` (protocol mode)."""
        self.handler_errors += 1
        self._log_error(exc, addr)

    def _log_error(self, exc: Exception, addr: Any) -> None:
        last = f"{exc!r} from {addr!r}"
        if self._log.record(type(exc).__qualname__, last, trio.current_time()):
            logger.error(
                "handler for %r raised",
                addr,
                exc_info=exc,
                extra={"handler_errors": 1},
            )


def close(conn: StdSocket) -> None:
    """Close an accepted socket, waking any task waiting on it. Idempotent.

    Error handling:
        Never raises: a handler that closed the file descriptor behind the
        socket object's back (``os.close(conn.socket.fileno())``) makes
        ``close()`` fail with ``EBADF``; that connection is gone either way,
        and its cleanup must not end the listener. Logged at DEBUG.
    """
    try:
        close_socket(conn)
    except OSError:
        logger.debug("closing %r failed", conn, exc_info=True)


def quickack(conn: StdSocket) -> None:
    """Acknowledge what the client sent at once, and its next segment too.

    Called once a TLS handshake is done. Our sending the handshake's flight
    right after the client's hello put the connection in Linux's delayed-ACK
    ("pingpong") mode, and the client's Finished, the handshake's last
    message, expects no answer (``trio.SSLStream`` holds TLS 1.3's session
    tickets back until the first write): so its ACK waits for the delayed-ACK
    timer, and a client that leaves Nagle's algorithm on holds its first
    request until that ACK comes. ``TCP_QUICKACK`` sends a scheduled ACK at
    once and leaves pingpong mode (tcp(7)); the mode is not permanent, and
    need not be: the first response, sent right after the request, puts the
    connection back in pingpong mode, and from then on each answer carries
    the ACK. Setting it before the handshake would change nothing: the
    server's flight re-enters pingpong mode. See docs/choices.md.

    Error handling:
        Does nothing where ``TCP_QUICKACK`` does not exist (it is Linux's),
        or when the socket refuses it (a Unix socket, a connection already
        reset): a late ACK is a delay, never an error.
    """
    if _TCP_QUICKACK is not None:
        with suppress(OSError):
            conn.setsockopt(_IPPROTO_TCP, _TCP_QUICKACK, 1)


def unlink_handshake(tls: trio.SSLStream[Any]) -> None:
    """Break the reference cycle a ``trio.SSLStream`` is born in.

    ``trio.SSLStream.__init__`` (trio/_ssl.py) keeps ``self._handshook =
    _Once(self._do_handshake)``: the stream refers to itself through that bound
    method, so the stream and all it holds (the ``SSLObject`` and OpenSSL's
    buffers, the transport stream, the socket object) outlive the connection
    until the cyclic GC finds them, and a connection that lived a while under
    load is in the oldest generation, which a big heap collects rarely.
    ``_Once`` calls the method only the first time it is awaited, so once the
    handshake has begun the reference is dead weight: dropping it lets
    reference counting free the stream as soon as its last user lets go.
    Does nothing before the handshake began, or if trio's internals are not
    what this expects.
    """
    once: Any = getattr(tls, "_handshook", None)
    method = getattr(once, "_afn", None)
    if getattr(once, "started", False) and getattr(method, "__self__", None) is tls:
        # Never called again (started); deleting rather than replacing it
        # means a trio that did call it again would fail loudly, not skip a
        # handshake.
        del once._afn
