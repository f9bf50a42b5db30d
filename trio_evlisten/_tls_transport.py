"""TLS in protocol mode: the handshake over memory BIOs, and the transport.

Owns: a TLS session kept as asyncio's ``sslproto`` keeps one, an
:class:`ssl.SSLObject` between two :class:`ssl.MemoryBIO` (what came from
the socket, what goes to it), so that the engine's one task can serve it
with plain calls; the server side of the handshake (:func:`handshake`),
awaited in the connection's preamble task like the PROXY header, holding no
handler slot; and :class:`TLSTransport`, the transport over such a session.

May not touch: when a handshake times out or how a failure is counted (the
connection runner's, as in task mode), the engine, or the plain
transport's hot path (:class:`TLSTransport` only overrides what TLS
changes: reading, writing, closing, and what ``get_extra_info`` knows).

Where asyncio's SSL transport and ours differ, and why, is in
docs/choices.md ("TLS in protocol mode").
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._transport import MAX_READ, NOT_NOW, Transport

if TYPE_CHECKING:
    import socket

    from ._engine import Engine


@attrs.define(eq=False)
class TLSSession:
    """One connection's TLS state once its handshake is done."""

    sslobj: ssl.SSLObject
    #: Bytes read from the socket, not yet decrypted (the client's first
    #: records may already be here when the handshake ends).
    incoming: ssl.MemoryBIO
    #: Bytes encrypted, not yet handed to the socket.
    outgoing: ssl.MemoryBIO


async def handshake(sock: socket.socket, context: ssl.SSLContext) -> TLSSession:
    """Run the server side of a TLS handshake on the non-blocking ``sock``.

    Returns once the handshake is done and our last flight is sent; what the
    client sent after its Finished stays in the session's incoming BIO.

    Raises:
        ssl.SSLError: the handshake failed (a client that does not speak
            TLS, or rejects our certificate); :exc:`ssl.SSLEOFError` when
            the client closed first.
        OSError: the socket failed (a reset).

    Resource handling:
        ``sock`` stays the caller's, whatever happens.
    """
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            sslobj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if outgoing.pending:
            await _send_all(sock, outgoing.read())
        if done:
            return TLSSession(sslobj, incoming, outgoing)
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(MAX_READ)
        except NOT_NOW:
            continue
        if data:
            incoming.write(data)
        else:
            # do_handshake() then raises SSLEOFError.
            incoming.write_eof()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except NOT_NOW:
            await trio.lowlevel.wait_writable(sock)
        else:
            view = view[n:]


