"""Run a handler in N worker processes that share one port (``SO_REUSEPORT``).

Usage::

    python -m trio_evlisten.workers --port 8000 --workers 4 [--host 127.0.0.1] \\
        [MODULE:FUNC]

``MODULE:FUNC`` names an accept callback, ``async def cb(listener, conn,
addr)`` (default: :func:`echo`); the current directory is on ``sys.path``,
as with ``python -m``. Each worker is a separate Python process with its own
Trio loop and its own listening socket, opened with ``Flag.REUSEABLE_PORT``
on the same address, so the kernel spreads new connections over the workers
(by a hash of the client's address and port) and a busy or crashed worker
does not stop the others.

The supervisor (the process you start) does no I/O on the port. It:

* reserves the address first (a bound, never listening socket with
  ``SO_REUSEPORT``), so ``--port 0`` works (the chosen port is logged) and
  nothing else can take the port while a worker restarts;
* restarts a worker that exits, unless more than ``--max-restarts`` restarts
  happened within ``--restart-window`` seconds: then it stops everything and
  exits with status 1 (a crash loop is a bug to fix, not to hide);
* on SIGINT or SIGTERM sends SIGTERM to every worker, waits up to
  ``--shutdown-timeout`` seconds, SIGKILLs what is left, reaps them all and
  exits with status 0. A second signal SIGKILLs at once. This holds from
  the moment it has parsed its command line, also while workers are being
  started (one then gets SIGTERM as soon as it exists). The workers run in
  a session of their own, so a terminal's Ctrl-C reaches the supervisor
  alone, which passes it on as SIGTERM.

A worker on SIGTERM/SIGINT stops accepting, lets running handlers finish for
``--drain-timeout`` seconds, cancels the rest and exits 0. It also exits by
itself if its supervisor disappears (it checks its parent pid every second),
so a SIGKILLed supervisor leaves no orphans serving the port for long.

``--protocol [MODULE:FACTORY]`` serves a protocol factory (protocol mode,
``open_listener(protocol=...)``) in every worker instead of an accept
callback; without ``MODULE:FACTORY``, the echo protocol
(``trio_evlisten._cli:EchoProtocol``).

``--proxy-protocol`` (with ``--proxy-trusted NETWORK``, repeatable; default
loopback) opens the workers' listeners with ``proxy_protocol=True``, for
running behind HAProxy or nginx.

Log lines go to stderr; ``worker pid N serving on HOST:PORT`` says a worker
is accepting.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Final

import trio

from ._agent import AgentServer, AgentSnapshot
from ._cli import OneLineParser
from ._flags import Flag
from ._open import open_listener
from ._option_flags import add_arguments, from_arguments, to_argv
from ._options import resolve
from ._supervisor import Supervisor, hold_stop_signals, reserve_port
from ._transport import check_protocol_factory

if TYPE_CHECKING:
    from collections.abc import Sequence

    from typing_extensions import Unpack

    from ._listener import AcceptCallback, ConnListener
    from ._options import ListenerOptions
    from ._stream import SocketStream

logger: Final = logging.getLogger("trio_evlisten.workers")

DEFAULT_HANDLER: Final = "trio_evlisten.workers:echo"
#: What ``--protocol`` alone serves: the echo as an asyncio Protocol.
DEFAULT_PROTOCOL: Final = "trio_evlisten._cli:EchoProtocol"
#: A worker's ``drain_timeout`` unless ``--drain-timeout`` says otherwise.
DEFAULT_DRAIN_TIMEOUT: Final = 5.0
#: How often a worker checks that its supervisor is still there.
PARENT_CHECK_INTERVAL: Final = 1.0


async def echo(listener: ConnListener, conn: SocketStream, addr: object) -> None:
    """The default handler: send every byte back until the client closes."""
    async for data in conn:
        await conn.send_all(data)


def load_handler(spec: str) -> AcceptCallback:
    """Import ``MODULE:FUNC`` (``FUNC`` may be dotted) and return it.

    Raises:
        ValueError: ``spec`` is not ``MODULE:FUNC``, or names no callable.
        ImportError: the module cannot be imported.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"handler must be MODULE:FUNC, not {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{spec!r}: {module_name} has no {attr_path}") from None
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable: {obj!r}")
    handler: AcceptCallback = obj
    return handler


# ----------------------------------------------------------------------
# The worker


