"""Every code snippet in the docs runs, and does what the page says.

The Python in docs/ lives in docs/snippets/*.py, included into the pages with
``literalinclude``. Server snippets define ``HOST``, ``PORT`` and
``async def main()`` that serves until cancelled: the tests load the module,
point it at 127.0.0.1 port 0, run ``main`` in a nursery, learn the listener
it opened (``open_listener`` is wrapped to report it), talk to it as a
client, and cancel. The other snippets are self-contained programs whose
``main()`` returns what they found, checked here.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import math
import re
import socket
import ssl
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import trustme

import trio_evlisten
import trio_evlisten._open
from tests.conftest import LineReader, recv_exactly
from trio_evlisten import ConnListener, Flag
from trio_evlisten.testing import open_stream_to

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextlib import AbstractAsyncContextManager
    from types import ModuleType

DOCS = Path(__file__).resolve().parent.parent / "docs"
SNIPPETS = DOCS / "snippets"
REAL_OPEN_LISTENER = trio_evlisten.open_listener


# ---------------------------------------------------------------------------
# Reading the pages


def pages() -> list[Path]:
    """Every source page of the docs (what Sphinx reads)."""
    skip = {"_build", "_inv", "snippets"}
    return sorted(
        p
        for p in DOCS.rglob("*")
        if p.suffix in {".rst", ".md"} and not skip & set(p.relative_to(DOCS).parts)
    )


_INCLUDE_RST = re.compile(r"^\s*\.\.\s+literalinclude::\s*(\S+)", re.MULTILINE)
_INCLUDE_MYST = re.compile(r"^\s*(?:```+|:::+)\{literalinclude\}\s*(\S+)", re.MULTILINE)
_PY = r"(?:python3?|py|pycon|ipython3?)"
_INLINE_RST = re.compile(
    rf"^(?P<indent>[ \t]*)\.\.\s+(?:code-block|code|sourcecode)::\s*{_PY}\s*\n"
    r"(?P<body>(?:(?:[ \t]*\n)|(?:(?P=indent)[ \t]+.*\n?))*)",
    re.MULTILINE,
)
_MYST_DIRECTIVE = r"(?:\{(?:code-block|code|sourcecode)\}[ \t]*)?"
_INLINE_MYST = re.compile(
    rf"^(?P<fence>```+|~~~+)[ \t]*{_MYST_DIRECTIVE}{_PY}[ \t]*\n"
    r"(?P<body>(?:.*\n)*?)(?P=fence)[ \t]*$",
    re.MULTILINE,
)
_DOCTEST_RST = re.compile(r"^[ \t]*>>> ", re.MULTILINE)


def included_files(page: Path) -> set[Path]:
    text = page.read_text()
    found = _INCLUDE_RST.findall(text) + _INCLUDE_MYST.findall(text)
    return {
        (DOCS / name.lstrip("/")) if name.startswith("/") else (page.parent / name)
        for name in found
    }


def inline_python_blocks(text: str, suffix: str) -> list[str]:
    """The Python code blocks written out in a page (not included from a file)."""
    if suffix == ".rst":
        blocks = []
        for match in _INLINE_RST.finditer(text):
            lines = match["body"].splitlines()
            # Skip the directive's options (":linenos:", ...), then dedent.
            while lines and (not lines[0].strip() or lines[0].strip().startswith(":")):
                lines.pop(0)
            body = "\n".join(lines)
            indent = min(
                (len(line) - len(line.lstrip()) for line in lines if line.strip()),
                default=0,
            )
            blocks.append("\n".join(line[indent:] for line in body.splitlines()))
        return blocks
    return [match["body"] for match in _INLINE_MYST.finditer(text)]


def test_the_block_finders_find_blocks() -> None:
    # The coverage tests below rely on these finders; check them on samples,
    # so a finder that silently finds nothing fails here.
    rst = (
        "Text\n\n.. code-block:: python\n   :linenos:\n\n   x = 1\n   y = 2\n\n"
        "After.\n\n.. literalinclude:: snippets/a.py\n   :language: python\n"
    )
    assert inline_python_blocks(rst, ".rst") == ["x = 1\ny = 2"]
    md = "# T\n\n```python\nprint(1)\n```\n\n```{literalinclude} snippets/b.py\n```\n"
    assert inline_python_blocks(md, ".md") == ["print(1)\n"]
    assert _INCLUDE_RST.findall(rst) == ["snippets/a.py"]
    assert _INCLUDE_MYST.findall(md) == ["snippets/b.py"]


def test_pages_are_found() -> None:
    names = {p.name for p in pages()}
    expected = {"index.rst", "tutorial.rst", "reference.rst", "errors.rst"}
    assert expected | {"libevent.rst", "choices.md", "contract.md"} <= names


_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
_RST_LINK = re.compile(r"`[^`<]*<([^>`]+)>`_")


def test_every_relative_link_stays_in_the_repository_and_resolves() -> None:
    # A link out of the checkout (the contract once lived in ../shared/) is
    # dead in a clone; so is one to a file that does not exist.
    for page in [DOCS.parent / "README.md", *pages()]:
        text = page.read_text()
        links = _MD_LINK.findall(text) + _RST_LINK.findall(text)
        for link in links:
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue  # a URL, or an anchor in the page itself
            target = (page.parent / link.split("#")[0]).resolve()
            assert DOCS.parent.resolve() in target.parents, (page.name, link)
            assert target.exists(), (page.name, link)
        assert "DESIGN.md" not in text, page.name


def test_the_contract_is_a_page_of_the_docs() -> None:
    index = (DOCS / "index.rst").read_text()
    toctree = index[index.index(".. toctree::") :]
    assert re.search(r"^   contract$", toctree, re.MULTILINE)
    readme = (DOCS.parent / "README.md").read_text()
    assert "(docs/contract.md)" in readme
    contract = (DOCS / "contract.md").read_text()
    for name in ("open_listener", "serve_listener", "ConnListener", "Flag"):
        assert f"`{name}" in contract, name


def test_every_snippet_is_on_a_page_and_every_include_exists() -> None:
    included: set[Path] = set()
    for page in pages():
        included |= {p.resolve() for p in included_files(page)}
    snippet_files = {p.resolve() for p in SNIPPETS.glob("*.py")}
    assert snippet_files, "no snippets found"
    assert not snippet_files - included, "snippets on no page"
    missing = {p for p in included if not p.is_file()}
    assert not missing, f"pages include files that do not exist: {missing}"
    not_tested = {p.stem for p in included if p.suffix == ".py"} - TESTED_SNIPPETS
    assert not not_tested, f"snippets with no test in this file: {not_tested}"


def test_every_inline_python_block_runs() -> None:
    # The docs keep their Python in snippets/; a block written out in a page
    # (another helper's, say) must at least run to completion on its own.
    blocks = [
        (page, block)
        for page in pages()
        for block in inline_python_blocks(page.read_text(), page.suffix)
    ]
    for page, block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=DOCS.parent,
        )
        assert result.returncode == 0, (
            f"a Python block in {page.name} failed:\n{block}\n{result.stderr}"
        )
    for page in pages():
        if page.suffix == ".rst":
            assert not _DOCTEST_RST.search(page.read_text()), (
                f"{page.name} has a '>>>' doctest block, which nothing runs; "
                "put the code in docs/snippets/ instead"
            )


def test_the_reference_documents_every_public_name() -> None:
    reference = (DOCS / "reference.rst").read_text()
    for name in trio_evlisten.__all__:
        if name != "__version__":
            assert re.search(rf"\b{re.escape(name)}\b", reference), name
    for name in ("ScriptedSocket", "open_stream_to"):
        assert name in trio_evlisten.testing.__all__
    assert ".. automodule:: trio_evlisten.testing" in reference


def test_the_libevent_page_maps_every_function_and_flag() -> None:
    page = (DOCS / "libevent.rst").read_text()
    functions = [
        "evconnlistener_new",
        "evconnlistener_new_bind",
        "evconnlistener_free",
        "evconnlistener_enable",
        "evconnlistener_disable",
        "evconnlistener_set_cb",
        "evconnlistener_get_fd",
        "evconnlistener_get_base",
        "evconnlistener_set_error_cb",
    ]
    for function in functions:
        assert f"``{function}(" in page, function
    for flag in Flag:
        assert f"``LEV_OPT_{flag.name}``" in page, flag
        assert f"``Flag.{flag.name}``" in page, flag
    tutorial = (DOCS / "tutorial.rst").read_text()
    for flag in Flag:
        assert f"``{flag.name}``" in tutorial, flag


def test_the_documented_backoff_output_is_what_the_snippet_prints() -> None:
    result = subprocess.run(
        [sys.executable, str(SNIPPETS / "backoff_schedule.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.startswith("accept() called at [0.0, 0.01, 0.03,")
    assert f"    {printed}\n" in (DOCS / "errors.rst").read_text()
    # No error callback: the first error logged at once, the other nine
    # grouped into one line when the listener closes (within 10 s).
    assert result.stderr.count("Too many open files; pausing accepts") == 1
    assert result.stderr.count("EMFILE \u00d79 in 4.3 s") == 1
    assert result.stderr.count("accept() on") == 2


# ---------------------------------------------------------------------------
# Running the snippets

TESTED_SNIPPETS = {
    "echo_server",
    "protocol_echo",
    "protocol_tasks",
    "create_bind",
    "create_sock",
    "serve",
    "blocking",
    "callback_args",
    "one_at_a_time",
    "set_cb",
    "inspect_listener",
    "error_cb",
    "backoff_schedule",
    "open_errors",
    "handler_errors",
    "finish_up",
    "limits",
    "greeter",
    "test_greeter",
    "chat",
    "tls_server",
    "test_tls_server",
    "overload",  # tested in test_overload.py
}


def load(name: str) -> ModuleType:
    path = SNIPPETS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_snippet_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reporting_open_listener(
    send: trio.MemorySendChannel[ConnListener],
) -> Callable[..., AbstractAsyncContextManager[ConnListener]]:
    """``open_listener`` as it is, but telling ``send`` each listener it opens."""

    @asynccontextmanager
    async def open_and_report(*args: Any, **kwargs: Any) -> AsyncIterator[ConnListener]:
        async with REAL_OPEN_LISTENER(*args, **kwargs) as listener:
            send.send_nowait(listener)
            yield listener

    return open_and_report


class Served:
    """A server snippet's module, its listener, and whether main() returned."""

    def __init__(self, module: ModuleType, listener: ConnListener, done: trio.Event):
        self.module = module
        self.listener = listener
        self.done = done


