"""The checks behind each option: the value to use, or an error naming it.

Each takes the value given and the option's name, and returns the value to
use or raises :exc:`TypeError`/:exc:`ValueError` whose message names both
and says what would be right. :mod:`._options` attaches one to each option;
the command lines' spellings of values are here too, and so are the checks
of the two callbacks (:func:`check_accept_cb`, :func:`check_error_cb`), which
:func:`open_listener`, :meth:`ConnListener.set_cb` and
:meth:`ConnListener.set_error_cb` share.
"""

from __future__ import annotations

import functools
import inspect
import math
import reprlib
import ssl
from typing import Any, Literal, TypeAlias

import trio

from ._proxy_reader import Network, trusted_networks
from ._socket import KEEPALIVE_MAX
from ._stream import SocketStream

HandlerErrors = Literal["log", "raise"]
#: What ``stream=`` takes: the class of the stream handlers get.
StreamClass: TypeAlias = "type[SocketStream] | type[trio.SocketStream]"


def check_max_connections(value: object, name: str = "max_connections") -> int | None:
    """Return ``value`` if it is ``None`` or an int >= 1, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or an int, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be None or >= 1, not {value!r}")
    return value


def check_seconds(name: str, value: object, *, optional: bool) -> float | None:
    """Return ``value`` if it is seconds >= 0 (or, if ``optional``, ``None``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be {'None or ' if optional else ''}seconds, not {value!r}"
        )
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}>= 0 seconds, "
            f"not {value!r}"
        )
    return value


def seconds(value: object, name: str) -> float:
    checked = check_seconds(name, value, optional=False)
    assert checked is not None
    return checked


def seconds_or_none(value: object, name: str) -> float | None:
    return check_seconds(name, value, optional=True)