async def run_worker(
    handler: AcceptCallback | None,
    host: str,
    port: int,
    *,
    supervisor_pid: int | None,
    metrics_dir: str | None = None,
    **options: Unpack[ListenerOptions],
) -> None:
    """Serve ``handler`` on ``(host, port)`` with ``REUSEABLE_PORT`` until told to stop.

    ``handler=None`` with ``protocol=`` in ``options`` serves in protocol mode.

    Returns on SIGTERM/SIGINT (after draining as ``options`` say:
    ``drain_timeout=`` bounds it), or when the parent is no longer
    ``supervisor_pid``.

    Resource handling:
        The listening socket is closed (``CLOSE_ON_FREE``) on return.
    """
    flags = Flag.REUSEABLE | Flag.REUSEABLE_PORT | Flag.CLOSE_ON_FREE
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            open_listener(
                handler, address=(host, port), flags=flags, **options
            ) as listener,
            trio.open_nursery() as nursery,
        ):
            logger.info(
                "worker pid %d serving on %s:%d", os.getpid(), host, listener.port
            )
            if supervisor_pid is not None:
                nursery.start_soon(_watch_parent, supervisor_pid, nursery.cancel_scope)
            if metrics_dir is not None:
                from .metrics import write_worker_metrics

                path = os.path.join(metrics_dir, f"{os.getpid()}.prom")
                nursery.start_soon(write_worker_metrics, listener, path)
            async for signum in signals:
                logger.info(
                    "worker pid %d got %s; stopping",
                    os.getpid(),
                    signal.Signals(signum).name,
                )
                break
            nursery.cancel_scope.cancel()
    logger.info("worker pid %d stopped", os.getpid())


async def _watch_parent(supervisor_pid: int, scope: trio.CancelScope) -> None:
    # Polling, as there is no event to wait on: PR_SET_PDEATHSIG fires when
    # the *thread* that forked us exits, and trio forks from a worker thread
    # that comes and goes.
    while os.getppid() == supervisor_pid:  # noqa: ASYNC110
        await trio.sleep(PARENT_CHECK_INTERVAL)
    logger.warning("worker pid %d: the supervisor is gone; stopping", os.getpid())
    scope.cancel()


# ----------------------------------------------------------------------
# Command line


def _set_snapshot(supervisor: Supervisor) -> AgentSnapshot:
    """The set of workers as the agent check sees it: serving, or stopping.

    The supervisor answers for the set: HAProxy sees one server (one address,
    one ``agent-port``), which stays up while a worker restarts, and only the
    supervisor knows that the whole set is stopping. Workers binding the
    agent port with ``SO_REUSEPORT`` instead would give each check a random
    worker's answer. It has no view of the workers' load, so the weight is
    100% while serving.
    """
    stopping = supervisor.stopping
    return AgentSnapshot(
        closed=False,
        accepting=not stopping,
        lameduck=stopping,
        draining=False,
        active=0,
        pending=0,
        max_connections=None,
    )


async def _run_with_agent(supervisor: Supervisor, agent: AgentServer | None) -> int:
    """Run the supervisor, and the set's agent port beside it while it runs."""
    if agent is None:
        return await supervisor.run()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        logger.info("agent check answered on port %d", agent.port)
        status = await supervisor.run()
        agent.stop()
    return status


def _serve_metrics(
    host: str, port: int, directory: str, supervisor: Supervisor
) -> None:
    """Serve the set's metrics over HTTP (a daemon thread), from ``directory``.

    Raises:
        ImportError: prometheus_client is not installed.
        OSError: the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    from .metrics import WorkerSetCollector

    registry = CollectorRegistry()
    registry.register(WorkerSetCollector(directory, supervisor.worker_pids))
    server, _ = start_http_server(port, addr=host, registry=registry)
    logger.info("metrics served on port %d", server.server_port)


_EPILOG: Final = """\
exit status: 0 after SIGINT or SIGTERM (every worker stopped and reaped),
1 if workers kept dying (more than --max-restarts restarts within
--restart-window seconds), 2 for bad arguments.
"""


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m trio_evlisten.workers",
        description="Serve an accept callback in N processes sharing a port "
        "(SO_REUSEPORT),\nrestarting workers that die. SIGINT or SIGTERM "
        "stops them all.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "handler",
        nargs="?",
        default=DEFAULT_HANDLER,
        help="MODULE:FUNC, an async def cb(listener, conn, addr) "
        f"(default: {DEFAULT_HANDLER})",
    )
    parser.add_argument(
        "--protocol",
        nargs="?",
        const=DEFAULT_PROTOCOL,
        # Not "protocol": from_arguments() reads the listener options by
        # name, and this one is a spec to import, not the factory.
        dest="protocol_spec",
        metavar="MODULE:FACTORY",
        help="serve a protocol factory (an asyncio.Protocol class, say) in "
        "protocol mode instead of an accept callback; --protocol alone "
        f"serves {DEFAULT_PROTOCOL}",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="worker processes (default: the CPU count)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        metavar="N",
        help="stop everything and exit 1 when workers would be restarted more "
        "than this many times within --restart-window (default: 10)",
    )
    parser.add_argument(
        "--restart-window",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the window --max-restarts counts restarts in (default: 60.0)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after a stop, SIGKILL the workers still there after this many "
        "seconds (default: 10.0)",
    )
    # Every listener option with a command-line spelling. A worker that does
    # not finish its handlers soon is SIGKILLed by the supervisor
    # (--shutdown-timeout) anyway: drain for less than that.
    add_arguments(parser, defaults={"drain_timeout": DEFAULT_DRAIN_TIMEOUT})
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the workers' Prometheus metrics at http://HOST:PORT/metrics, "
        "one series per worker, labelled with its slot; needs "
        "trio_evlisten[prometheus]",
    )
    # Internal: how the supervisor starts a worker (the supervisor's pid, and
    # where the worker writes its metrics).
    parser.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line entry; returns the exit status."""
    parser = _parser()
    opts = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s trio_evlisten.workers[%(process)d] %(levelname)s: "
        "%(message)s",
    )
    if opts.worker_of is not None:
        loaded, options = _checked(parser, opts)
        handler: AcceptCallback | None = loaded
        if opts.protocol_spec is not None:
            options["protocol"] = loaded
            handler = None
        trio.run(
            functools.partial(
                run_worker,
                handler,
                opts.host,
                opts.port,
                supervisor_pid=opts.worker_of,
                metrics_dir=opts.metrics_dir,
                **options,
            )
        )
        return 0
    # From here a stop ends the supervisor cleanly, even before it started
    # a worker (loading the handler's module may take a while).
    with hold_stop_signals() as held:
        return _supervise(parser, opts, held)


