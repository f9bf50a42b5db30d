"""Tests for tls_server.py: a real handshake, with certificates made on the spot.

``trustme`` (``pip install trustme``) plays a certificate authority that
exists only for the test: it issues the server a certificate for
127.0.0.1, and the client trusts that authority alone.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from tls_server import echo, server_context

from trio_evlisten import Flag, open_listener


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    """The server's context, built from files as in production."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return server_context(str(certfile), str(keyfile))


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_echoes_over_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        async with (
            open_listener(
                echo,
                address=("127.0.0.1", 0),
                flags=Flag.CLOSE_ON_FREE,
                ssl_context=server_ctx,
            ) as listener,
            await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", listener.port, ssl_context=client_ctx
            ) as client,
        ):
            await client.send_all(b"secret\n")
            assert await client.receive_some() == b"secret\n"


async def test_a_client_that_does_not_trust_us_gets_no_handler(
    server_ctx: ssl.SSLContext,
) -> None:
    # The system's trust store has never heard of the test's authority.
    with trio.fail_after(10):
        async with open_listener(
            echo,
            address=("127.0.0.1", 0),
            flags=Flag.CLOSE_ON_FREE,
            ssl_context=server_ctx,
        ) as listener:
            client = await trio.open_ssl_over_tcp_stream("127.0.0.1", listener.port)
            async with client:
                with pytest.raises(trio.BrokenResourceError):
                    await client.do_handshake()
            # The server's side of the handshake failed too: counted, and
            # the handler never ran.
            await trio.testing.wait_all_tasks_blocked()
            assert listener.statistics().tls_failures == 1
