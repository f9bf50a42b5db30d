"""A client process for the burst and soak tests: many non-blocking connects.

Run as ``python _clients.py PORT N DEADLINE INFLIGHT HOLD SOURCE``. It opens
``N`` non-blocking connections from ``SOURCE`` (a loopback address) to
``127.0.0.1:PORT``, at most ``INFLIGHT`` connects
pending at once (``0``: all at once, a burst), sends each its own 8-byte tag,
and reads it back. Everything ends at ``DEADLINE`` seconds: connections not
done by then are counted and closed. With ``HOLD=1`` it then prints one JSON
line and keeps every connection open until a line arrives on stdin, so the
server can be measured while it holds them; finally it closes everything and
prints a JSON summary.

Each run may pick a fresh source address in 127.0.0.0/8: the ephemeral ports
of one address can be used up by earlier tests' connections in TIME_WAIT,
which slows ``connect()`` down to a crawl.

Only selectors and non-blocking sockets: no Trio here, so the process is a
plain, independent client.
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import sys
import time

TAG_LEN = 8
#: Linux's value; not in every Python's socket module.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def tag(i: int) -> bytes:
    return b"%07d\n" % i


class Client:
    __slots__ = ("connected", "got", "i", "sock")

    def __init__(self, i: int, sock: socket.socket) -> None:
        self.i = i
        self.sock = sock
        self.got = b""
        self.connected = False


def main() -> None:
    port, n, deadline_s, inflight, hold, source = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        float(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5] == "1",
        sys.argv[6],
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    start = time.monotonic()
    deadline = start + deadline_s
    sel = selectors.DefaultSelector()
    counts = {"echoed": 0, "mismatched": 0, "refused": 0, "reset": 0, "other": 0}
    done: list[Client] = []
    pending = 0
    next_i = 0

    def launch() -> None:
        nonlocal pending, next_i
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Pick the port at connect() time, by the whole 4-tuple.
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        rc = sock.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            counts["other"] += 1
            sock.close()
            next_i += 1
            return
        client = Client(next_i, sock)
        sel.register(sock, selectors.EVENT_WRITE, client)
        pending += 1
        next_i += 1

    def drop(client: Client, kind: str) -> None:
        nonlocal pending
        counts[kind] += 1
        sel.unregister(client.sock)
        client.sock.close()
        pending -= 1

    while (next_i < n or pending) and time.monotonic() < deadline:
        while next_i < n and (inflight == 0 or pending < inflight):
            launch()
        for key, _events in sel.select(timeout=0.05):
            client: Client = key.data
            sock = client.sock
            if not client.connected:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(client, "refused" if err == errno.ECONNREFUSED else "other")
                    continue
                client.connected = True
                sock.send(tag(client.i))  # 8 bytes always fit an empty buffer
                sel.modify(sock, selectors.EVENT_READ, client)
                continue
            try:
                data = sock.recv(TAG_LEN - len(client.got))
            except ConnectionResetError:
                drop(client, "reset")
                continue
            if not data:
                drop(client, "reset")
                continue
            client.got += data
            if len(client.got) == TAG_LEN:
                ok = client.got == tag(client.i)
                sel.unregister(sock)
                pending -= 1
                if ok:
                    counts["echoed"] += 1
                    done.append(client)
                else:
                    counts["mismatched"] += 1
                    sock.close()
    elapsed = time.monotonic() - start
    timed_out = pending
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    if hold:
        print(json.dumps({"held": len(done), "elapsed": elapsed}), flush=True)
        sys.stdin.readline()
    for client in done:
        client.sock.close()
    print(
        json.dumps(
            {
                **counts,
                "timed_out": timed_out,
                "launched": next_i,
                "elapsed": elapsed,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
