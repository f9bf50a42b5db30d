"""What leaves :func:`open_listener` when its nursery raised.

Owns: lifting the handlers' errors (raised one group deeper, by the host
task's nursery) to the listener's level, letting ``KeyboardInterrupt`` and
``SystemExit`` leave bare, and giving back an exception of the block alone
as it went in. Why a spliced group rather than a cancel scope per handler:
docs/choices.md (the section on exceptions out of ``open_listener``).
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


def shape(
    group: BaseExceptionGroup[BaseException],
    handlers_group: BaseException | None,
    body_error: BaseException | None,
) -> BaseException:
    """What leaves ``open_listener`` when its nursery raised ``group``.

    * Handlers' errors come from the handler nursery's host task, one group
      deeper: they are lifted to this level, as if handlers were direct
      children of this nursery.
    * A ``KeyboardInterrupt`` or ``SystemExit`` leaves bare, wherever it was
      raised (the block, a handler, a callback), so that ``except
      KeyboardInterrupt`` around ``trio.run`` works under load too; whatever
      else failed with it is kept as its ``__cause__`` (its ``__context__``
      is taken by the exception Python is handling when it leaves), so a
      traceback still shows it.
    * The nursery is ours, not the caller's: an exception from the block
      alone comes out as it went in. Errors of the listener itself stay in
      their group.
    """
    spliced = _splice(group, handlers_group)
    exits, rest = spliced.split((KeyboardInterrupt, SystemExit))
    if exits is not None:
        if isinstance(body_error, (KeyboardInterrupt, SystemExit)):
            leaving: BaseException = body_error
        else:
            leaving = _leaves(exits)[0]
        if rest is not None:
            leaving.__cause__ = rest
        return leaving
    if body_error is not None and _is_only(spliced, body_error):
        return body_error
    if spliced is not group:
        spliced.__suppress_context__ = True
        spliced.__cause__ = group.__cause__
        return spliced.with_traceback(group.__traceback__)
    return group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _splice(
    group: BaseExceptionGroup[BaseException], inner: BaseException | None
) -> BaseExceptionGroup[BaseException]:
    """``group`` with the group ``inner`` (one of its members) opened in place.

    Trio may hand on a copy of ``inner`` (derived when it strips
    ``Cancelled``), so the member is found by its exceptions' identity.
    """
    if not isinstance(inner, BaseExceptionGroup):
        return group
    ours = {id(exc) for exc in inner.exceptions}

    def is_inner(exc: BaseException) -> bool:
        return isinstance(exc, BaseExceptionGroup) and all(
            id(e) in ours for e in exc.exceptions
        )

    if not any(is_inner(exc) for exc in group.exceptions):
        return group
    members: list[BaseException] = []
    for exc in group.exceptions:
        if is_inner(exc):
            assert isinstance(exc, BaseExceptionGroup)
            members.extend(exc.exceptions)
        else:
            members.append(exc)
    return group.derive(members)


def _is_only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether ``exc`` is the only leaf of the (possibly nested) ``group``."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner is exc
