"""Durations recorded in a connection's life, for :mod:`trio_evlisten.metrics`.

Owns: the histograms (fixed buckets, a count per bucket and a sum) of how
long connections lasted, how long TLS handshakes took, and how long
connections waited between ``accept()`` and their handler's start. A
listener records them only once a recorder is attached
(:func:`._listener.record_connections`, which the metrics collector calls):
until then the connection's path pays one ``is None`` test.

Recording is a clock read and a bucket increment, on the listener's Trio
thread. Reading (:meth:`Histogram.snapshot`) may happen on another thread (a
metrics server's); it copies the counts, so a scrape's buckets agree with its
count even while connections end meanwhile (the sum may lead them by the
connections that ended during the copy).
"""

from __future__ import annotations

import bisect
from typing import Final

import attrs

#: OpenTelemetry's advice for ``kestrel.connection.duration`` (seconds).
CONNECTION_BUCKETS: Final = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: OpenTelemetry's advice for ``kestrel.tls_handshake.duration`` (seconds),
#: also used for the wait between accept and the handler's start.
SHORT_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


@attrs.define(eq=False)
class Histogram:
    """Counts of observations per bucket (``le`` bounds, then ``+Inf``) and a sum."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    total: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound counts in that bound's
        # bucket, as Prometheus's "le" (less than or equal) says.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative counts per bucket (the last, ``+Inf``, is the count); the sum."""
        counts = list(self.counts)
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return cumulative, self.total


@attrs.define(eq=False)
class ConnectionRecorder:
    """The histograms one listener records into."""

    #: From the connection's task start (just after ``accept()``) to its close.
    connection: Histogram = attrs.field(factory=lambda: Histogram(CONNECTION_BUCKETS))
    #: Successful TLS handshakes (failures are counted in ``tls_failures``).
    tls_handshake: Histogram = attrs.field(factory=lambda: Histogram(SHORT_BUCKETS))
    #: From ``accept()`` to the handler's start, for connections with a
    #: preamble (PROXY header, TLS handshake, the wait for a slot).
    queued: Histogram = attrs.field(factory=lambda: Histogram(SHORT_BUCKETS))
