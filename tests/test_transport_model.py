"""A Hypothesis state machine for :class:`trio_evlisten.Transport` against a model.

The transport runs over a real Unix socket pair with small kernel buffers, so
writes really do back up; an engine of the test's own serves it by hand
(``select`` with a zero timeout, then the transport's ``_read_ready`` /
``_write_ready``, then ``connection_lost`` for a lost one, outside any
callback), so every interleaving Hypothesis finds is replayable without a
scheduler. The two real engines, which only decide *when* to make those
calls, are exercised by tests/test_protocol.py.

The model says what asyncio's transport contract promises:

* the peer receives exactly what the protocol wrote, in order, a prefix of
  it at any time; all of it once ``close()`` flushed (unless ``abort()`` or a
  reset came first); then EOF;
* the protocol receives a prefix of what the peer sent, all of it unless it
  paused reading, closed, or the connection was lost;
* ``pause_writing``/``resume_writing`` alternate, starting with a pause,
  each at the right side of the water marks;
* ``eof_received`` at most once; ``connection_lost`` exactly once, last,
  never inside another callback;
* ``is_closing``/``is_reading`` and ``get_write_buffer_size`` agree with it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_evlisten._transport import READ, WRITE, Transport

pytestmark = pytest.mark.filterwarnings("error")

#: Small kernel buffers, so that a few writes fill them.
SOCKBUF = 4096


class HandEngine:
    """What a transport asks of its engine, served by the test's hand."""

    listener = None

    def __init__(self) -> None:
        self.lost: list[Transport] = []

    def set_events(self, transport: Transport, want: int) -> None:
        transport._mask = want

    def lose_soon(self, transport: Transport) -> None:
        self.lost.append(transport)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received = bytearray()
        self.lost_with: list[BaseException | None] = []
        self.in_callback = False
        self.keep_open = False
        self.transport: Any = None
        #: (buffer size, low, high) at each pause_writing/resume_writing.
        self.flow: list[tuple[str, int, int, int]] = []

    def _enter(self, name: str) -> None:
        assert not self.lost_with, f"{name} after connection_lost"
        assert not self.in_callback, f"{name} inside another callback"
        self.calls.append(name)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._enter("made")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._enter("data")
        self.received += data

    def eof_received(self) -> bool:
        self._enter("eof")
        return self.keep_open

    def pause_writing(self) -> None:
        self._enter("pause")
        self._note("pause")

    def resume_writing(self) -> None:
        self._enter("resume")
        self._note("resume")

    def _note(self, name: str) -> None:
        low, high = self.transport.get_write_buffer_limits()
        self.flow.append((name, self.transport.get_write_buffer_size(), low, high))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._enter("lost")
        self.lost_with.append(exc)


class TransportModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    @initialize(keep_open=st.booleans())
    def connect(self, keep_open: bool) -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ours, peer):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
            sock.setblocking(False)
        self.peer: socket.socket | None = peer
        self.engine = HandEngine()
        self.protocol = Recorder()
        self.protocol.keep_open = keep_open
        self.transport = Transport(self.engine, ours, None, self.protocol)  # type: ignore[arg-type]
        self.transport._update()
        self.protocol.connection_made(self.transport)
        # What the protocol wrote (the peer must get exactly this), what
        # the peer got, what the peer sent.
        self.written = bytearray()
        self.peer_got = bytearray()
        self.peer_sent = bytearray()
        self.peer_eof = False
        self.peer_shut = False
        self.aborted = False
        self.reset = False
        self.closed = False
        self.wrote_eof = False
        # Set while the protocol's pause is outstanding: the buffer size then.
        self.paused_at: int | None = None

    def teardown(self) -> None:
        try:
            if not self.protocol.lost_with:
                self.transport.close()
                for _ in range(10_000):
                    if self.protocol.lost_with:
                        break
                    self.peer_read(1 << 16)
                    self.serve()
            assert self.protocol.lost_with, "close() never ended the connection"
            if not (self.aborted or self.reset):
                unread = len(self.protocol.received) < len(self.peer_sent)
                try:
                    self.peer_read_to_eof()
                except ConnectionResetError:
                    # The kernel's rule, as for asyncio's transport: a socket
                    # closed with unread input sends RST, which may discard
                    # what the peer had not read yet.
                    assert unread
                else:
                    assert self.peer_got == self.written
        finally:
            if self.peer is not None:
                self.peer.close()
            if self.transport._sock.fileno() >= 0:
                self.transport._sock.close()

    # ------------------------------------------------------------------
    # The engine's step

    def serve(self) -> None:
        transport = self.transport
        if transport._lost is None:
            want = transport._mask
            fd = transport._sock
            readable, writable, _ = select.select(
                [fd] if want & READ else [], [fd] if want & WRITE else [], [], 0
            )
            if readable:
                transport._read_ready()
            if writable and transport._mask & WRITE:
                transport._write_ready()
        while self.engine.lost:
            lost = self.engine.lost.pop()
            exc, _error, protocol = lost._finish()
            lost._sock.close()
            protocol.connection_lost(exc)

    # ------------------------------------------------------------------
    # The protocol's calls

    def _data(self, n: int) -> bytes:
        data = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return data

    def _accepts_writes(self) -> bool:
        return not self.wrote_eof

    @rule(n=st.integers(1, 150_000))
    def write(self, n: int) -> None:
        data = self._data(n)
        if self.wrote_eof:
            with pytest.raises(RuntimeError):
                self.transport.write(data)
            return
        self.transport.write(data)
        if self.transport._lost is None and not self.protocol.lost_with:
            self.written += data

    @rule(sizes=st.lists(st.integers(0, 5_000), max_size=4))
    def writelines(self, sizes: list[int]) -> None:
        if self.wrote_eof:
            return
        chunks = [self._data(n) for n in sizes]
        self.transport.writelines(chunks)
        if self.transport._lost is None and not self.protocol.lost_with:
            self.written += b"".join(chunks)

    @rule(high=st.integers(0, 20_000))
    def limits(self, high: int) -> None:
        self.transport.set_write_buffer_limits(high)
        assert self.transport.get_write_buffer_limits() == (high // 4, high)

    @rule()
    def pause_reading(self) -> None:
        self.transport.pause_reading()
        assert not self.transport.is_reading()

    @rule()
    def resume_reading(self) -> None:
        self.transport.resume_reading()
        if not self.transport.is_closing():
            assert self.transport.is_reading()

    @precondition(lambda self: not self.closed)
    @rule()
    def write_eof(self) -> None:
        self.transport.write_eof()
        if not self.transport.is_closing():
            self.wrote_eof = True

    @rule()
    def close(self) -> None:
        self.transport.close()
        self.closed = True
        assert self.transport.is_closing()

    @precondition(lambda self: not self.protocol.lost_with)
    @rule()
    def abort(self) -> None:
        self.transport.abort()
        self.aborted = True
        assert self.transport.is_closing()

    # ------------------------------------------------------------------
    # The peer and the engine

    @rule(times=st.integers(1, 3))
    def step(self, times: int) -> None:
        for _ in range(times):
            self.checked_serve()

    def checked_serve(self) -> None:
        t = self.transport
        before = t.get_write_buffer_size()
        self.serve()
        after = t.get_write_buffer_size()
        if t._lost is None and after < before:
            # The kernel took some: the protocol was resumed if the buffer
            # fell to the low-water mark.
            paused = self.protocol.flow and self.protocol.flow[-1][0] == "pause"
            assert not (paused and after <= t.get_write_buffer_limits()[0])

    @precondition(lambda self: self.peer is not None)
    @rule()
    def peer_reads_everything(self) -> None:
        """A peer that keeps reading: the buffer drains through the kernel."""
        for _ in range(1_000):
            if self.transport.get_write_buffer_size() == 0:
                break
            self.peer_read(1 << 16)
            self.checked_serve()

    @precondition(
        lambda self: self.wrote_eof and self.peer is not None and not self.reset
    )
    @rule()
    def peer_sees_eof(self) -> None:
        """After write_eof, once the buffer is out, the peer gets all, then EOF."""
        for _ in range(10_000):
            if self.transport.get_write_buffer_size() == 0:
                break
            self.peer_read(1 << 16)
            self.serve()
        if self.transport._lost is None:
            self.peer_read_to_eof()
            assert self.peer_got == self.written

    @precondition(lambda self: self.peer is not None and not self.peer_shut)
    @rule(n=st.integers(1, 20_000))
    def peer_send(self, n: int) -> None:
        assert self.peer is not None
        data = self._data(n)
        try:
            sent = self.peer.send(data)
        except BlockingIOError:
            return
        except OSError:
            return  # our side is gone
        self.peer_sent += data[:sent]

    @precondition(lambda self: self.peer is not None)
    @rule(n=st.integers(1, 1 << 16))
    def peer_read(self, n: int) -> None:
        if self.peer is None or self.peer_eof:
            return
        try:
            data = self.peer.recv(n)
        except BlockingIOError:
            return
        except OSError:
            self.peer_eof = True
            return
        if data:
            self.peer_got += data
        else:
            self.peer_eof = True

    def peer_read_to_eof(self) -> None:
        assert self.peer is not None
        self.peer.settimeout(5)
        try:
            while not self.peer_eof:
                data = self.peer.recv(1 << 16)
                if not data:
                    self.peer_eof = True
                self.peer_got += data
        finally:
            # Later rules expect the peer as it was: never blocking.
            self.peer.setblocking(False)

    @precondition(lambda self: self.peer is not None and not self.peer_shut)
    @rule()
    def peer_half_close(self) -> None:
        assert self.peer is not None
        self.peer.shutdown(socket.SHUT_WR)
        self.peer_shut = True

    @precondition(lambda self: self.peer is not None)
    @rule()
    def peer_reset(self) -> None:
        assert self.peer is not None
        self.peer.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.peer.close()
        self.peer = None
        self.reset = True

    # ------------------------------------------------------------------
    # What must always hold

    @invariant()
    def bytes_in_order(self) -> None:
        assert self.written.startswith(self.peer_got)
        assert self.peer_sent.startswith(self.protocol.received)

    @invariant()
    def callbacks_in_order(self) -> None:
        calls = self.protocol.calls
        assert calls[0] == "made"
        assert calls.count("eof") <= 1
        assert calls.count("lost") <= 1
        if "lost" in calls:
            assert calls[-1] == "lost"
        flow = [c for c in calls if c in ("pause", "resume")]
        assert all(c == ("pause", "resume")[i % 2] for i, c in enumerate(flow))

    @invariant()
    def flow_control_at_the_marks(self) -> None:
        for name, size, low, high in self.protocol.flow:
            if name == "pause":
                assert size > high, (size, high)
            else:
                assert size <= low, (size, low)
        t = self.transport
        paused = bool(self.protocol.flow) and self.protocol.flow[-1][0] == "pause"
        if t._lost is None and not paused:
            # Never past the high-water mark without the protocol told.
            assert t.get_write_buffer_size() <= t.get_write_buffer_limits()[1]

    @invariant()
    def state_agrees(self) -> None:
        t = self.transport
        if self.closed or self.aborted or self.protocol.lost_with:
            assert t.is_closing()
            assert not t.is_reading()
        if self.protocol.lost_with:
            assert t.get_write_buffer_size() == 0
        elif t._lost is None and t.get_write_buffer_size() == 0 and self.protocol.flow:
            # Unless aborted, the buffer empties only as the kernel takes it:
            # resumed by then.
            assert self.protocol.flow[-1][0] == "resume", self.protocol.flow
        assert t.get_write_buffer_size() <= len(self.written)


TransportModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_transport_follows_the_model = TransportModel.TestCase
