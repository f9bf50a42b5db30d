"""The listener's side of ``proxy_protocol=True``: who is trusted, the timeout,
the count and the rate-limited warning around :func:`._proxy.read_header`."""

from __future__ import annotations

import ipaddress
import logging
import math
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import attrs
import trio

from ._proxy import ProxyHeaderError, read_header

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
#: At most one WARNING per this many seconds per listener for rejections.
WARN_INTERVAL: Final = 10.0


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


#: What :meth:`ProxyGate.read` returns for a connection it refused.
REJECTED: Final = object()


@attrs.define(eq=False)
class ProxyGate:
    """The listener's PROXY header reader: trust, timeout, count, log."""

    trusted: tuple[Network, ...]
    timeout: float
    where: Any
    rejected: int = attrs.field(default=0, init=False)
    _next_warning: float = attrs.field(default=-math.inf, init=False)
    _suppressed: int = attrs.field(default=0, init=False)

    async def read(self, sock: trio.socket.SocketType, addr: Any) -> Any:
        """The client's address from the header, or :data:`REJECTED`.

        For ``LOCAL`` (and v1 ``UNKNOWN``, v2 ``UNSPEC``) it is ``addr``, the
        real peer's.
        """
        if not is_trusted(addr, self.trusted):
            self._reject(addr, "the peer is not in proxy_trusted")
            await trio.lowlevel.checkpoint()
            return REJECTED
        with trio.move_on_after(self.timeout):
            try:
                header = await read_header(sock)
            except ProxyHeaderError as exc:
                self._reject(addr, str(exc))
                return REJECTED
            return addr if header.source is None else header.source
        self._reject(addr, f"no complete PROXY header within {self.timeout} s")
        return REJECTED

    def _reject(self, addr: Any, why: str) -> None:
        self.rejected += 1
        now = trio.current_time()
        if now < self._next_warning:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._next_warning = now + WARN_INTERVAL
        logger.warning(
            "listener %r dropped a connection from %r: %s "
            "(%d more dropped without a warning in the last %.0f s)",
            self.where,
            addr,
            why,
            suppressed,
            WARN_INTERVAL,
        )
