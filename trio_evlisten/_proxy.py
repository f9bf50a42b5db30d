"""The PROXY protocol, versions 1 and 2: parsing the header, and reading it.

HAProxy's ``proxy-protocol.txt`` is the spec. A load balancer that speaks it
opens its connection to us with one header naming the original client, then
relays the client's bytes. Three layers, each testable alone:

* :func:`header_length`: from the first bytes (peeked, not consumed), which
  version this is and how long its header is, or ``None`` for "need more".
* :func:`parse_header`: the complete header's bytes to a :class:`ProxyHeader`.
* :func:`read_header`: on the accepted stdlib socket (non-blocking), peek
  until the header is complete, then read exactly its length, so that not
  one byte of the application's data is taken (the spec's "the receiver
  must only consume the header"); a header in pieces is waited for on
  readability, never on a timer.

:class:`._proxy_reader.ProxyReader` puts them together for the listener: the
trust check, the timeout, the count and the rate-limited warning.

Everything wrong with a header raises :exc:`ProxyHeaderError`, and nothing
else does.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from typing import Any, Final, Literal, Protocol

import attrs
import trio

#: The v2 header starts with these 12 bytes (chosen to be invalid in every
#: text protocol, so no client could send them by accident).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/protocol, 2-byte length.
V2_FIXED: Final = 16
#: The largest v2 header (with TLVs) we take. The spec allows 16 + 65535;
#: the addresses need at most 216 bytes and the TLVs HAProxy sends (ALPN,
#: authority, unique id, SSL details) a few hundred more, so 4 KiB leaves
#: room while bounding what one connection can make us buffer.
V2_MAX: Final = 4096
V1_PREFIX: Final = b"PROXY "
#: The shortest v1 header: ``PROXY UNKNOWN`` and CRLF.
V1_MIN: Final = len(b"PROXY UNKNOWN\r\n")
#: The spec's limit, CRLF included: "PROXY UNKNOWN " + two full-length
#: IPv6 addresses + two 5-digit ports, spaces between.
V1_MAX: Final = 107

_TCP: Final = frozenset({socket.AF_INET, socket.AF_INET6})

# v2 family/protocol byte: the only values the spec allows.
_V2_FAMILIES: Final = {
    0x00: None,
    0x11: socket.AF_INET,
    0x12: socket.AF_INET,
    0x21: socket.AF_INET6,
    0x22: socket.AF_INET6,
    0x31: socket.AF_UNIX,
    0x32: socket.AF_UNIX,
}
_V2_ADDR_LEN: Final = {socket.AF_INET: 12, socket.AF_INET6: 36, socket.AF_UNIX: 216}
_V1_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """A PROXY header is malformed, too long, truncated or not there at all."""


@attrs.frozen
class ProxyHeader:
    """One parsed PROXY header.

    Attributes:
        version: 1 or 2.
        command: ``"PROXY"`` (relayed: the addresses are the client's) or
            ``"LOCAL"`` (v2 health checks and the like; v1 ``UNKNOWN`` also
            maps here): use the real peer's address.
        source: the original client's address in the shape ``accept()``
            gives for its family (``(host, port)``, ``(host, port, 0, 0)``,
            a Unix path: ``str``, ``bytes`` for an abstract name, ``''`` for
            an unnamed socket), or ``None`` for ``LOCAL``.
        destination: the address the client connected to, same shape.
        length: the header's length in bytes, all of which were consumed.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: Any
    destination: Any
    length: int


def header_length(prefix: bytes) -> int | None:
    """The total header length that ``prefix`` announces, or ``None`` if unsure.

    ``prefix`` is what has arrived so far (peeked). ``None`` means more bytes
    are needed to tell; the answer never asks for more than :data:`V2_MAX`
    bytes.

    Raises:
        ProxyHeaderError: ``prefix`` cannot start a valid header.
    """
    if not prefix:
        return None
    n = min(len(prefix), len(V2_SIGNATURE))
    if prefix[:n] == V2_SIGNATURE[:n]:
        if len(prefix) < V2_FIXED:
            return None
        version = prefix[12] >> 4
        if version != 2:
            raise ProxyHeaderError(
                f"PROXY v2 signature with version {version}, not 2 "
                f"(byte 13 is {prefix[12]:#04x})"
            )
        total = V2_FIXED + int.from_bytes(prefix[14:16], "big")
        if total > V2_MAX:
            raise ProxyHeaderError(
                f"PROXY v2 header of {total} bytes, over our limit of {V2_MAX}"
            )
        return total
    n = min(len(prefix), len(V1_PREFIX))
    if prefix[:n] == V1_PREFIX[:n]:
        end = prefix.find(b"\n", 0, V1_MAX)
        if end >= 0:
            return end + 1
        if len(prefix) >= V1_MAX:
            raise ProxyHeaderError(
                f"PROXY v1 header without CRLF in its first {V1_MAX} bytes"
            )
        return None
    raise ProxyHeaderError(
        f"the connection does not start with a PROXY header: {prefix[:16]!r}"
    )


def parse_header(data: bytes) -> ProxyHeader:
    """Parse one complete header: exactly the ``header_length(data)`` bytes.

    Raises:
        ProxyHeaderError: ``data`` is not exactly one valid header.
    """
    length = header_length(data)
    if length is None or length != len(data):
        raise ProxyHeaderError(
            f"expected one complete PROXY header, not {len(data)} bytes "
            f"(announced length: {length})"
        )
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


def _parse_v1(data: bytes) -> ProxyHeader:
    if not data.endswith(b"\r\n") or b"\r" in data[:-2]:
        raise ProxyHeaderError(f"PROXY v1 header not ended by CRLF: {data!r}")
    try:
        line = data[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError(f"PROXY v1 header is not ASCII: {data!r}") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The spec: the receiver ignores whatever follows UNKNOWN.
        return ProxyHeader(1, "LOCAL", None, None, len(data))
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(
            "PROXY v1 header must be 'PROXY TCP4|TCP6 src dst sport dport' "
            f"or 'PROXY UNKNOWN ...', not {line!r}"
        )
    family = socket.AF_INET if fields[1] == "TCP4" else socket.AF_INET6
    src, dst = (_v1_host(family, h, line) for h in fields[2:4])
    sport, dport = (_v1_port(p, line) for p in fields[4:6])
    return ProxyHeader(
        1,
        "PROXY",
        _sockaddr(family, src, sport),
        _sockaddr(family, dst, dport),
        len(data),
    )


def _v1_host(family: int, text: str, line: str) -> str:
    try:
        # inet_pton is strict (no leading zeros, no names); inet_ntop then
        # gives the kernel's own spelling, as accept() would.
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise ProxyHeaderError(
            f"bad {'IPv4' if family == socket.AF_INET else 'IPv6'} address "
            f"{text!r} in PROXY v1 header {line!r}"
        ) from None


def _v1_port(text: str, line: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"bad port {text!r} in PROXY v1 header {line!r}")
    return int(text)


def _sockaddr(family: int, host: str, port: int) -> tuple[Any, ...]:
    if family == socket.AF_INET6:
        return (host, port, 0, 0)
    return (host, port)


def _parse_v2(data: bytes) -> ProxyHeader:
    command = data[12] & 0x0F
    if command == 0x0:
        # LOCAL: the proxy's own connection (a health check); the spec says
        # to ignore the address block, family included.
        return ProxyHeader(2, "LOCAL", None, None, len(data))
    if command != 0x1:
        raise ProxyHeaderError(
            f"PROXY v2 command {command:#x} is neither LOCAL (0) nor PROXY (1)"
        )
    fam = data[13]
    if fam not in _V2_FAMILIES:
        raise ProxyHeaderError(f"PROXY v2 family/protocol byte {fam:#04x} is invalid")
    family = _V2_FAMILIES[fam]
    if family is None:
        # UNSPEC: the spec says to use the real connection's addresses.
        return ProxyHeader(2, "LOCAL", None, None, len(data))
    body = data[V2_FIXED:]
    need = _V2_ADDR_LEN[family]
    if len(body) < need:
        raise ProxyHeaderError(
            f"PROXY v2 address block of {len(body)} bytes, family {family.name} "
            f"needs {need}"
        )
    # What follows the addresses is TLVs; nothing here needs them.
    if family == socket.AF_UNIX:
        src: Any = _unix_path(body[:108])
        dst: Any = _unix_path(body[108:216])
    else:
        size = 4 if family == socket.AF_INET else 16
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        src = _sockaddr(family, socket.inet_ntop(family, body[:size]), sport)
        dst = _sockaddr(family, socket.inet_ntop(family, body[size : 2 * size]), dport)
    return ProxyHeader(2, "PROXY", src, dst, len(data))


def _unix_path(raw: bytes) -> str | bytes:
    """A 108-byte ``sun_path`` as ``accept()`` gives it in Python."""
    name = raw.rstrip(b"\0")
    if name[:1] == b"\0":
        # Linux's abstract namespace: bytes, leading NUL kept, as accept()
        # gives them (the fixed-size field hides trailing NULs of the name).
        return name
    # A path, or '' for an unnamed socket (all zeros), as accept() gives one.
    return os.fsdecode(raw.split(b"\0", 1)[0])


async def read_header(sock: Peekable) -> ProxyHeader:
    """Read one PROXY header from ``sock``, consuming exactly its bytes.

    Peek (``MSG_PEEK``) at what has arrived, up to the longest header that
    could still be there; if that holds a complete header, read exactly its
    length and parse it. The application's bytes after the header stay in
    the socket. A header that arrives in one segment (the spec asks senders
    to send it at once, and they do) costs one peek and one read.

    A header that comes in pieces is waited for on events, never on a timer,
    so a trusted peer that sends it one byte a second costs nothing between
    wake-ups. On TCP, ``SO_RCVLOWAT`` is raised to the fewest bytes that
    could complete the header, so such a peer wakes us only once enough has
    come (or at its EOF or reset), not once per byte; on a Unix socket each
    piece is a wake-up. Waiting for readability after a peek would
    spin (the peeked bytes keep the socket readable); so when what has
    arrived does not yet complete a header, it is consumed into a buffer
    first. That is sound because all of it belongs to the header:
    :func:`header_length` would have recognised a complete one, and it asks
    for more only while the bytes so far are a strict prefix of a header.
    The socket is then empty, and waiting for readability waits for the
    next byte, or for the peer's EOF or reset, which end the read at once.
    The caller's timeout bounds the whole.

    ``sock`` is the accepted, non-blocking stdlib socket (anything with its
    ``recv(bufsize, flags)`` and ``fileno()``).

    Raises:
        ProxyHeaderError: a bad header, or the peer closed the connection
            (or reset it) before the header was complete.

    Resource handling:
        ``sock`` stays open and is the caller's. Whether this returns or
        raises, the bytes consumed are a prefix of the header, never one byte
        past it; after an error the connection is of no further use.
    """
    buf = bytearray()
    total: int | None = None
    lowat = 1  # SO_RCVLOWAT as we left it (1 is the kernel's default)
    while True:
        # No header is longer than V2_MAX; once its length is known, no
        # longer than that. Peeking more than that would be harmless (it is
        # only a look), but there is no reason to.
        limit = (V2_MAX if total is None else total) - len(buf)
        try:
            # The stdlib socket's own recv(): non-blocking, so it answers at
            # once; trio's would add a trip through the scheduler per peek.
            data = sock.recv(limit, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            raise ProxyHeaderError(
                f"connection failed before the header: {exc}"
            ) from exc
        if not data:
            raise ProxyHeaderError(
                f"connection closed after {len(buf)} bytes, "
                "before the PROXY header ended"
            )
        seen = bytes(buf) + data if buf else data
        total = header_length(seen)
        if total is not None and len(seen) >= total:
            rest = _take(sock, total - len(buf))
            if lowat != 1:
                # The application reads this socket next: as it was.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            return parse_header(bytes(buf) + rest if buf else rest)
        # Incomplete: every byte seen is the header's, so take them all, and
        # wait on the now empty socket for the next one.
        buf += _take(sock, len(data))
        if sock.family in _TCP:
            # On TCP, wake only once enough has come to possibly complete
            # the header (Linux's epoll honours SO_RCVLOWAT; EOF and resets
            # still wake at once): a peer dribbling a byte a second costs no
            # wake-up at all until then.
            need = _shortest_rest(buf, total)
            if need != lowat:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
                lowat = need
        await trio.lowlevel.wait_readable(sock)


def _shortest_rest(prefix: bytes | bytearray, total: int | None) -> int:
    """How many more bytes at least before ``prefix`` could be a whole header."""
    if total is not None:
        shortest = total
    elif prefix[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(prefix)]:
        shortest = V2_FIXED
    else:
        shortest = V1_MIN
    return max(shortest - len(prefix), 1)


class Peekable(Protocol):
    """What :func:`read_header` needs of a socket: a stdlib socket's calls."""

    @property
    def family(self) -> int: ...

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...

    def fileno(self) -> int: ...


def _take(sock: Peekable, size: int) -> bytes:
    """Consume the ``size`` bytes that a peek has just seen in ``sock``.

    A plain ``read(2)``: the bytes are there, so there is nothing to wait
    for, and trio's ``recv()`` would add a trip through the scheduler.
    """
    buf = b""
    while len(buf) < size:  # one pass: a stream hands over what it showed
        try:
            chunk = os.read(sock.fileno(), size - len(buf))
        except OSError as exc:  # pragma: no cover - a reset just now
            raise ProxyHeaderError(
                f"connection failed reading the header: {exc}"
            ) from exc
        if not chunk:  # pragma: no cover - the bytes were just peeked
            raise ProxyHeaderError("connection closed while reading the header")
        buf += chunk
    return buf
