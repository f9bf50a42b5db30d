"""proxy_protocol=True behind real proxies: HAProxy (v1 and v2) and nginx (v1).

Each test writes a config for loopback only, starts the proxy in the
foreground, and checks that the handler sees the client's own address (a
client bound to 127.0.0.5, or ::1), not the proxy's. The configs are the ones
docs/deploying.md shows. Skipped only where the proxy is not installed (CI
installs the Debian packages haproxy, nginx and libnginx-mod-stream).

The last test is the fleet's: two echo servers started with the command line
behind HAProxy with agent checks, continuous clients, SIGTERM to one server:
HAProxy shows it drained during its lame duck, and not one client fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.conftest import recv_exactly
from trio_evlisten import ConnListener, Flag, open_listener

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.slow
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HAPROXY = shutil.which("haproxy", path=SBIN_PATH)
NGINX = shutil.which("nginx", path=SBIN_PATH)
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"

HAPROXY_CFG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend text
    bind 127.0.0.1:{v1_port}
    bind ipv6@::1:{v1_port}
    default_backend app_v1

frontend binary
    bind 127.0.0.1:{v2_port}
    bind ipv6@::1:{v2_port}
    default_backend app_v2

backend app_v1
    server app 127.0.0.1:{app_port} send-proxy

backend app_v2
    server app 127.0.0.1:{app_port} send-proxy-v2
"""

NGINX_CFG = """\
load_module {stream_module};
daemon off;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{
    worker_connections 64;
}}
stream {{
    server {{
        listen 127.0.0.1:{port};
        listen [::1]:{port};
        proxy_pass 127.0.0.1:{app_port};
        proxy_protocol on;
        proxy_half_close on;
    }}
}}
"""

Seen = tuple[Any, bytes]


