"""Flag: libevent's LEV_OPT_* bit values, exports, and open_listener's checks."""

from __future__ import annotations

import enum
import socket

import pytest
import trio

import trio_evlisten
from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import Flag, open_listener
from trio_evlisten.testing import open_stream_to

# libevent's include/event2/listener.h, verbatim.
LIBEVENT_VALUES = {
    "LEAVE_SOCKETS_BLOCKING": 1 << 0,
    "CLOSE_ON_FREE": 1 << 1,
    "CLOSE_ON_EXEC": 1 << 2,
    "REUSEABLE": 1 << 3,
    "THREADSAFE": 1 << 4,
    "DISABLED": 1 << 5,
    "DEFERRED_ACCEPT": 1 << 6,
    "REUSEABLE_PORT": 1 << 7,
    "BIND_IPV6ONLY": 1 << 8,
}


def test_flag_is_an_intflag() -> None:
    assert issubclass(Flag, enum.IntFlag)
    assert int(Flag(0)) == 0


@pytest.mark.parametrize(("name", "value"), sorted(LIBEVENT_VALUES.items()))
def test_flag_bit_values_match_libevent(name: str, value: int) -> None:
    assert int(Flag[name]) == value


def test_flag_has_exactly_libevents_members() -> None:
    assert {f.name for f in Flag} == set(LIBEVENT_VALUES)
    # All distinct single bits: combining any two keeps both.
    assert sum(int(f) for f in Flag) == (1 << 9) - 1


@pytest.mark.parametrize("name", sorted(LIBEVENT_VALUES))
def test_lev_opt_names_are_exported_and_equal_the_members(name: str) -> None:
    lev_name = f"LEV_OPT_{name}"
    assert lev_name in trio_evlisten.__all__
    exported = getattr(trio_evlisten, lev_name)
    assert exported is Flag[name]
    assert exported == LIBEVENT_VALUES[name]


def test_flag_shown_under_its_public_module() -> None:
    assert Flag.__module__ == "trio_evlisten"


@pytest.mark.parametrize("bad", ["2", 2.0, None, [2], True, False])
async def test_open_listener_rejects_non_int_flags(bad: object) -> None:
    with trio.fail_after(10):
        with pytest.raises(TypeError, match="flags") as info:
            async with open_listener(
                echo_handler,
                address=("127.0.0.1", 0),
                flags=bad,  # type: ignore[arg-type]
            ):
                pytest.fail("the block must not run")  # pragma: no cover
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (1 << 9, "unknown bits 0x200"),
        (1 << 20, "unknown bits 0x100000"),
        ((1 << 9) | int(Flag.CLOSE_ON_FREE), "unknown bits 0x200"),
        # Not "unknown bits -0x200": a negative int is no combination at all.
        (-1, r"flags must be Flag values combined with \|, 0 to 511, not -1"),
    ],
)
async def test_open_listener_rejects_unknown_bits(bad: int, message: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(ValueError, match=message) as info:
            async with open_listener(echo_handler, address=("127.0.0.1", 0), flags=bad):
                pytest.fail("the block must not run")  # pragma: no cover
    assert "CLOSE_ON_FREE" in str(info.value)  # the valid names are listed


async def test_unknown_bits_rejected_before_a_callers_socket_is_touched() -> None:
    with trio.fail_after(10):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(3)
            with pytest.raises(ValueError, match="unknown bits"):
                async with open_listener(
                    echo_handler, sock=sock, flags=Flag.CLOSE_ON_FREE | (1 << 12)
                ):
                    pytest.fail("the block must not run")  # pragma: no cover
            assert sock.fileno() != -1
            assert sock.getblocking()


async def test_plain_int_flags_are_accepted_and_mean_the_same() -> None:
    value = int(Flag.CLOSE_ON_FREE | Flag.REUSEABLE)
    assert type(value) is int
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=value
        ) as listener:
            assert listener.flags == Flag.CLOSE_ON_FREE | Flag.REUSEABLE
            assert isinstance(listener.flags, Flag)
            assert listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            async with await open_stream_to(listener) as client:
                await client.send_all(b"int flags")
                assert await recv_exactly(client, 9) == b"int flags"
        # CLOSE_ON_FREE, given as a plain int, was obeyed.
        assert listener.fd == -1


async def test_zero_flags_as_int() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=("127.0.0.1", 0), flags=0
        ) as listener:
            assert listener.flags == Flag(0)
            # No CLOSE_ON_FREE: the socket outlives the block, ours to close.
            sock = listener.socket
        assert sock.fileno() != -1
        sock.close()
