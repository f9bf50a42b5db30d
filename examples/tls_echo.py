"""An echo server over TLS: examples/echo.py with ``ssl_context=``.

Make a certificate to try it with, run it, then poke at it from another
terminal::

    python -m trustme       # server.pem, server.key, and client.pem (its CA)
    python examples/tls_echo.py server.pem server.key        # 0.0.0.0:9876
    python examples/tls_echo.py server.pem server.key 9999   # another port
    openssl s_client -connect 127.0.0.1:9876 -CAfile client.pem

``openssl s_client`` runs the handshake, prints the certificate it got (and
"Verify return code: 0 (ok)", since ``-CAfile`` names the authority that
issued it), then sends each line you type; the server sends it back. Without
trustme (``pip install trustme``), ``openssl req -x509 -newkey rsa:2048
-nodes -keyout server.key -out server.pem -days 7 -subj /CN=localhost
-addext subjectAltName=IP:127.0.0.1`` makes a self-signed certificate, which
is then also the ``-CAfile``.

The listener runs each handshake in the connection's own task, within
``tls_handshake_timeout=`` (10 s by default); a client that fails it never
reaches the handler and is counted in ``statistics().tls_failures``. When
the handler returns, the listener says goodbye (TLS's ``close_notify``) and
closes. A bad argument prints the usage and exits with status 2; a
certificate that cannot be loaded, or a port that cannot be bound, exits
with status 1; Ctrl-C stops it quietly.

A real server would add: a certificate from a public authority for its
name (the full chain: certbot's ``fullchain.pem`` and ``privkey.pem``), a
restart when it is renewed (see examples/restart_server.py), a cap on
connections (``max_connections=``), a ``drain_timeout=`` for shutting down,
an idle timeout per connection, and ALPN (``set_alpn_protocols``) if it
speaks a protocol that negotiates it.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

import trio

import trio_evlisten
from trio_evlisten import ConnListener, Flag, SocketStream

DEFAULT_PORT = 9876


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """Python's defaults for a server (``Purpose.CLIENT_AUTH``), our certificate.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: a file is not a PEM certificate chain or its key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def echo(
    listener: ConnListener, conn: trio.SSLStream[SocketStream], addr: object
) -> None:
    """Copy all input to the output; the handshake is done before this runs."""
    async for data in conn:
        await conn.send_all(data)


def accept_error(listener: ConnListener, error: OSError) -> None:
    """Print the error and stop the server, as examples/echo.py does."""
    err = error.errno or 0
    print(
        f"Got an error {err} ({os.strerror(err)}) on the listener. Shutting down.",
        file=sys.stderr,
    )
    listener.nursery.cancel_scope.cancel()


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535, for argparse."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1 to 65535")
    return port


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (``argv`` without the program's name); exits 2 if bad."""
    parser = argparse.ArgumentParser(
        prog="tls_echo.py", description="An echo server over TLS."
    )
    parser.add_argument("certfile", help="PEM: the certificate, then its chain")
    parser.add_argument("keyfile", help="PEM: the certificate's private key")
    parser.add_argument("port", nargs="?", type=port_number, default=DEFAULT_PORT)
    return parser.parse_args(argv)


async def main(context: ssl.SSLContext, port: int) -> None:
    async with trio_evlisten.open_listener(
        echo,
        address=("0.0.0.0", port),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        error_cb=accept_error,
        ssl_context=context,
    ) as listener:
        print(f"TLS echo server listening on 0.0.0.0:{listener.port}", flush=True)
        await trio.sleep_forever()


def run(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    try:
        context = server_context(args.certfile, args.keyfile)
    except OSError as exc:  # ssl.SSLError is one too
        print(f"Couldn't load the certificate: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(main, context, args.port)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"Couldn't create listener: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
