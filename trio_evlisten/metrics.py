"""Prometheus metrics for listeners: a ``prometheus_client`` collector.

Needs the extra: ``pip install 'trio_evlisten[prometheus]'``. Register a
:class:`ListenerCollector` and serve the registry however you serve metrics::

    from prometheus_client import REGISTRY, start_http_server
    from trio_evlisten.metrics import ListenerCollector

    async with open_listener(handler, address=("", 8000)) as listener:
        REGISTRY.register(ListenerCollector(listener))
        start_http_server(9100)  # a thread; any exposition will do
        ...

The names are OpenTelemetry's semantic conventions for server connections
(Kestrel's ``kestrel.active_connections``, ``queued_connections``,
``rejected_connections``, ``connection.duration``,
``tls_handshake.duration``) under this library's prefix, in Prometheus's
form: ``trio_evlisten_`` and the name with ``.`` as ``_``, counters ending in
``_total``, base units (seconds), a current value and its limit side by side
as two gauges (``..._connections`` and ``..._connections_limit``, as
HAProxy's exporter pairs ``current_sessions`` and ``limit_sessions``), and
durations as histograms. Every series carries OpenTelemetry's attributes
``network_transport`` (``tcp`` or ``unix``), ``server_address`` and
``server_port`` (``""`` for a Unix socket), and ``worker`` when the
collector was given one; never a client's address. The table in
docs/deploying.md lists each metric with the :meth:`ConnListener.statistics`
field it comes from.

Making the collector attaches a recorder to each listener, so from then on
each connection's end costs a clock read and a bucket increment (before, it
costs nothing). ``collect()`` may run on any thread (a metrics server's): it
reads :meth:`ConnListener.statistics` and copies the histograms.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ._listener import ConnListener, record_connections

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from ._recorder import ConnectionRecorder, Histogram
    from ._stats import ListenerStatistics

__all__ = [
    "PREFIX",
    "STATES",
    "ListenerCollector",
    "WorkerSetCollector",
    "write_worker_metrics",
]

PREFIX: Final = "trio_evlisten_"
#: The values of ``trio_evlisten_listener_state``'s ``state`` label.
STATES: Final = ("serving", "paused", "disabled", "lameduck", "draining", "closed")
#: The values of ``trio_evlisten_rejected_connections_total``'s ``reason``.
REASONS: Final = ("proxy_header", "tls_handshake")


def listener_state(stats: ListenerStatistics, draining: bool) -> str:
    """The one :data:`STATES` value a listener is in, the most final first."""
    if stats.closed:
        return "closed"
    if draining:
        return "draining"
    if stats.lameduck:
        return "lameduck"
    if not stats.enabled:
        return "disabled"
    if stats.paused_by_errors:
        return "paused"
    return "serving"


class ListenerCollector(Collector):
    """Collects the metrics of one or more listeners (see the module).

    Args:
        *listeners: the listeners, each told to record durations from now.
        worker: the ``worker`` label of every series (for a process among
            several serving one port), or ``None`` for no such label.

    Error handling:
        A listener that closed keeps being reported (state ``closed``, its
        final counts) until :meth:`remove`.
    """

    def __init__(self, *listeners: ConnListener, worker: str | None = None) -> None:
        self._worker = worker
        self._listeners: dict[ConnListener, ConnectionRecorder] = {}
        for listener in listeners:
            self.add(listener)

    def add(self, listener: ConnListener) -> None:
        """Collect ``listener`` too (it records durations from now on)."""
        self._listeners[listener] = record_connections(listener)

    def remove(self, listener: ConnListener) -> None:
        """Stop collecting ``listener`` (its series disappear)."""
        self._listeners.pop(listener, None)

    def _labels(self, listener: ConnListener) -> list[str]:
        sockname = listener.sockname
        if isinstance(sockname, tuple):
            values = ["tcp", str(sockname[0]), str(sockname[1])]
        else:
            path = sockname.decode() if isinstance(sockname, bytes) else sockname
            values = ["unix", str(path), ""]
        if self._worker is not None:
            values.append(self._worker)
        return values

    def collect(self) -> Iterator[Metric]:
        names = ["network_transport", "server_address", "server_port"]
        if self._worker is not None:
            names.append("worker")

        def gauge(name: str, doc: str, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=names, unit=unit)

        def counter(
            name: str, doc: str, extra: Iterable[str] = ()
        ) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=[*names, *extra])

        def histogram(name: str, doc: str) -> HistogramMetricFamily:
            return HistogramMetricFamily(
                PREFIX + name, doc, labels=names, unit="seconds"
            )

        active = gauge("active_connections", "Handlers running now.")
        active_limit = gauge(
            "active_connections_limit",
            "max_connections: the cap on running handlers (+Inf: none).",
        )
        queued = gauge(
            "queued_connections",
            "Connections accepted whose handler has not started (PROXY header, "
            "TLS handshake, waiting for a slot).",
        )
        queued_limit = gauge(
            "queued_connections_limit", "max_pending: the bound on queued."
        )
        backlog = gauge(
            "backlog_connections",
            "Connections waiting in the kernel's accept queue (Linux TCP only).",
        )
        backlog_limit = gauge(
            "backlog_connections_limit", "The kernel's limit on that queue."
        )
        backoff = gauge(
            "accept_backoff",
            "The pause after the last accept() error (0 after a success).",
            unit="seconds",
        )
        state = StateSetMetricFamily(
            PREFIX + "listener_state",
            "The listener's state: serving, paused (after an accept error), "
            "disabled, lameduck, draining, closed.",
            labels=names,
        )
        accepted = counter("accepted_connections", "Connections accepted.")
        rejected = counter(
            "rejected_connections",
            "Connections dropped before their handler: a refused PROXY header "
            "(reason proxy_header) or a failed TLS handshake (tls_handshake).",
            ["reason"],
        )
        errors = counter(
            "accept_errors",
            "accept() errors reported (out of resources, or fatal).",
        )
        retries = counter(
            "accept_retries", "accept() errors retried at once (ECONNABORTED...)."
        )
        handler_errors = counter(
            "handler_errors", "Handlers that raised an exception (not a peer gone)."
        )
        duration = histogram(
            "connection_duration",
            "From the connection's task start (just after accept) to its close, "
            "for connections that reached their handler.",
        )
        tls = histogram(
            "tls_handshake_duration", "Successful TLS handshakes (ssl_context=)."
        )
        queue_time = histogram(
            "connection_queue_duration",
            "From accept to the handler's start (PROXY header, TLS handshake, a "
            "wait for a max_connections slot); only with a preamble.",
        )
        for listener, recorder in list(self._listeners.items()):
            labels = self._labels(listener)
            stats = listener.statistics()
            cap = stats.max_connections
            active.add_metric(labels, stats.active)
            active_limit.add_metric(labels, math.inf if cap is None else cap)
            queued.add_metric(labels, stats.pending)
            queued_limit.add_metric(labels, stats.max_pending)
            if stats.queue_depth is not None:
                backlog.add_metric(labels, stats.queue_depth)
            limit = (
                stats.queue_limit if stats.queue_limit is not None else stats.backlog
            )
            if limit is not None:
                backlog_limit.add_metric(labels, limit)
            backoff.add_metric(labels, stats.backoff)
            now = listener_state(stats, listener.draining)
            state.add_metric(labels, {name: name == now for name in STATES})
            accepted.add_metric(labels, stats.accepted)
            rejected.add_metric([*labels, "proxy_header"], stats.proxy_rejected)
            rejected.add_metric([*labels, "tls_handshake"], stats.tls_failures)
            errors.add_metric(labels, stats.errors)
            retries.add_metric(labels, stats.retried)
            handler_errors.add_metric(labels, stats.handler_errors)
            _observe(duration, labels, recorder.connection)
            _observe(tls, labels, recorder.tls_handshake)
            _observe(queue_time, labels, recorder.queued)
        yield from (
            active, active_limit, queued, queued_limit, backlog, backlog_limit,
            backoff, state, accepted, rejected, errors, retries, handler_errors,
            duration, tls, queue_time,
        )  # fmt: skip


def _observe(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    cumulative, total = h.snapshot()
    bounds = [*(_le(b) for b in h.bounds), "+Inf"]
    family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), total)


def _le(bound: float) -> str:
    # prometheus_client's own formatting of a bucket bound ("0.01", "1.0").
    return repr(float(bound))


# ----------------------------------------------------------------------
# The workers: one scrape for the set

#: How often a worker writes its metrics for the supervisor to serve.
WORKER_WRITE_INTERVAL: Final = 0.5


async def write_worker_metrics(
    listener: ConnListener, path: str, interval: float = WORKER_WRITE_INTERVAL
) -> None:
    """Write ``listener``'s metrics to ``path`` every ``interval`` s, until cancelled.

    A worker's half of :class:`WorkerSetCollector`: the text exposition,
    replaced atomically (written beside it, then renamed), so a reader never
    sees half a file.

    Resource handling:
        The file is removed when this ends.
    """
    registry = CollectorRegistry()
    registry.register(ListenerCollector(listener))
    try:
        while True:
            text = generate_latest(registry)
            with open(path + ".tmp", "wb") as f:  # noqa: ASYNC230 (a local file)
                f.write(text)
            os.replace(path + ".tmp", path)
            await trio.sleep(interval)
    finally:
        for name in (path, path + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


class WorkerSetCollector(Collector):
    """The workers' metrics as one scrape, each series labelled ``worker``.

    Reads the files the workers write (:func:`write_worker_metrics`, one per
    pid in ``directory``) and labels each series with the worker's slot (0
    to N-1, stable across restarts, so the series count stays bounded; a
    restarted worker's counters start again at 0, which Prometheus's
    ``rate()`` takes as a counter reset). ``pids()`` maps each slot to the
    pid running in it now; the files of other pids are ignored. The values
    are at most :data:`WORKER_WRITE_INTERVAL` old.
    """

    def __init__(self, directory: str, pids: Callable[[], Mapping[int, int]]) -> None:
        self._directory = directory
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for slot, pid in sorted(self._pids().items()):
            try:
                with open(os.path.join(self._directory, f"{pid}.prom")) as f:
                    text = f.read()
            except FileNotFoundError:
                continue  # starting: not written yet
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples += [
                    s._replace(labels={**s.labels, "worker": str(slot)})
                    for s in family.samples
                ]
        yield from merged.values()
