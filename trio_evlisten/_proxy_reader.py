"""The listener's PROXY header reader (``proxy_protocol=True``): who is
trusted, the timeout, the count and the grouped warning around
:func:`._proxy.read_header`, and which address the handler is given.

The address a handler gets (its ``addr``):

* A ``PROXY`` header naming a TCP client (v1 ``TCP4``/``TCP6``, v2 families
  ``0x1``/``0x2``): that client's address, in the shape ``accept()`` gives for
  its family, whatever the listener's own family: IPv4 ``(host, port)``, IPv6
  ``(host, port, flowinfo, scope_id)`` (the last two are 0). So an IPv4
  listener behind an IPv6 proxy gets 4-tuples, and an IPv6 listener gets
  2-tuples from ``TCP4`` headers (not the ``::ffff:a.b.c.d`` form ``accept()``
  gives a dual-stack socket).
* On a Unix-socket listener, the same: a proxy that relays TCP clients to a
  Unix socket (HAProxy's ``server app unix@/run/app.sock send-proxy-v2``) is
  what PROXY over a Unix socket is for, so the handler of such a listener gets
  tuples as well as paths.
* A v2 header with a Unix-socket source (family ``0x3``): on a Unix listener,
  that path, as ``accept()`` would give it: a ``str``, ``bytes`` for a Linux
  abstract name (leading NUL kept), ``''`` for an unnamed peer. On a TCP
  listener, whose handler expects ``(host, port)``, the header's address is
  ignored and the handler gets the real peer's, as for ``LOCAL``: the spec
  lets a receiver that does not support a family fall back to ``UNSPEC``
  ("accept the connection anyway and use the real endpoint addresses"), and
  HAProxy and nginx, as receivers, do exactly that for everything but TCP
  over IPv4 and IPv6. It is not a rejection (the proxy is trusted and its
  header valid): nothing is counted, and a DEBUG line names it. (UDP over
  IPv4/IPv6, ``0x12``/``0x22``, is handed over like TCP: the address has
  the shape the handler expects.)
* ``LOCAL`` (health checks), v1 ``UNKNOWN``, v2 ``UNSPEC``: the real peer's
  address, as ``accept()`` gave it (on a Unix listener usually ``''``).

Anything else (an untrusted peer, a malformed, oversized or truncated header,
a timeout) closes the connection before the handler runs, counted in
``proxy_rejected`` and warned about through the listener's one kind of
grouped log (:class:`._errors.GroupedLog`): the first of a burst in full, then
one summary line per interval with the count of each reason.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import attrs
import trio

from ._errors import GroupedLog
from ._proxy import Peekable, ProxyHeaderError, read_header

if TYPE_CHECKING:
    from collections.abc import Iterable

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

logger: Final = logging.getLogger("trio_evlisten")

#: Who may send a header when ``proxy_trusted`` is not given.
DEFAULT_TRUSTED: Final[tuple[Network, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
#: How long a header may take to arrive, by default.
PROXY_TIMEOUT: Final = 5.0


def trusted_networks(value: Iterable[str | Network] | None) -> tuple[Network, ...]:
    """``proxy_trusted=`` as a tuple of networks (``None``: loopback only).

    Raises:
        TypeError: ``value`` or an item of it has the wrong type.
        ValueError: an item is not a network (each message names it).
    """
    if value is None:
        return DEFAULT_TRUSTED
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            "proxy_trusted must be an iterable of networks (like "
            f"['10.0.0.0/8', '::1']) or None, not {value!r}"
        )
    nets: list[Network] = []
    for item in value:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            nets.append(item)
        elif isinstance(item, str):
            try:
                nets.append(ipaddress.ip_network(item))
            except ValueError as exc:
                raise ValueError(
                    f"proxy_trusted item {item!r} is not a network: {exc}"
                ) from None
        else:
            raise TypeError(
                f"proxy_trusted items must be str or ipaddress networks, not {item!r}"
            )
    return tuple(nets)


def is_trusted(addr: Any, nets: tuple[Network, ...]) -> bool:
    """Whether the peer ``addr`` (as ``accept()`` gave it) is in ``nets``.

    A Unix-socket peer is always trusted: who may connect is already decided
    by the socket file's permissions.
    """
    if not isinstance(addr, tuple):
        return True
    try:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    except (ValueError, AttributeError, IndexError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return any(ip in net for net in nets)


#: What :meth:`ProxyReader.read` returns for a connection it refused.
REJECTED: Final = object()


@attrs.define(eq=False)
class ProxyReader:
    """Reads the PROXY header of each connection: trust, timeout, count, log.

    Attributes:
        trusted: who may send a header (``proxy_trusted``).
        timeout: how long a header may take to arrive (``proxy_timeout``).
        where: the listener's own address (``getsockname()``): named in the
            warnings, and its family decides what a Unix-family header gives
            (see the module's docstring).
        rejected: connections closed so far without calling the handler.
    """

    trusted: tuple[Network, ...]
    timeout: float
    where: Any
    rejected: int = attrs.field(default=0, init=False)
    _log: GroupedLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._log = GroupedLog(
            logger,
            f"listener {self.where!r} dropped connections",
            "proxy_rejected",
            level=logging.WARNING,
        )

    async def read(self, sock: Peekable, addr: Any) -> Any:
        """The address to hand the handler, or :data:`REJECTED`.

        Args:
            sock: the accepted connection, still non-blocking.
            addr: the peer's address as ``accept()`` gave it.

        Returns:
            The original client's address from the header; ``addr`` for
            ``LOCAL`` (and v1 ``UNKNOWN``, v2 ``UNSPEC``) and, on a TCP
            listener, for a Unix-family header (the module's docstring lists
            every case); :data:`REJECTED` if the connection must be closed.

        Error handling:
            An untrusted peer, a bad or truncated header, a reset, or no
            complete header within :attr:`timeout`: counted in
            :attr:`rejected`, warned about (rate-limited), ``REJECTED``.

        Resource handling:
            ``sock`` stays the caller's, who closes it on ``REJECTED``.
        """
        if not is_trusted(addr, self.trusted):
            self._reject(addr, "untrusted", "the peer is not in proxy_trusted")
            await trio.lowlevel.checkpoint()
            return REJECTED
        with trio.move_on_after(self.timeout):
            try:
                header = await read_header(sock)
            except ProxyHeaderError as exc:
                self._reject(addr, "bad header", str(exc))
                return REJECTED
            return self._address(header.source, addr)
        self._reject(
            addr, "timeout", f"no complete PROXY header within {self.timeout} s"
        )
        return REJECTED

    def _address(self, source: Any, addr: Any) -> Any:
        if source is None:
            return addr
        if isinstance(self.where, tuple) and not isinstance(source, tuple):
            # A Unix-socket client named to a TCP listener: no (host, port)
            # to give, so fall back to UNSPEC as the spec allows and HAProxy
            # and nginx do.
            logger.debug(
                "listener %r: PROXY header from %r names a Unix-socket client "
                "%r; using the real peer's address",
                self.where,
                addr,
                source,
            )
            return addr
        return source

    def _reject(self, addr: Any, kind: str, why: str) -> None:
        self.rejected += 1
        if self._log.record(kind, f"{why} from {addr!r}", trio.current_time()):
            logger.warning(
                "listener %r dropped a connection from %r: %s",
                self.where,
                addr,
                why,
                extra={"proxy_rejected": 1},
            )

    def flush_log(self, final: str) -> None:
        """Log what the grouped warning still holds, with ``final``."""
        self._log.flush(trio.current_time(), final=final)