def keepalive_seconds(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or whole seconds (an int), not {value!r}")
    if not 1 <= value <= KEEPALIVE_MAX:
        raise ValueError(
            f"{name} must be None or 1..{KEEPALIVE_MAX} seconds, not {value!r}"
        )
    return value


def agent_port(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or a TCP port (an int), not {value!r}")
    if not 0 <= value <= 65535:
        raise ValueError(
            f"{name} must be None or a TCP port 0..65535 (0: any free one), "
            f"not {value!r}"
        )
    return value


def file_mode(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or a mode like 0o660, not {value!r}")
    if not 0 <= value <= 0o7777:
        raise ValueError(f"{name} must be a mode 0o0..0o7777, not {value!r}")
    return value


def stream_class(value: object, name: str) -> StreamClass:
    if value is SocketStream or value is trio.SocketStream:
        return value
    raise ValueError(
        f"{name} must be trio_evlisten.SocketStream (the default) or "
        f"trio.SocketStream, not {value!r}"
    )


def boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def nursery_or_none(value: object, name: str) -> trio.Nursery | None:
    if value is not None and not isinstance(value, trio.Nursery):
        raise TypeError(f"{name} must be a trio.Nursery or None, not {value!r}")
    return value


def handler_errors(value: object, name: str) -> HandlerErrors:
    if value == "log" or value == "raise":
        return value
    raise ValueError(f"{name} must be 'log' or 'raise', not {value!r}")


def ssl_context_or_none(value: object, name: str) -> ssl.SSLContext | None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"{name} must be an ssl.SSLContext, not {value!r}")
    return value


def networks(value: object, name: str) -> tuple[Network, ...]:
    return trusted_networks(value)  # type: ignore[arg-type]


# The callbacks


def check_accept_cb(cb: object, args: tuple[Any, ...] = ()) -> None:
    """Refuse an accept callback that cannot be called as it will be.

    It must be ``None`` or an async function that takes ``(listener, conn,
    addr, *args)``. Both are checked here, where the mistake is made, since
    otherwise they would fail for every connection, far from it:

    * Not async: a plain function would be called (its side effects would
      happen) and then fail, since its result cannot be awaited. A plain
      function that returns a coroutine (``lambda *a: handler(*a)``) cannot
      be told apart from one without calling it, so it is refused too (see
      docs/choices.md); ``async def`` it, or on Python 3.12+ mark it with
      :func:`inspect.markcoroutinefunction`.
    * The wrong arity (``async def handler(conn, addr)``): the signature is
      bound to the arguments it will get, with ``functools.partial``,
      methods and ``*args`` seen through. A callable whose signature cannot
      be read (a builtin, a C extension's) is taken on trust.

    Raises:
        TypeError: naming the callback and what would be right.
    """
    if cb is None:
        return
    if not callable(cb):
        raise TypeError(
            "cb must be an async function, async def cb(listener, conn, addr, "
            f"*args), or None; not {cb!r}"
        )
    if not _is_async(cb):
        raise TypeError(
            f"cb must be an async function, async def cb(listener, conn, addr, "
            f"*args), since each connection's handler is awaited; {cb!r} is "
            "not async (a plain function returning a coroutine cannot be told "
            "from one that does not: write it with async def)"
        )
    _check_arity(cb, "cb", ("listener", "conn", "addr"), args, "for each connection")


def check_error_cb(error_cb: object, args: tuple[Any, ...] = ()) -> None:
    """Refuse an error callback that is async, or cannot take its arguments.

    It is called in the accept task, synchronously, between two accepts, as
    ``error_cb(listener, error, *args)``: an async one would only make a
    coroutine that never runs, and one of the wrong arity would fail at the
    first accept error. The arity is checked as for :func:`check_accept_cb`.

    Raises:
        TypeError: naming the callback and what would be right.
    """
    if error_cb is None:
        return
    if not callable(error_cb) or _is_async(error_cb):
        raise TypeError(
            "error_cb must be a plain function, def error_cb(listener, error, "
            f"*args), called in the accept task between two accepts; not "
            f"{error_cb!r}{' (an async function)' if callable(error_cb) else ''}"
        )
    _check_arity(
        error_cb, "error_cb", ("listener", "error"), args, "after an accept() error"
    )


def check_task_fn(
    fn: object, method: str, params: tuple[str, ...], args: tuple[Any, ...]
) -> None:
    """Refuse a function :meth:`Transport.start_task` or ``hand_over`` cannot run.

    As :func:`check_accept_cb`: it must be async and take ``(*params,
    *args)``, checked where the mistake is made rather than in the task.

    Raises:
        TypeError: naming the function and what would be right.
    """
    call = ", ".join((*params, "*args"))
    if not callable(fn) or not _is_async(fn):
        raise TypeError(
            f"{method}() runs async_fn as a task, async def async_fn({call}); "
            f"{fn!r} is not an async function (a plain function returning a "
            "coroutine cannot be told from one that does not: write it with "
            "async def)"
        )
    _check_arity(fn, "async_fn", params, args, f"by {method}()")


def _is_async(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine: async functions and methods,
    ``functools.partial`` of them, and objects with an async ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn) or not callable(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)


def _check_arity(
    fn: Any, name: str, params: tuple[str, ...], args: tuple[Any, ...], when: str
) -> None:
    """Refuse ``fn`` if its signature cannot take ``(*params, *args)``."""
    try:
        # follow_wrapped=False: a decorator's wrapper is what gets called, and
        # functools.wraps copies the wrapped function's signature onto it even
        # when the wrapper takes other arguments (one that injects an argument).
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin, a C callable): trust it
    try:
        signature.bind(*params, *args)
    except TypeError as exc:
        call = ", ".join(params + (("*args",) if args else ()))
        given = f" with args={reprlib.repr(args)}" if args else ""
        label = getattr(fn, "__qualname__", None) or repr(fn)
        raise TypeError(
            f"{name} is called as {name}({call}){given} {when}, but "
            f"{label}{signature} cannot take that ({exc}); give it the "
            f"parameters ({call})"
        ) from None


# Command-line spellings of values


def float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)