@asynccontextmanager
async def serving(
    name: str, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> AsyncIterator[Served]:
    """Run snippet ``name``'s ``main()`` on 127.0.0.1:0 until the block ends.

    ``settings`` replace more of the module's constants (``CERTFILE=...``).
    """
    send, receive = trio.open_memory_channel[ConnListener](math.inf)
    wrapper = reporting_open_listener(send)
    # Both the public name (what snippets import) and the one serve_listener
    # calls; the wrapper keeps the real function, so nothing else changes.
    monkeypatch.setattr(trio_evlisten, "open_listener", wrapper)
    monkeypatch.setattr(trio_evlisten._open, "open_listener", wrapper)
    module = load(name)
    monkeypatch.setattr(module, "HOST", "127.0.0.1")
    monkeypatch.setattr(module, "PORT", 0)
    for setting, value in settings.items():
        monkeypatch.setattr(module, setting, value)
    done = trio.Event()

    async def run_main() -> None:
        await module.main()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_main)
        listener = await receive.receive()
        yield Served(module, listener, done)
        nursery.cancel_scope.cancel()


async def check_echo(listener: ConnListener, payload: bytes) -> None:
    async with await open_stream_to(listener) as client:
        await client.send_all(payload)
        assert await recv_exactly(client, len(payload)) == payload


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_echo_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(10):
        async with serving("echo_server", monkeypatch) as served:
            listener = served.listener
            assert listener.flags == Flag.CLOSE_ON_FREE | Flag.REUSEABLE
            await check_echo(listener, b"hello\n" * 1000)
            # The error callback is event_base_loopexit: main() returns by
            # itself, the listener closed.
            served.module.accept_error(
                listener, OSError(errno.EMFILE, "Too many open files")
            )
            await served.done.wait()
            assert listener.closed
    out = capsys.readouterr().out
    assert f"listening on ('127.0.0.1', {listener.port})" in out
    assert (
        "Got an error 24 (Too many open files) on the listener. Shutting down." in out
    )


