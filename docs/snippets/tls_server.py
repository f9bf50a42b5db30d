"""The echo server over TLS: the listener runs each handshake, then the handler.

Give it a certificate (the full chain: yours, then the intermediates) and its
private key, both PEM files: ``python tls_server.py fullchain.pem privkey.pem``,
then ``openssl s_client -connect 127.0.0.1:9876`` and type.
``test_tls_server.py`` beside it tests it with certificates made on the spot.
"""

from __future__ import annotations

import ssl
import sys

import trio

from trio_evlisten import ConnListener, Flag, SocketStream, open_listener

HOST, PORT = "0.0.0.0", 9876
CERTFILE, KEYFILE = "fullchain.pem", "privkey.pem"


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server's TLS context, with Python's defaults for one, and our certificate.

    ``Purpose.CLIENT_AUTH`` is the purpose of a context that *serves*: it
    would check a client's certificate, if it asked for one (it does not).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def echo(
    listener: ConnListener, conn: trio.SSLStream[SocketStream], addr: object
) -> None:
    # The handshake is done before this runs (a client that fails it never
    # gets here); conn reads and writes plaintext.
    async for data in conn:
        await conn.send_all(data)


async def main() -> None:
    async with open_listener(
        echo,
        address=(HOST, PORT),
        flags=Flag.CLOSE_ON_FREE | Flag.REUSEABLE,
        ssl_context=server_context(CERTFILE, KEYFILE),
    ) as listener:
        print("TLS on", listener.sockname)
        await trio.sleep_forever()


if __name__ == "__main__":
    CERTFILE, KEYFILE = sys.argv[1:3]
    trio.run(main)
