"""The TCP echo server protocol of Python's asyncio documentation, verbatim.

From https://docs.python.org/3/library/asyncio-protocol.html#tcp-echo-server
(the section "TCP Echo Server"): a protocol written for asyncio's event loop
by others, which tests/test_protocol.py runs unchanged in protocol mode.
Only this docstring, the mypy, ruff and fmt lines and the import were
added.
"""

# mypy: allow-untyped-defs
# ruff: noqa: UP032
# fmt: off

import asyncio


class EchoServerProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        peername = transport.get_extra_info('peername')
        print('Connection from {}'.format(peername))
        self.transport = transport

    def data_received(self, data):
        message = data.decode()
        print('Data received: {!r}'.format(message))

        print('Send: {!r}'.format(message))
        self.transport.write(data)

        print('Close the client socket')
        self.transport.close()