async def test_protocol_tasks_answers_from_tasks_and_hands_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("protocol_tasks", monkeypatch) as served:
            listener = served.listener
            async with await open_stream_to(listener) as client:
                await client.send_all(b"abc\nSTREAM\n")
                assert await recv_exactly(client, 11) in (
                    b"ABC\nSTREAM\n",
                    b"STREAM\nABC\n",
                )
            async with await open_stream_to(listener) as client:
                await client.send_all(b"STREAM\nhello")
                assert await recv_exactly(client, 5) == b"hello"
                await client.send_all(b" more")
                assert await recv_exactly(client, 5) == b" more"


async def test_echo_protocol_echoes_and_closes_once_draining(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("protocol_echo", monkeypatch) as served:
            listener = served.listener
            await check_echo(listener, b"hello\n" * 1000)
            async with (
                await open_stream_to(listener) as client,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(listener.drain)
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"last")
                assert await read_to_eof(client) == b"last"


async def test_create_bind_greets_the_client_by_its_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("create_bind", monkeypatch) as served:
            client = await open_stream_to(served.listener)
            async with client:
                host, port = client.socket.getsockname()
                assert await read_to_eof(client) == f"hello {host}:{port}\n".encode()


async def test_create_sock_serves_the_socket_it_was_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(10):
        async with serving("create_sock", monkeypatch) as served:
            assert served.listener.flags == Flag(0)  # the socket stays the caller's
            await check_echo(served.listener, b"wrapped")
            fd, port = served.listener.fd, served.listener.port
    assert f"listening on fd {fd} port {port}" in capsys.readouterr().out


async def test_serve_shouts_and_returns_once_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("serve", monkeypatch) as served:
            async with await open_stream_to(served.listener) as client:
                await client.send_all(b"quiet please")
                assert await recv_exactly(client, 12) == b"QUIET PLEASE"
            served.listener.close()
            await served.done.wait()  # serve_listener returned: main() did too


async def test_blocking_hands_each_connection_to_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("blocking", monkeypatch) as served:
            assert served.listener.flags & Flag.LEAVE_SOCKETS_BLOCKING
            # A non-blocking socket in the thread would raise BlockingIOError
            # at the first recv() with no data waiting; the echo proves not.
            await check_echo(served.listener, bytes(range(256)) * 256)
            await check_echo(served.listener, b"second client")


async def test_callback_args_number_the_visitors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("callback_args", monkeypatch) as served:
            for n in (1, 2, 3):
                async with await open_stream_to(served.listener) as client:
                    assert (
                        await read_to_eof(client) == f"Welcome, visitor {n}\n".encode()
                    )


async def test_one_at_a_time_queues_the_second_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("one_at_a_time", monkeypatch) as served:
            listener = served.listener
            first = await open_stream_to(listener)
            async with first:
                await first.send_all(b"first")
                assert await recv_exactly(first, 5) == b"first"
                assert not listener.enabled
                async with await open_stream_to(listener) as second:
                    await second.send_all(b"second")
                    await trio.testing.wait_all_tasks_blocked()
                    stats = listener.statistics()
                    assert (stats.accepted, stats.active) == (1, 1)
                    await first.aclose()  # the first handler ends, re-enables
                    assert await recv_exactly(second, 6) == b"second"
                    assert listener.statistics().accepted == 2


async def test_set_cb_serves_once_the_table_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with serving("set_cb", monkeypatch) as served:
            for key, value in ((b"12\n", b"144\n"), (b"nope\n", b"?\n")):
                async with await open_stream_to(served.listener) as client:
                    await client.send_all(key)
                    assert await read_to_eof(client) == value


async def test_inspect_listener_reports_its_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(10):
        async with serving("inspect_listener", monkeypatch) as served:
            listener = served.listener
            for n in (1, 2):
                async with await open_stream_to(listener) as client:
                    expected = (
                        f"port={listener.port} accepted={n} active=1 enabled=True\n"
                    )
                    assert await read_to_eof(client) == expected.encode()
            fd = listener.fd
    out = capsys.readouterr().out
    assert f"fd: {fd}\n" in out
    assert f"bound to: ('127.0.0.1', {listener.port})\n" in out


async def test_error_cb_gives_up_after_three(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(10):
        start = trio.current_time()
        seen = await load("error_cb").main()
        # Two pauses (10 ms, 20 ms) between the three errors.
        assert trio.current_time() - start == pytest.approx(0.03)
    assert [e.errno for e in seen] == [errno.ENFILE] * 3
    out = capsys.readouterr().out
    assert out.count("accept() failed: [Errno 23]") == 3
    assert out.endswith("giving up\n")


async def test_backoff_schedule(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        calls, reply = await load("backoff_schedule").main()
    assert calls == [
        0.0,
        0.01,
        0.03,
        0.07,
        0.15,
        0.31,
        0.63,
        1.27,
        2.27,
        3.27,
        4.27,
        4.27,
    ]
    assert reply == b"ping"
    records = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert [r.levelno for r in records] == [logging.ERROR] * 2
    assert [getattr(r, "accept_errors", None) for r in records] == [1, 9]


async def test_open_errors() -> None:
    with trio.fail_after(10):
        yours, listeners = await load("open_errors").main()
    assert type(yours) is ValueError
    assert str(yours) == "something in the block went wrong"
    assert len(listeners) == 1
    assert isinstance(listeners[0], OSError)
    assert listeners[0].errno == errno.EINVAL


async def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(10):
        replies, errors, raised = await load("handler_errors").main()
    assert replies == [b"", b"hi\n"]
    assert errors == 1
    assert [type(e) for e in raised] == [ValueError]
    logged = [r for r in caplog.records if r.name == "trio_evlisten"]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], ValueError)


async def test_finish_up_drains_a_keep_alive_handler_between_requests() -> None:
    with trio.fail_after(10):
        result, replies, backlog, queue_limit = await load("finish_up").main()
    # The handler heard the drain, said goodbye and returned by itself.
    assert result == trio_evlisten.DrainResult(finished=1, failed=0, cancelled=0)
    assert replies == b"ok a\nbye\n"
    assert (backlog, queue_limit) == (5, 5 if sys.platform == "linux" else None)


async def test_limits_caps_raises_the_cap_then_cancels_blocked_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        start = trio.current_time()
        seen, result, ends = await load("limits").main()
        # Nobody finished early: the drain waited out its whole grace.
        assert trio.current_time() - start == pytest.approx(2.0)
    queued = 1 if sys.platform == "linux" else None
    assert seen == [(1, 1, queued), (2, 2, 0 if queued else None)]
    assert result == trio_evlisten.DrainResult(finished=0, failed=0, cancelled=2)
    assert ends == b""


def name_of(client: trio.SocketStream) -> bytes:
    """How the chat snippet names ``client``: its address, as the server sees it."""
    host, port = client.socket.getsockname()[:2]
    return f"{host}:{port}".encode()


async def test_chat_sends_each_line_to_every_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        async with (
            serving("chat", monkeypatch) as served,
            await open_stream_to(served.listener) as a,
        ):
            a_lines, a_name = LineReader(a), name_of(a)
            assert await a_lines.readline() == a_name + b" joined"
            async with await open_stream_to(served.listener) as b:
                b_lines, b_name = LineReader(b), name_of(b)
                for lines in (a_lines, b_lines):
                    assert await lines.readline() == b_name + b" joined"
                await a.send_all(b"hello\n")
                # A line in pieces is sent once whole; two lines in one piece
                # are two lines.
                await b.send_all(b"hi ")
                await trio.testing.wait_all_tasks_blocked()
                await b.send_all(b"there\nhow are\nyou?\n")
                for lines in (a_lines, b_lines):
                    assert await lines.readline() == a_name + b": hello"
                    assert await lines.readline() == b_name + b": hi there"
                    assert await lines.readline() == b_name + b": how are"
                    assert await lines.readline() == b_name + b": you?"
            assert await a_lines.readline() == b_name + b" left"
            assert served.listener.statistics().active == 1


async def test_chat_drops_a_client_that_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The queue is what keeps one stuck client from holding up the room."""
    with trio.fail_after(20):
        async with serving("chat", monkeypatch) as served:
            monkeypatch.setattr(served.module, "QUEUE_SIZE", 4)
            listener = served.listener
            with trio.socket.socket() as stuck:
                # Small buffers, so the server's send to it blocks soon.
                stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await stuck.connect(("127.0.0.1", listener.port))
                stuck_name = "{}:{}".format(*stuck.getsockname()).encode()
                async with await open_stream_to(listener) as fast:
                    lines, fast_name = LineReader(fast), name_of(fast)
                    assert await lines.readline() == fast_name + b" joined"
                    line = b"x" * 4000
                    others = []
                    # Each line goes to both; the fast client reads its copy
                    # before sending the next, the stuck one never reads.
                    for _ in range(10_000):
                        await fast.send_all(line + b"\n")
                        while (
                            got := await lines.readline()
                        ) != fast_name + b": " + line:
                            others.append(got)
                        if others:
                            break
                    assert others == [stuck_name + b" left"]
                    assert listener.statistics().active == 1
                # The stuck client's connection was closed: what was sent
                # before it was dropped is there, then EOF.
                while await stuck.recv(1 << 20):
                    pass


async def test_tls_server_serves_with_the_certificate_files(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ca: trustme.CA,
    client_ctx: ssl.SSLContext,
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    with trio.fail_after(10):
        async with serving(
            "tls_server", monkeypatch, CERTFILE=str(certfile), KEYFILE=str(keyfile)
        ) as served:
            client = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", served.listener.port, ssl_context=client_ctx
            )
            async with client:
                await client.send_all(b"over TLS")
                assert await recv_exactly(client, 8) == b"over TLS"


def run_pytest(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )


def test_the_user_test_module_runs_as_the_tutorial_sets_it_up(tmp_path: Path) -> None:
    # The tutorial's folder: the server and its tests, nothing of ours.
    for name in ("greeter.py", "test_greeter.py"):
        (tmp_path / name).write_text((SNIPPETS / name).read_text())
    # Without pytest-trio's trio_mode, pytest refuses the async tests...
    result = run_pytest(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "async def functions are not natively supported" in result.stdout
    # ...and with the configuration the tutorial shows, they pass.
    config = (SNIPPETS / "pytest_trio_mode.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(config)
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^4 passed", result.stdout, re.MULTILINE), result.stdout


def test_the_tls_test_module_runs_as_the_tutorial_sets_it_up(tmp_path: Path) -> None:
    for name in ("tls_server.py", "test_tls_server.py"):
        (tmp_path / name).write_text((SNIPPETS / name).read_text())
    config = (SNIPPETS / "pytest_trio_mode.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(config)
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^2 passed", result.stdout, re.MULTILINE), result.stdout


def test_the_tutorial_shows_tls_and_a_broadcast() -> None:
    tutorial = (DOCS / "tutorial.rst").read_text()
    shown = {p.name for p in included_files(DOCS / "tutorial.rst")}
    assert {"tls_server.py", "test_tls_server.py", "chat.py"} <= shown
    for words in (
        "ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)",
        "load_cert_chain",
        "trustme",
        "openssl s_client -connect 127.0.0.1:",
        "examples/tls_echo.py",
        ":exc:`trio.BusyResourceError`",
    ):
        assert words in tutorial, words


_RATIO = re.compile(r"(?<![\w.])\d+\.\d+x\b|about half|two thirds")


def test_speed_ratios_are_only_on_the_benchmarks_page() -> None:
    # Prose that repeats a measured ratio goes stale when the benchmark is
    # rerun (the stream's cost once read "about half" here, "0.6x" there):
    # it points at docs/benchmarks.md, which the benchmark regenerates.
    package = DOCS.parent / "trio_evlisten"
    texts = [DOCS.parent / "README.md", *pages(), *sorted(package.glob("*.py"))]
    for path in texts:
        if path.name == "benchmarks.md":
            continue
        for line in path.read_text().splitlines():
            assert not _RATIO.search(line), f"{path.name}: {line.strip()}"


def test_the_drain_steps_are_in_the_order_drain_takes_them() -> None:
    tutorial = (DOCS / "tutorial.rst").read_text()
    steps = tutorial[tutorial.index("**A drain.**") :]
    steps = steps[: steps.index("It returns a")]
    order = [
        "it sets :attr:`~trio_evlisten.ConnListener.draining`",
        "it accepts the connections the kernel had already queued",
        "it stops accepting",
        "it waits until ``grace`` seconds after the drain began",
        "it cancels the handlers still running",
    ]
    found = [steps.find(step) for step in order]
    assert -1 not in found, dict(zip(order, found, strict=True))
    assert found == sorted(found)
    contract = (DOCS / "contract.md").read_text()
    lifetime = contract[contract.index("## Lifetime") :].split("\n- ")[1]
    assert lifetime.index("queued") < lifetime.index("stops accepting")


def test_the_tutorial_shows_testing_drain_and_limits() -> None:
    tutorial = (DOCS / "tutorial.rst").read_text()
    shown = {p.name for p in included_files(DOCS / "tutorial.rst")}
    assert {"greeter.py", "test_greeter.py", "pytest_trio_mode.toml"} <= shown
    assert {"finish_up.py", "limits.py"} <= shown
    for name in ("drain", "set_max_connections", "draining", "wait_draining"):
        assert f"~trio_evlisten.ConnListener.{name}`" in tutorial, name
    for name in ("max_connections=", "drain_timeout="):
        assert f"``{name}" in tutorial, name
    assert ":class:`~trio_evlisten.DrainResult`" in tutorial
    for field in ("finished", "failed", "cancelled"):
        assert f"``{field}``" in tutorial, field


_XFAIL_TEST = re.compile(
    r"@pytest\.mark\.xfail(?:\([^)]*\))?\s*(?:@[^\n]*\n\s*)*(?:async\s+)?def\s+(test_\w+)"
)


def test_the_faults_page_marks_xfail_only_tests_that_are() -> None:
    # A row saying "xfail (bug)" about a test that passes misleads: the
    # page must say what the test shows now.
    faults = DOCS.parent / "tests" / "faults"
    source = "\n".join(p.read_text() for p in sorted(faults.glob("test_*.py")))
    xfailed = set(_XFAIL_TEST.findall(source))
    assert _XFAIL_TEST.findall("@pytest.mark.xfail(reason='x')\nasync def test_a():")
    rows = (DOCS / "faults.md").read_text().splitlines()
    for row in rows:
        if "xfail" in row.lower():
            named = set(re.findall(r"`(?:\w+\.py::)?(test_\w+)`", row))
            assert named, row
            assert named <= xfailed, f"not xfail in tests/faults: {named - xfailed}"
    for name in re.findall(r"`(?:\w+\.py::)?(test_\w+)`", "\n".join(rows)):
        assert f"def {name}(" in source, f"faults.md names a missing test: {name}"
