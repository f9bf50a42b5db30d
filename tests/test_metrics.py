"""trio_evlisten.metrics: a prometheus_client collector, scraped and parsed.

Every scrape here is parsed with prometheus_client's own text parser
(``text_string_to_metric_families``), so what is checked is what Prometheus
would read.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import echo_handler, recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener
from trio_evlisten.testing import open_stream_to

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from trio_evlisten.metrics import STATES, ListenerCollector  # noqa: E402

LOCAL = ("127.0.0.1", 0)
FREE = Flag.CLOSE_ON_FREE
LABELS = {"network_transport", "server_address", "server_port"}


def scrape(*collectors: ListenerCollector) -> dict[str, Any]:
    """Register, expose as text, parse back: {family name: family}."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    found = [
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (sample, labels, found)
    v: float = found[0]
    return v


async def test_scrape_parses_with_the_conventional_names(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_echo(listener: ConnListener, conn: Any, addr: Any) -> None:
        await trio.sleep(0.3)
        await echo_handler(listener, conn, addr)

    async with open_listener(
        slow_echo, address=LOCAL, flags=FREE, max_connections=5
    ) as listener:
        collector = ListenerCollector(listener)
        clients = []
        for _ in range(3):
            async with await open_stream_to(listener) as conn:
                await conn.send_all(b"hi")
                assert await recv_exactly(conn, 2) == b"hi"
                clients.append(conn.socket.getsockname())
        holding = await open_stream_to(listener)
        await trio.testing.wait_all_tasks_blocked()
        families = scrape(collector)
        await holding.aclose()
    port = str(listener.port)
    types = {name: f.type for name, f in families.items()}
    assert types == {
        "trio_evlisten_active_connections": "gauge",
        "trio_evlisten_active_connections_limit": "gauge",
        "trio_evlisten_queued_connections": "gauge",
        "trio_evlisten_queued_connections_limit": "gauge",
        "trio_evlisten_backlog_connections": "gauge",
        "trio_evlisten_backlog_connections_limit": "gauge",
        "trio_evlisten_accept_backoff_seconds": "gauge",
        # prometheus_client exposes a state set as a gauge per state.
        "trio_evlisten_listener_state": "gauge",
        "trio_evlisten_accepted_connections": "counter",
        "trio_evlisten_rejected_connections": "counter",
        "trio_evlisten_accept_errors": "counter",
        "trio_evlisten_accept_retries": "counter",
        "trio_evlisten_handler_errors": "counter",
        "trio_evlisten_connection_duration_seconds": "histogram",
        "trio_evlisten_tls_handshake_duration_seconds": "histogram",
        "trio_evlisten_connection_queue_duration_seconds": "histogram",
    }
    ours = {"server_port": port, "network_transport": "tcp"}
    assert value(families, "trio_evlisten_accepted_connections_total", **ours) == 4
    assert value(families, "trio_evlisten_active_connections", **ours) == 1
    assert value(families, "trio_evlisten_active_connections_limit", **ours) == 5
    state = "trio_evlisten_listener_state"
    assert value(families, state, **{state: "serving"}) == 1
    assert value(families, state, **{state: "closed"}) == 0
    for reason in ("proxy_header", "tls_handshake"):
        rejected = "trio_evlisten_rejected_connections_total"
        assert value(families, rejected, reason=reason) == 0
    # Three connections of 0.3 s (the mock clock makes it exact).
    duration = "trio_evlisten_connection_duration_seconds"
    assert value(families, duration + "_count") == 3
    assert value(families, duration + "_sum") == pytest.approx(0.9)
    assert value(families, duration + "_bucket", le="0.2") == 0
    assert value(families, duration + "_bucket", le="0.5") == 3
    assert value(families, duration + "_bucket", le="+Inf") == 3
    # Labels: the conventions' attributes, bounded ones, never a client's.
    client_ports = {str(c[1]) for c in clients}
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) - {"le", "reason", family.name} <= LABELS
            assert sample.labels["server_address"] == "127.0.0.1"
            assert not client_ports & set(sample.labels.values())