def _checked(
    parser: argparse.ArgumentParser, opts: argparse.Namespace
) -> tuple[AcceptCallback, dict[str, Any]]:
    """The handler and the listener options, or a usage error (exit 2)."""
    if not 0 <= opts.port <= 0xFFFF:
        parser.error(f"--port must be in 0..65535, not {opts.port}")
    # The default handler, as argparse fills it in, cannot be told from one
    # typed: only another handler is refused beside --protocol.
    if opts.protocol_spec is not None and opts.handler != DEFAULT_HANDLER:
        parser.error(
            f"give an accept callback ({opts.handler}) or --protocol "
            f"{opts.protocol_spec}, not both"
        )
    spec = opts.protocol_spec or opts.handler
    what = "handler" if opts.protocol_spec is None else "protocol factory"
    try:
        handler = load_handler(spec)
        if opts.protocol_spec is not None:
            check_protocol_factory(handler, "--protocol")
    except (ImportError, ValueError, TypeError) as exc:
        parser.error(f"cannot load the {what} {spec!r}: {exc}")
    options = from_arguments(opts)
    if "proxy_trusted" in options and not options.get("proxy_protocol"):
        parser.error("--proxy-trusted needs --proxy-protocol")
    try:
        # What every worker's open_listener would refuse, refused once here
        # (--proxy-timeout without --proxy-protocol, say), not in a crash loop.
        resolve(
            {**options, "protocol": handler}
            if opts.protocol_spec is not None
            else options,
            Flag(0),
            caller="python -m trio_evlisten.workers",
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return handler, options


def _supervise(
    parser: argparse.ArgumentParser, opts: argparse.Namespace, held: list[int]
) -> int:
    _, options = _checked(parser, opts)
    if opts.workers < 1:
        parser.error(f"--workers must be >= 1, not {opts.workers}")
    if opts.max_restarts < 0 or opts.restart_window <= 0:
        parser.error("--max-restarts must be >= 0 and --restart-window > 0")
    # The supervisor answers the agent check for the set (see _run_with_agent).
    agent_port = options.pop("agent_port", None)
    agent = None
    if agent_port is not None:
        agent = AgentServer(lambda: _set_snapshot(supervisor))
        try:
            agent.bind(opts.host, agent_port)
        except OSError as exc:
            logger.error("%s", exc)
            return 1
    metrics_dir = None
    if opts.metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="trio_evlisten-metrics-")
    with reserve_port(opts.host, opts.port) as held_port:
        port = held_port.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "trio_evlisten.workers",
            "--worker-of",
            str(os.getpid()),
            "--host",
            opts.host,
            "--port",
            str(port),
            *to_argv(options),
            *([] if metrics_dir is None else ["--metrics-dir", metrics_dir]),
            *(
                [opts.handler]
                if opts.protocol_spec is None
                else ["--protocol", opts.protocol_spec]
            ),
        ]
        logger.info(
            "supervisor pid %d: %d workers on %s:%d, %s %s",
            os.getpid(),
            opts.workers,
            opts.host,
            port,
            "handler" if opts.protocol_spec is None else "protocol",
            opts.protocol_spec or opts.handler,
        )
        supervisor = Supervisor(
            command,
            opts.workers,
            opts.max_restarts,
            opts.restart_window,
            # Each worker spends up to --lameduck accepting before it drains.
            opts.shutdown_timeout + options.get("lameduck", 0.0),
            held_signals=held,
        )
        if metrics_dir is not None:
            try:
                _serve_metrics(opts.host, opts.metrics_port, metrics_dir, supervisor)
            except (ImportError, OSError) as exc:
                shutil.rmtree(metrics_dir, ignore_errors=True)
                parser.error(f"--metrics-port {opts.metrics_port}: {exc}")
        try:
            status = trio.run(_run_with_agent, supervisor, agent)
        finally:
            if agent is not None:
                agent.close()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    logger.info("supervisor pid %d: exiting with status %d", os.getpid(), status)
    return status


if __name__ == "__main__":
    sys.exit(main())