class TLSTransport(Transport):
    """A :class:`~trio_evlisten.Transport` over a TLS session.

    asyncio's SSL transport, as far as a protocol can tell: ``write`` takes
    plaintext; ``close`` sends TLS's ``close_notify`` after what was
    written; the peer's ``close_notify`` gives ``eof_received()`` (TLS
    cannot stay half-open, so the connection is then closed whatever it
    returns); ``write_eof`` is not possible (``can_write_eof()`` is False);
    ``get_extra_info`` also answers ``"sslcontext"``, ``"ssl_object"``,
    ``"peercert"``, ``"cipher"`` and ``"compression"``.

    Error handling:
        A client that closes without ``close_notify`` (a truncated stream)
        gives ``connection_lost`` an :exc:`ssl.SSLEOFError`, as a reset
        gives an :exc:`OSError`; so does a broken record
        (:exc:`ssl.SSLError`). ``write_eof`` raises
        :exc:`NotImplementedError`, as asyncio's does.

    Resource handling:
        As the plain transport's: the listener closes the socket once the
        connection is lost.
    """

    __slots__ = ("_peer_done", "_session")

    def __init__(
        self,
        engine: Engine,
        sock: socket.socket,
        addr: Any,
        protocol: Any,
        session: TLSSession,
    ) -> None:
        super().__init__(engine, sock, addr, protocol)
        self._session = session
        # The peer's close_notify came: the session ended cleanly.
        self._peer_done = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The plain transport's names, and asyncio's TLS ones."""
        sslobj = self._session.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "compression":
            return sslobj.compression()
        return super().get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it as :meth:`Transport.write` sends."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not "
                f"{type(data).__name__!r}"
            )
        if self._lost is not None or not data:
            return
        if self._closing:
            # close_notify may already be out: nothing can follow it.
            return
        try:
            self._session.sslobj.write(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            # Only a TLS 1.2 renegotiation makes a write wait for the peer:
            # not served (TLS 1.3 has none), so the connection ends.
            error = ssl.SSLError(f"TLS renegotiation is not supported ({exc})")
            self._lose(error)
            return
        except ssl.SSLError as exc:
            self._lose(exc)
            return
        self._flush()

    def write_eof(self) -> None:
        """Not possible over TLS: :exc:`NotImplementedError`."""
        raise NotImplementedError(
            "write_eof() is not possible over TLS (there is no half-close "
            "after close_notify); call close() to end the connection"
        )

    def can_write_eof(self) -> bool:
        """False: TLS cannot half-close."""
        return False

    def close(self) -> None:
        """Send ``close_notify`` after what was written, then close."""
        if self._closing:
            return
        if self._lost is None:
            try:
                self._session.sslobj.unwrap()
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify: we do not wait for it
            except ssl.SSLError:
                pass  # a session already broken: nothing to say goodbye with
            self._flush()
        super().close()

    def _flush(self) -> None:
        """Hand what the session encrypted to the plain transport's write."""
        outgoing = self._session.outgoing
        if outgoing.pending:
            Transport.write(self, outgoing.read())

    def _read_ready(self) -> None:
        """The socket is readable: read once, deliver every whole record."""
        try:
            data = self._sock.recv(MAX_READ)
        except NOT_NOW:
            return
        except OSError as exc:
            self._lose(exc)
            return
        if data:
            self._session.incoming.write(data)
        else:
            self._session.incoming.write_eof()
        self._deliver()

    def _deliver(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the protocol.

        Everything one read brought is delivered, even if the protocol
        pauses reading meanwhile: ``pause_reading`` stops reading from the
        kernel, as the plain transport's does, and whole records left in
        the BIO would otherwise wait for a wake that never comes.
        """
        sslobj = self._session.sslobj
        protocol = self._protocol
        buffered = self._buffered
        while self._lost is None:
            buf: Any = None
            try:
                if buffered:
                    try:
                        buf = protocol.get_buffer(-1)
                        if not len(buf):
                            raise RuntimeError("get_buffer() returned an empty buffer")
                    except Exception as exc:
                        self._failed(exc)
                        break
                    got: Any = sslobj.read(len(buf), buf)
                else:
                    got = sslobj.read(MAX_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # The peer's close_notify: its end of the stream.
                self._tls_eof(protocol)
                break
            except ssl.SSLError as exc:
                # SSLEOFError (closed without close_notify), a broken record.
                self._lose(exc)
                break
            if not got:
                self._tls_eof(protocol)
                break
            try:
                if buffered:
                    protocol.buffer_updated(got)
                else:
                    protocol.data_received(got)
            except Exception as exc:
                self._failed(exc)
                break
        # A renegotiation, or a session ticket, may have produced records.
        if self._lost is None:
            self._flush()

    def _lose(self, exc: BaseException | None, *, error: bool = False) -> None:
        if self._peer_done and not error:
            # After the peer's close_notify, its socket may be gone before
            # our answer arrives (a reset): the session still ended cleanly.
            exc = None
        super()._lose(exc, error=error)

    def _tls_eof(self, protocol: Any) -> None:
        self._peer_done = True
        try:
            protocol.eof_received()
        except Exception as exc:
            self._failed(exc)
            return
        self.close()

    def _started(self) -> None:
        """Called once ``connection_made`` returned: serve what came with
        the handshake (the client's first records), which no wake would."""
        if self._session.incoming.pending:
            self._deliver()