async def test_tls_handshake_queue_time_and_rejections(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, ssl_context=server_ctx
        ) as listener:
            collector = ListenerCollector(listener)
            tcp = await open_stream_to(listener)
            async with trio.SSLStream(
                tcp, client_ctx, server_hostname="127.0.0.1"
            ) as tls:
                await tls.send_all(b"x")
                assert await recv_exactly(tls, 1) == b"x"
            async with await open_stream_to(listener) as plain:
                await plain.send_all(b"not a TLS client hello\r\n" * 20)
                with contextlib.suppress(trio.BrokenResourceError):
                    while await plain.receive_some():
                        pass
            # The handshake's failure is counted in the connection's task,
            # which may not have run yet.
            while listener.statistics().tls_failures < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            families = scrape(collector)
    tls_h = "trio_evlisten_tls_handshake_duration_seconds"
    assert value(families, tls_h + "_count") == 1
    assert 0 < value(families, tls_h + "_sum") < 5
    queue = "trio_evlisten_connection_queue_duration_seconds"
    assert value(families, queue + "_count") == 1
    rejected = "trio_evlisten_rejected_connections_total"
    assert value(families, rejected, reason="tls_handshake") == 1


async def test_proxy_rejection_has_its_reason() -> None:
    with trio.fail_after(10):
        async with open_listener(
            echo_handler, address=LOCAL, flags=FREE, proxy_protocol=True
        ) as listener:
            collector = ListenerCollector(listener)
            async with await open_stream_to(listener) as conn:
                await conn.send_all(b"GET / HTTP/1.0\r\n\r\n")
                # Dropped: closed, or reset (our bytes were never read).
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await conn.receive_some() == b""
            families = scrape(collector)
    rejected = "trio_evlisten_rejected_connections_total"
    assert value(families, rejected, reason="proxy_header") == 1
    assert value(families, rejected, reason="tls_handshake") == 0


async def test_state_follows_the_listener_and_worker_label(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_listener(echo_handler, address=LOCAL, flags=FREE, lameduck=5) as a,
        open_listener(echo_handler, address=LOCAL, flags=FREE) as b,
    ):
        collector = ListenerCollector(a, b, worker="3")

        def states() -> dict[str, str]:
            families = scrape(collector)
            current = {}
            for s in families["trio_evlisten_listener_state"].samples:
                assert s.labels["worker"] == "3"
                if s.value == 1:
                    current[s.labels["server_port"]] = s.labels[
                        "trio_evlisten_listener_state"
                    ]
            return current

        pa, pb = str(a.port), str(b.port)
        assert states() == {pa: "serving", pb: "serving"}
        b.disable()
        assert states() == {pa: "serving", pb: "disabled"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.drain)
            await trio.testing.wait_all_tasks_blocked()
            assert states() == {pa: "lameduck", pb: "disabled"}
        assert states() == {pa: "closed", pb: "disabled"}
        collector.remove(a)
        assert states() == {pb: "disabled"}
    assert set(STATES) >= {"serving", "lameduck", "closed", "disabled"}


async def test_unix_socket_labels(tmp_path: Any) -> None:
    path = str(tmp_path / "sock")
    async with open_listener(echo_handler, address=path, flags=FREE) as listener:
        families = scrape(ListenerCollector(listener))
    labels = families["trio_evlisten_active_connections"].samples[0].labels
    assert labels == {
        "network_transport": "unix",
        "server_address": path,
        "server_port": "",
    }


# ----------------------------------------------------------------------
# The workers: one scrape for the set, a series per worker


async def http_get(port: int, path: str) -> str:
    async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
        await conn.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := await conn.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


@pytest.mark.slow
async def test_workers_metrics_one_scrape_a_series_per_worker() -> None:
    from tests.test_workers import ask_pid, started, supervisor

    with trio.fail_after(40):
        async with supervisor(
            "--workers", "2", "--port", "0", "--metrics-port", "0",
            "tests.workers_app:pid_echo",
        ) as (proc, log):  # fmt: skip
            port, _ = await started(log, 2)
            metrics_port = next(
                int(line.rsplit(" ", 1)[1])
                for line in log.lines
                if "metrics served on port" in line
            )
            for _ in range(20):
                await ask_pid(port)
            # Each worker writes its metrics every half second: wait for
            # both to have written all 20 connections (bounded by fail_after).
            while True:
                text = await http_get(metrics_port, "/metrics")
                families = {f.name: f for f in text_string_to_metric_families(text)}
                accepted = families.get("trio_evlisten_accepted_connections")
                by_worker = {
                    s.labels["worker"]: s.value
                    for s in (accepted.samples if accepted else [])
                }
                if sum(by_worker.values()) >= 20 and len(by_worker) == 2:
                    break
                await trio.sleep(0.2)
            assert set(by_worker) == {"0", "1"}
            assert sum(by_worker.values()) == 20
            # Every family has the worker label on every series.
            for family in families.values():
                for sample in family.samples:
                    assert sample.labels["worker"] in {"0", "1"}
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
