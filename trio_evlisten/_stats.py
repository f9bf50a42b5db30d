"""The frozen records that :meth:`ConnListener.statistics` and ``drain`` return."""

from __future__ import annotations

from collections.abc import Mapping
from typing import final

import attrs


@final
@attrs.frozen
class ListenerStatistics:
    """A snapshot of a listener's counters, as :meth:`ConnListener.statistics` gives.

    Attributes:
        accepted: connections accepted since the listener opened.
        active: handlers running now.
        pending: connections accepted whose handler has not started: still
            in their PROXY header or TLS handshake, or waiting for a handler
            slot (``max_connections``). Always 0 without a preamble.
        errors: ``accept()`` errors reported (out-of-resources and fatal
            ones; the silently retried kind is counted in ``retried``).
        retried: ``accept()`` errors retried at once (``ECONNABORTED`` and
            friends; not ``EAGAIN``, which only means the queue is empty).
        paused_by_errors: whether accepting is paused now by error backoff.
        backoff: the pause in seconds after the last error, 0.0 after a
            success.
        handler_errors: handlers that ended by raising an ``Exception``
            other than :exc:`trio.BrokenResourceError` (a peer going away is
            not counted as the handler's error).
        tls_failures: TLS handshakes that failed or timed out (with
            ``ssl_context=``); their handlers never ran.
        proxy_rejected: connections dropped (with ``proxy_protocol=True``)
            for a peer outside ``proxy_trusted`` or a bad, truncated or slow
            PROXY header; their handlers never ran.
        enabled: as :attr:`ConnListener.enabled`.
        closed: as :attr:`ConnListener.closed`.
        max_connections: the cap on running handlers, or ``None`` (see
            :meth:`ConnListener.set_max_connections`).
        max_pending: the bound on ``pending``.
        queue_depth: connections waiting in the kernel's accept queue now
            (Linux ``TCP_INFO``'s ``tcpi_unacked`` on a listening socket);
            ``None`` for a Unix socket, on other platforms, or once closed.
        queue_limit: the accept queue's limit as the kernel applies it
            (``tcpi_sacked``); ``None`` where ``queue_depth`` is.
        backlog: the backlog in effect after the kernel's ``somaxconn`` cap
            (``queue_limit`` when known; else what ``listen()`` was given,
            capped); ``None`` for a ``sock=`` that was already listening on
            a platform without ``TCP_INFO``.
        lameduck: whether a drain's lame duck has begun (``lameduck=``):
            the agent port says ``drain``, accepting goes on.
        paused_by_load: whether accepting is paused now because the event
            loop runs later than ``max_loop_lag``.
        load_paused_seconds: seconds spent paused for load so far.
        loop_lag: the last lag measured, in seconds (``None`` without
            ``max_loop_lag``).
        paused_by_rate: whether accepting waits now for
            ``max_accept_rate``'s next token.
        pauses: how many times accepting stopped, by reason: ``"load"``
            (``max_loop_lag``), ``"rate"`` (``max_accept_rate``),
            ``"capacity"`` (``max_connections`` or ``max_pending``).
        refused: connections closed at once, by reason: ``"per client"``
            (over ``max_connections_per_client`` with the ``"refuse"``
            policy, or past the held ones with ``"hold"``), ``"client table
            full"`` (``client_table_size``).
        held: connections held over ``max_connections_per_client`` (with
            ``client_limit_policy="hold"``), counted when held.
        clients: clients counted now for ``max_connections_per_client``
            (entries in its table; 0 without it).
    """

    accepted: int
    active: int
    pending: int
    errors: int
    retried: int
    paused_by_errors: bool
    backoff: float
    handler_errors: int
    tls_failures: int
    proxy_rejected: int
    enabled: bool
    closed: bool
    max_connections: int | None
    max_pending: int
    queue_depth: int | None = None
    queue_limit: int | None = None
    backlog: int | None = None
    lameduck: bool = False
    paused_by_load: bool = False
    load_paused_seconds: float = 0.0
    loop_lag: float | None = None
    paused_by_rate: bool = False
    pauses: Mapping[str, int] = attrs.field(factory=dict)
    refused: Mapping[str, int] = attrs.field(factory=dict)
    held: int = 0
    clients: int = 0


@final
@attrs.frozen
class DrainResult:
    """What :meth:`ConnListener.drain` did with the connections it served.

    Counted over the whole drain: the handlers running when it began, and
    those it started for the connections the kernel had queued.

    Attributes:
        finished: handlers that returned by themselves within the grace
            period (a peer that went away counts here too).
        failed: handlers that raised an exception within the grace period
            (each also counted in ``statistics().handler_errors``).
        cancelled: handlers (and connections still in their PROXY header or
            TLS handshake) running when the grace period ended, which the
            drain cancelled.
    """

    finished: int
    failed: int
    cancelled: int
