"""Callbacks are checked when they are set: async handlers, plain error
callbacks, each able to take the arguments it will be called with."""

from __future__ import annotations

import functools
import inspect
import sys
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
        lst.set_cb(cb)


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
        lst.set_error_cb(good)


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


# --- arity: each callback can take what it will be called with --------------


async def conn_addr(conn: Any, addr: Any) -> None:
    pass  # pragma: no cover - refused before it could run


async def three(listener: Any, conn: Any, addr: Any) -> None:
    pass  # pragma: no cover


async def four(listener: ConnListener, conn: Any, addr: Any, extra: Any) -> None:
    pass  # pragma: no cover


async def needs_keyword(
    listener: ConnListener, conn: Any, addr: Any, *, key: Any
) -> None:
    pass  # pragma: no cover


def injecting(fn: Any) -> Any:
    """A decorator whose wrapper takes fewer arguments than what it wraps."""

    @functools.wraps(fn)
    async def wrapper(listener: ConnListener, conn: Any, addr: Any) -> None:
        await fn(listener, conn, addr, "injected")  # pragma: no cover

    return wrapper


class NoSignature:
    """An async callable whose signature cannot be read (as a C one's)."""

    __signature__ = "unreadable"

    async def __call__(self, *args: Any) -> None:
        pass  # pragma: no cover


#: (callback, args given after it): each pair is refused.
WRONG_ARITY = [
    (conn_addr, ()),
    (three, ("arg",)),
    (four, ()),
    (four, ("a", "b")),
    (functools.partial(three, "bound"), ()),
    (needs_keyword, ()),
    (AsyncCallable(), ("arg",)),
    (Methods().handle, ("arg",)),
]
#: ... and each of these is taken.
RIGHT_ARITY = [
    (three, ()),
    (four, ("a",)),
    (handler, ("a", "b", "c")),
    (functools.partial(four, extra="x"), ()),
    (functools.partial(handler), ("a",)),
    (functools.partial(functools.partial(four), extra="e"), ()),
    (injecting(four), ()),
    (NoSignature(), ("anything",)),
    (AsyncCallable(), ()),
    (Methods().handle, ()),
]


@pytest.mark.parametrize(("cb", "args"), WRONG_ARITY)
async def test_an_accept_callback_of_the_wrong_arity_is_refused(
    cb: Any, args: tuple[Any, ...]
) -> None:
    # The message says how it is called, and what the callback takes.
    called_as = r"cb is called as cb\(listener, conn, addr" + (
        r", \*args\) with args=" if args else r"\)"
    )
    with pytest.raises(TypeError, match=called_as + r".* cannot take that"):
        async with open_listener(cb, *args, address=LOCAL):
            pass  # pragma: no cover
    async with open_listener(None, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        with pytest.raises(TypeError, match=called_as):
            lst.set_cb(cb, *args)
        assert lst.statistics().accepted == 0


@pytest.mark.parametrize(("cb", "args"), RIGHT_ARITY)
async def test_accept_callbacks_of_the_right_arity_are_taken(
    cb: Any, args: tuple[Any, ...]
) -> None:
    async with open_listener(cb, *args, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        lst.set_cb(cb, *args)


async def test_the_arity_message_names_the_callback_and_its_signature() -> None:
    with pytest.raises(TypeError) as info:
        async with open_listener(conn_addr, address=LOCAL):
            pass  # pragma: no cover
    assert str(info.value) == (
        "cb is called as cb(listener, conn, addr) for each connection, but "
        "conn_addr(conn: 'Any', addr: 'Any') -> 'None' cannot take that (too "
        "many positional arguments); give it the parameters (listener, conn, addr)"
    )


def on_error_only(error: OSError) -> None:
    pass  # pragma: no cover


def error_with_a_context(listener: ConnListener, error: OSError, context: Any) -> None:
    pass  # pragma: no cover


@pytest.mark.parametrize(
    ("bad", "args"),
    [(on_error_only, ()), (error_with_a_context, ()), (Methods().on_error, ("arg",))],
)
async def test_an_error_callback_of_the_wrong_arity_is_refused(
    bad: Any, args: tuple[Any, ...]
) -> None:
    if not args:
        with pytest.raises(TypeError, match=r"error_cb is called as error_cb\("):
            async with open_listener(handler, address=LOCAL, error_cb=bad):
                pass  # pragma: no cover
    async with open_listener(handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        with pytest.raises(TypeError, match=r"error_cb\(listener, error"):
            lst.set_error_cb(bad, *args)


@pytest.mark.parametrize(
    ("good", "args"), [(error_cb, ("a", "b")), (Methods().on_error, ()), (print, ())]
)
async def test_error_callbacks_of_the_right_arity_are_taken(
    good: Any, args: tuple[Any, ...]
) -> None:
    async with open_listener(handler, address=LOCAL, flags=Flag.CLOSE_ON_FREE) as lst:
        lst.set_error_cb(good, *args)


async def test_a_plain_function_returning_a_coroutine_is_refused() -> None:
    # It cannot be told from a plain function without calling it, and calling
    # it happens per connection: see docs/choices.md.
    with pytest.raises(TypeError, match=r"not async .*write it with async def"):
        async with open_listener(lambda *a: three(*a), address=LOCAL):
            pass  # pragma: no cover


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="inspect.markcoroutinefunction is 3.12+"
)
async def test_a_function_marked_as_returning_a_coroutine_is_taken() -> None:
    marked = inspect.markcoroutinefunction(lambda *a: three(*a))  # type: ignore[attr-defined,unused-ignore]
    async with open_listener(marked, address=LOCAL, flags=Flag.CLOSE_ON_FREE):
        pass
