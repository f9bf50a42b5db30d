"""One connection's life, in its handler task: preamble, stream, callback, close.

Owns, in order: the preamble (the PROXY header, then the TLS handshake), the
object handed to the callback (a stream, or a blocking socket), the call,
supervision (what an exception escaping the handler means), and closing what
the listener still owns afterwards.

May not touch: how many handlers run or where (that is :mod:`._handlers`,
which calls :func:`serve_connection` and counts it), the accept loop, or the
listener's gate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from ._flags import Flag
from ._proxy_gate import REJECTED

if TYPE_CHECKING:
    from socket import socket as StdSocket

    from ._listener import AcceptCallback, ConnListener

logger: Final = logging.getLogger("trio_evlisten")

#: How long the listener waits to send TLS's close_notify after a handler
#: returns before it closes the connection anyway.
TLS_CLOSE_TIMEOUT: Final = 1.0


async def serve_connection(
    listener: ConnListener,
    conn: StdSocket | None,
    addr: Any,
    cb: AcceptCallback,
    args: tuple[Any, ...],
) -> None:
    """Run one accepted connection from its preamble to its close.

    Error handling:
        A handler's :exc:`Exception` is logged (``trio.BrokenResourceError``
        at DEBUG) and counted, or raised with ``handler_errors="raise"``.

    Resource handling:
        The connection is closed on return, unless it was handed to the
        handler as a blocking socket (``LEAVE_SOCKETS_BLOCKING``), which the
        handler then owns.
    """
    options = listener._options
    proxy = listener._proxy
    trio_sock: trio.socket.SocketType | None = None
    try:
        if listener._flags & Flag.LEAVE_SOCKETS_BLOCKING:
            assert conn is not None
            if proxy is not None:
                # Read while the socket is still non-blocking, in this
                # task (never the accept loop's), before anything else.
                addr = await proxy.read(trio.socket.from_stdlib_socket(conn), addr)
                if addr is REJECTED:
                    return
            conn.setblocking(True)
            # From here on the handler owns the socket.
            conn_for_handler, conn = conn, None
            await cb(listener, conn_for_handler, addr, *args)
        else:
            assert conn is not None
            trio_sock = trio.socket.from_stdlib_socket(conn)
            if proxy is not None:
                # Before the TLS handshake: the header comes in clear.
                addr = await proxy.read(trio_sock, addr)
                if addr is REJECTED:
                    return
            stream = trio.SocketStream(trio_sock)
            if options["ssl_context"] is None:
                await cb(listener, stream, addr, *args)
            else:
                tls = await _tls_handshake(listener, stream, addr)
                if tls is not None:
                    await cb(listener, tls, addr, *args)
                    # Say goodbye properly (close_notify), so the client
                    # can tell our close from a truncation attack; but
                    # never wait long for a peer that does not read.
                    with trio.move_on_after(TLS_CLOSE_TIMEOUT):
                        await tls.aclose()
    except trio.BrokenResourceError:
        if options["handler_errors"] == "raise" and not listener._handlers.cancelling:
            raise
        logger.debug("handler for %r: the peer went away", addr, exc_info=True)
    except Exception:
        if listener._handlers.cancelling:
            # Cancelled by drain(), it failed while unwinding: the drain's
            # doing, not a bug of the handler's.
            logger.debug("handler for %r raised once drained", addr, exc_info=True)
        else:
            listener._handler_error_count += 1
            if options["handler_errors"] == "raise":
                raise
            logger.exception("handler for %r raised", addr)
    finally:
        # The listener owns the trio stream and closes it, through trio so
        # that any task still waiting on it is told (closing twice is
        # harmless). A blocking socket is the handler's once handed over,
        # and closed here only if it never got that far.
        if trio_sock is not None:
            trio_sock.close()
        elif conn is not None:
            conn.close()


async def _tls_handshake(
    listener: ConnListener, stream: trio.SocketStream, addr: Any
) -> trio.SSLStream[trio.SocketStream] | None:
    """Run the server side of the handshake; None if it failed or timed out."""
    options = listener._options
    assert options["ssl_context"] is not None
    tls = trio.SSLStream(stream, options["ssl_context"], server_side=True)
    with trio.move_on_after(options["tls_handshake_timeout"]):
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            # A client that does not speak TLS, or rejects our certificate:
            # its problem, not the server's; DEBUG keeps busy logs clean.
            logger.debug("TLS handshake with %r failed", addr, exc_info=True)
        else:
            return tls
    with listener._gate.lock:
        listener._tls_failures += 1
    return None
