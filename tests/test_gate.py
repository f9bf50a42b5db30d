"""Callbacks are checked when they are set: async handlers, plain error callbacks."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import trio

from trio_evlisten import ConnListener, Flag, open_listener

LOCAL = ("127.0.0.1", 0)


async def handler(listener: ConnListener, conn: Any, addr: Any, *args: Any) -> None:
    pass


def plain_handler(listener: ConnListener, conn: Any, addr: Any) -> None:
    pass  # pragma: no cover - refused before it could run


def error_cb(listener: ConnListener, error: OSError, *args: Any) -> None:
    pass  # pragma: no cover


async def async_error_cb(listener: ConnListener, error: OSError) -> None:
    pass  # pragma: no cover


class AsyncCallable:
    async def __call__(self, listener: ConnListener, conn: Any, addr: Any) -> None:
        pass  # pragma: no cover


class PlainCallable:
    def __call__(self, *args: Any) -> None:
        pass  # pragma: no cover


class Methods:
    async def handle(self, listener: ConnListener, conn: Any, addr: Any) -> None:
        pass  # pragma: no cover

    def on_error(self, listener: ConnListener, error: OSError) -> None:
        pass  # pragma: no cover


ASYNC_ONES = [
    handler,
    functools.partial(handler),
    functools.partial(functools.partial(handler)),
    AsyncCallable(),
    Methods().handle,
]
PLAIN_ONES = [
    plain_handler,
    functools.partial(plain_handler),
    PlainCallable(),
    Methods().on_error,
    lambda *args: None,
    print,
]


@pytest.mark.parametrize("cb", PLAIN_ONES)
async def test_a_plain_accept_callback_is_refused_at_open_and_in_set_cb(
    cb: Any,
) -> None:
    with pytest.raises(TypeError, match=r"cb must be an async function.*not async"):
        async with open_listener(cb, address=LOCAL):
            pass  # pragma: no cover
    async with open_listener(None, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        with pytest.raises(TypeError, match=r"async def cb\(listener, conn, addr"):
            lst.set_cb(cb)
        assert lst.statistics().accepted == 0


@pytest.mark.parametrize("cb", ASYNC_ONES)
async def test_async_accept_callbacks_of_every_shape_are_taken(cb: Any) -> None:
    async with open_listener(cb, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        lst.set_cb(cb, "arg")


@pytest.mark.parametrize(
    "bad", [async_error_cb, functools.partial(async_error_cb), AsyncCallable()]
)
async def test_an_async_error_callback_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"error_cb must be a plain function.*async"):
        async with open_listener(handler, address=LOCAL, error_cb=bad):
            pass  # pragma: no cover
    async with open_listener(handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        with pytest.raises(TypeError, match=r"def error_cb\(listener, error"):
            lst.set_error_cb(bad)


@pytest.mark.parametrize(
    "good", [error_cb, functools.partial(error_cb), Methods().on_error, PlainCallable()]
)
async def test_plain_error_callbacks_are_taken(good: Any) -> None:
    async with open_listener(
        handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE, error_cb=good
    ) as lst:
        lst.set_error_cb(good, "arg")


@pytest.mark.parametrize("bad", [42, "handler"])
async def test_a_callback_that_is_not_callable_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match=repr(bad)):
        async with open_listener(bad, address=LOCAL):  # type: ignore[arg-type]
            pass  # pragma: no cover
    with pytest.raises(TypeError, match=repr(bad)):
        async with open_listener(None, address=LOCAL, error_cb=bad):  # type: ignore[arg-type]
            pass  # pragma: no cover


def test_nothing_is_called_before_the_refusal() -> None:
    called: list[object] = []

    def side_effect(*args: Any) -> None:
        called.append(args)  # pragma: no cover

    async def main() -> None:
        with pytest.raises(TypeError):
            async with open_listener(side_effect, address=LOCAL):  # type: ignore[arg-type]
                pass  # pragma: no cover

    trio.run(main)
    assert called == []