def free_port() -> int:
    """A port free on both 127.0.0.1 and ::1 (the proxy binds both)."""
    for _ in range(50):
        with socket.socket() as s4:
            s4.bind(("127.0.0.1", 0))
            port: int = s4.getsockname()[1]
            with socket.socket(socket.AF_INET6) as s6:
                try:
                    s6.bind(("::1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


@asynccontextmanager
async def app() -> AsyncIterator[tuple[ConnListener, trio.MemoryReceiveChannel[Seen]]]:
    """Our server: reports (addr, bytes until EOF) and echoes them."""
    send, receive = trio.open_memory_channel[Seen](100)

    async def handler(
        listener: ConnListener, conn: trio.SocketStream, addr: Any
    ) -> None:
        data = b""
        async for chunk in conn:
            data += chunk
        await send.send((addr, data))
        await conn.send_all(data)

    async with open_listener(
        handler, address=("127.0.0.1", 0), flags=Flag.CLOSE_ON_FREE, proxy_protocol=True
    ) as listener:
        yield listener, receive


@asynccontextmanager
async def running(cmd: list[str], ports: list[int]) -> AsyncIterator[None]:
    """Run ``cmd`` until the block ends; first wait until it accepts on ``ports``."""
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        for port in ports:
            for _ in range(250):  # another process: a bounded poll
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    assert proc.poll() is None, await proc.stderr.receive_some()
                    await trio.sleep(0.02)
                else:
                    await probe.aclose()
                    break
            else:
                raise AssertionError(f"{cmd[0]} never listened on {port}")
        yield
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            await proc.wait()
            await proc.stderr.aclose()


async def through(
    port: int, family: int, source: str, payload: bytes
) -> tuple[Any, bytes]:
    """Connect from ``source`` to the proxy, send, EOF; return (our sockname, echo)."""
    sock = trio.socket.socket(family)
    with sock:
        await sock.bind((source, 0))
        dest = "127.0.0.1" if family == socket.AF_INET else "::1"
        await sock.connect((dest, port))
        stream = trio.SocketStream(sock)
        await stream.send_all(payload)
        await stream.send_eof()
        echo = await recv_exactly(stream, len(payload))
        return sock.getsockname(), echo


async def seen_with(seen: trio.MemoryReceiveChannel[Seen], payload: bytes) -> Any:
    """The address the handler saw for the connection that sent ``payload``.

    The readiness probes are connections too (with no payload): skip them.
    """
    async for addr, data in seen:
        if data == payload:
            return addr
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
async def test_behind_haproxy_send_proxy_v1_and_v2(tmp_path: Path) -> None:
    assert HAPROXY is not None
    with trio.fail_after(30):
        async with app() as (listener, seen):
            v1_port, v2_port = free_port(), free_port()
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(
                HAPROXY_CFG.format(
                    v1_port=v1_port, v2_port=v2_port, app_port=listener.port
                )
            )
            check = await trio.run_process(
                [HAPROXY, "-c", "-f", str(cfg)], capture_stdout=True, check=False
            )
            assert check.returncode == 0, check.stdout
            async with running([HAPROXY, "-db", "-f", str(cfg)], [v1_port, v2_port]):
                for port in (v1_port, v2_port):
                    payload = f"via {port} from 127.0.0.5".encode()
                    client, echo = await through(
                        port, socket.AF_INET, "127.0.0.5", payload
                    )
                    assert echo == payload
                    assert await seen_with(seen, payload) == client
                    assert client[0] == "127.0.0.5"

                    payload = f"via {port} from ::1".encode()
                    client, echo = await through(port, socket.AF_INET6, "::1", payload)
                    assert echo == payload
                    assert await seen_with(seen, payload) == client
            assert listener.statistics().proxy_rejected == 0


@pytest.mark.skipif(
    NGINX is None or not os.path.exists(NGINX_STREAM),
    reason="nginx with its stream module is not installed "
    "(Debian: nginx libnginx-mod-stream)",
)
async def test_behind_nginx_stream_proxy_protocol(tmp_path: Path) -> None:
    assert NGINX is not None
    with trio.fail_after(30):
        async with app() as (listener, seen):
            port = free_port()
            cfg = tmp_path / "nginx.conf"
            cfg.write_text(
                NGINX_CFG.format(
                    stream_module=NGINX_STREAM,
                    dir=tmp_path,
                    port=port,
                    app_port=listener.port,
                )
            )
            cmd = [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(cfg)]
            async with running(cmd, [port]):
                payload = b"through nginx from 127.0.0.5"
                client, echo = await through(port, socket.AF_INET, "127.0.0.5", payload)
                assert echo == payload
                assert await seen_with(seen, payload) == client
                assert client[0] == "127.0.0.5"

                payload = b"through nginx from ::1"
                client, echo = await through(port, socket.AF_INET6, "::1", payload)
                assert echo == payload
                assert await seen_with(seen, payload) == client
            assert listener.statistics().proxy_rejected == 0


# ----------------------------------------------------------------------
# Draining behind HAProxy: agent check and lame duck

AGENT_CFG = """\
global
    maxconn 1000
    stats socket {dir}/stats.sock mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend app
    bind 127.0.0.1:{front}
    default_backend echo

backend echo
    balance roundrobin
    server a 127.0.0.1:{a} send-proxy-v2 check inter 2s check-send-proxy \
agent-check agent-port {a_agent} agent-inter 200ms
    server b 127.0.0.1:{b} send-proxy-v2 check inter 2s check-send-proxy \
agent-check agent-port {b_agent} agent-inter 200ms
"""


@asynccontextmanager
async def echo_server(
    port: int, agent_port: int, *extra: str
) -> AsyncIterator[trio.Process]:
    """``python -m trio_evlisten echo`` with an agent port; yields once listening."""
    cmd = [
        sys.executable, "-m", "trio_evlisten", "echo",
        "--host", "127.0.0.1", "--port", str(port),
        "--agent-port", str(agent_port), "--proxy-protocol", *extra,
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        out = b""
        while b"listening on" not in out:
            chunk = await proc.stdout.receive_some()
            assert chunk, (out, await proc.stderr.receive_some())
            out += chunk
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.stdout.aclose()
            await proc.stderr.aclose()


async def show_stat(sock_path: str) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat``, the backend ``echo``'s servers by name."""
    async with await trio.open_unix_socket(sock_path) as stats:
        await stats.send_all(b"show stat\n")
        text = b""
        while chunk := await stats.receive_some():
            text += chunk
    header, *rows = text.decode().lstrip("# ").splitlines()
    names = header.split(",")
    table = [dict(zip(names, row.split(","), strict=False)) for row in rows if row]
    return {r["svname"]: r for r in table if r["pxname"] == "echo"}


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
async def test_sigterm_drains_one_server_behind_haproxy_without_a_failure(
    tmp_path: Path,
) -> None:
    assert HAPROXY is not None
    front, a, b, a_agent, b_agent = (free_port() for _ in range(5))
    cfg = tmp_path / "haproxy.cfg"
    stats = str(tmp_path / "stats.sock")
    cfg.write_text(
        AGENT_CFG.format(
            dir=tmp_path, front=front, a=a, b=b, a_agent=a_agent, b_agent=b_agent
        )
    )
    served = 0
    failures: list[BaseException] = []

    async def client(stop: trio.Event) -> None:
        nonlocal served
        n = 0
        while not stop.is_set():
            line = f"client line {n}\n".encode()
            n += 1
            try:
                async with await trio.open_tcp_stream("127.0.0.1", front) as conn:
                    await conn.send_all(line)
                    echo = await recv_exactly(conn, len(line))
                assert echo == line, echo
            except (OSError, trio.BrokenResourceError, AssertionError) as exc:
                failures.append(exc)
            else:
                served += 1

    with trio.fail_after(40):
        async with (
            echo_server(a, a_agent, "--lameduck", "5", "--drain-timeout", "2") as pa,
            echo_server(b, b_agent),
            running([HAPROXY, "-db", "-f", str(cfg)], [front]),
        ):
            # Both servers up, with the weight their agents gave.
            while True:
                servers = await show_stat(stats)
                if all(servers[s]["status"] == "UP" for s in "ab"):
                    break
                await trio.sleep(0.05)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(client, stop)
                await trio.sleep(0.5)
                before = int((await show_stat(stats))["a"]["stot"])
                assert before > 0
                served_before = served
                pa.send_signal(signal.SIGTERM)
                seen: list[tuple[str, str]] = []
                while pa.poll() is None:
                    a_row = (await show_stat(stats))["a"]
                    seen.append((a_row["status"], a_row["weight"]))
                    await trio.sleep(0.05)
                assert pa.returncode == 0
                # b serves on after a is gone.
                served_at_exit = served
                await trio.sleep(0.5)
                stop.set()
            after = await show_stat(stats)
    # a was drained (status DRAIN, weight 0) while it still ran: its lame duck.
    drained = [s.startswith("DRAIN") or w == "0" for s, w in seen]
    assert any(drained), seen
    print("a's status every 50 ms from SIGTERM to exit:", seen)
    assert failures == []
    assert served_before > 0
    assert served > served_at_exit
    assert int(after["b"]["stot"]) > 0
