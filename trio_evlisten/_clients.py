"""Per-client connection limits (``max_connections_per_client=``): who a
client is, the bounded table of their counts, and holding or refusing.

Owns: the client's key (its IP address; IPv6 grouped by a prefix, since one
host commonly holds a whole /64; an IPv4-mapped IPv6 address counts as the
IPv4 one), the table from key to count, the policy over the limit
(``client_limit_policy``: ``"refuse"`` closes the connection at once,
``"hold"`` parks it until that client's count drops), and the bound on the
table (``client_table_size``).

May not touch: handler slots and the accept decision. A connection that is
held is still *pending* for :class:`._state.ListenerState` (it holds no
handler slot); the host (:mod:`._host`) asks :meth:`ClientLimiter.enter`
in the connection's own task, waits with :meth:`~ClientLimiter.wait_turn`
if told to, and calls :meth:`~ClientLimiter.leave` when the connection ends.

The table's bound: an entry exists only while its client has a connection
counted or held, so the table holds at most as many entries as there are
such connections, and never more than ``client_table_size``. A new client
that finds the table full is refused (counted as ``client table full``), as
nginx's ``limit_conn_zone`` does when its zone is exhausted: counting it
nowhere would let anyone who can fill the table (a trusted proxy passing
spoofed addresses) lift the limit for everyone.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import trio

from ._overload import PER_CLIENT, TABLE_FULL

if TYPE_CHECKING:
    from ._overload import Shedding

ClientPolicy = Literal["refuse", "hold"]

#: ``client_ipv6_prefix``'s default: a /64 is what one site or host gets.
IPV6_PREFIX: Final = 64
#: ``client_table_size``'s default.
TABLE_SIZE: Final = 65536

_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"
# IPv6 keys are offset past every IPv4 one, so the two never collide.
_V6: Final = 1 << 128


def client_policy(value: object, name: str) -> ClientPolicy:
    if value == "refuse" or value == "hold":
        return value
    raise ValueError(f"{name} must be 'refuse' or 'hold', not {value!r}")


def ipv6_prefix(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a prefix length (an int), not {value!r}")
    if not 0 <= value <= 128:
        raise ValueError(f"{name} must be a prefix length 0..128, not {value!r}")
    return value


def table_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value!r}")
    return value


def client_key(addr: Any, prefix: int = IPV6_PREFIX) -> int | None:
    """The key ``addr`` is counted under, or ``None`` (not counted).

    An int: the IPv4 address, or an IPv6 address's first ``prefix`` bits
    (offset past the IPv4 range). ``None`` for a Unix-socket peer (a path,
    not a client identity) or anything not an IP address.
    """
    if not isinstance(addr, tuple) or not addr or not isinstance(addr[0], str):
        return None
    host = addr[0]
    try:
        if ":" not in host:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return None
    if packed[:12] == _V4_MAPPED:
        return int.from_bytes(packed[12:], "big")
    return _V6 | (int.from_bytes(packed, "big") >> (128 - prefix))


@attrs.define(eq=False)
class _Client:
    #: Connections of this client counted (past the limit check).
    count: int = 0
    #: Connections held, waiting for ``count`` to drop.
    waiting: int = 0
    lot: trio.lowlevel.ParkingLot | None = None


#: What :meth:`ClientLimiter.enter` says of a connection to close at once.
REFUSED: Final = object()
#: What :meth:`ClientLimiter.enter` says of a connection that must wait.
HOLD: Final = object()


@attrs.define(eq=False)
class ClientLimiter:
    """The per-client counts of one listener; see the module's docstring."""

    limit: int
    policy: ClientPolicy
    prefix: int
    size: int
    _shed: Shedding
    _table: dict[int, _Client] = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        """Entries in the table now."""
        return len(self._table)

    def enter(self, addr: Any) -> tuple[object, int | None]:
        """Count a connection from ``addr``: ``(verdict, key)``.

        The verdict is ``None`` (counted: go on, and :meth:`leave` ``key``
        at the end; a ``None`` key is not counted and needs no leave),
        :data:`HOLD` (call :meth:`wait_turn`) or :data:`REFUSED` (close it).
        """
        key = client_key(addr, self.prefix)
        if key is None:
            return None, None
        table = self._table
        client = table.get(key)
        if client is None:
            if len(table) >= self.size:
                self._shed.refused_one(
                    TABLE_FULL,
                    f"{addr!r} is a new client and the table of clients holds "
                    f"client_table_size={self.size} already",
                )
                return REFUSED, key
            table[key] = _Client(count=1)
            return None, key
        if client.count < self.limit:
            client.count += 1
            return None, key
        detail = (
            f"{addr!r} has {client.count} connections, "
            f"max_connections_per_client={self.limit}"
        )
        if self.policy == "hold" and client.waiting < self.limit:
            client.waiting += 1
            self._shed.held_one(detail)
            return HOLD, key
        self._shed.refused_one(PER_CLIENT, detail)
        return REFUSED, key

    async def wait_turn(self, key: int) -> None:
        """Wait (held) until ``key``'s count drops; then it is counted.

        Raises whatever cancels it, uncounted (no :meth:`leave` then).
        """
        client = self._table[key]
        if client.lot is None:
            client.lot = trio.lowlevel.ParkingLot()
        try:
            # leave() hands its count over to us, then unparks us.
            await client.lot.park()
        except BaseException:
            client.waiting -= 1
            self._forget_if_unused(key, client)
            raise

    def leave(self, key: int) -> None:
        """A counted connection of ``key`` ended."""
        client = self._table[key]
        if client.waiting:
            # Hand our count to the first one held: it stays counted.
            assert client.lot is not None
            client.waiting -= 1
            client.lot.unpark()
            return
        client.count -= 1
        self._forget_if_unused(key, client)

    def _forget_if_unused(self, key: int, client: _Client) -> None:
        if not (client.count or client.waiting):
            del self._table[key]
            if not self._table:
                # A dict never shrinks by deleting: give back what a burst
                # of clients grew (clear() does, cheaply).
                self._table.clear()
